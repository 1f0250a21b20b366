"""The graph API (qir.graph) and symbolic shapes (qir.shapes)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from qir.errors import QirError
from qir.graph import Module, Op, Value, check_name
from qir.printer import print_module
from qir.quantspec import QuantSpec
from qir.shapes import (
    SymDim,
    add,
    bind,
    broadcast,
    dim,
    evaluate,
    format_shape,
    is_static,
    mul,
    numel,
    sub,
)
from qir.types import TensorType
from qir.verifier import verify

F8 = TensorType.of("f32", [1, "seq", 8])


def _chain() -> tuple[Module, list[Op]]:
    """``%a = add %x, %x; %b = mul %a, %x; %c = neg %b``, returning ``%c``."""
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", F8)
    a = f.add_op("add", [x, x], names=["a"])
    b = f.add_op("mul", [a.result, x], names=["b"])
    c = f.add_op("neg", [b.result], names=["c"])
    f.set_outputs([c.result])
    return m, [a, b, c]


# -- building ---------------------------------------------------------------------------------------------------------
def test_add_op_infers_result_types() -> None:
    m = Module("m")
    w = m.add_constant("w", np.zeros((16, 8), np.float32))
    bias = m.add_constant("bias", np.zeros((8,), np.float32))
    f = m.add_function("main")
    x = f.add_input("x", F8)
    y = f.add_op("add", [x, bias]).result
    assert y.type == F8 and y.name == "add"
    z = f.add_op("linear", [y, w]).result
    assert str(z.type) == "f32[1,seq,16]"
    s = f.add_op("softmax", [z]).result
    assert f.ops[-1].attrs == {"axis": -1}  # defaults are filled in at creation
    f.set_outputs([s])
    verify(m)


def test_add_op_errors() -> None:
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", F8)
    with pytest.raises(QirError, match="unknown op 'lineer'"):
        f.add_op("lineer", [x])
    with pytest.raises(QirError, match="give result_types"):
        f.add_op("quantize", [x])
    with pytest.raises(QirError, match="unknown attribute 'axes'"):
        f.add_op("softmax", [x], {"axes": 1})
    with pytest.raises(QirError, match="missing required attribute 'perm'"):
        f.add_op("transpose", [x])
    with pytest.raises(QirError, match="1 results but 2 names"):
        f.add_op("neg", [x], names=["a", "b"])
    g = m.add_function("other")
    with pytest.raises(QirError, match="value %x belongs to @main, not @other"):
        g.add_op("neg", [x])
    foreign = Module("elsewhere").add_constant("w", np.zeros(8, np.float32))
    with pytest.raises(QirError, match="constant @w does not belong to this function's module"):
        f.add_op("add", [x, foreign])
    assert f.ops == [] and g.ops == []  # failed builds leave nothing behind
    assert x.uses == []


def test_names_are_made_unique() -> None:
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", F8)
    names = [f.add_op("neg", [x], names=["x"]).result.name for _ in range(3)]
    assert names == ["x.1", "x.2", "x.3"]
    assert [f.add_op("neg", [x]).result.name for _ in range(2)] == ["neg", "neg.1"]
    assert f.fresh_name("x") == "x.4" and f.fresh_name("fresh") == "fresh"
    assert f.add_input("x", F8).name == "x.4"


def test_invalid_names_are_refused() -> None:
    for bad in ("", ".x", "-x", "a b", "a%b", "%x"):
        with pytest.raises(QirError, match="invalid value name"):
            check_name(bad, "value name")
    assert check_name("model.layers.0.q_proj-w", "value name") == "model.layers.0.q_proj-w"
    m = Module("m")
    with pytest.raises(QirError, match="invalid constant name"):
        m.add_constant("bad name", np.zeros(1, np.float32))
    with pytest.raises(QirError, match="give its type when it has no data"):
        m.add_constant("w")
    m.add_function("f")
    with pytest.raises(QirError, match="already has a function @f"):
        m.add_function("f")


def test_insert_before_and_after() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    x = f.inputs[0]
    first = f.add_op("neg", [x], names=["first"], before=a)
    mid = f.add_op("abs", [x], names=["mid"], after=a)
    last = f.add_op("exp", [x], names=["last"], after=c)
    assert f.ops == [first, a, mid, b, c, last]
    assert all(op.parent is f for op in f.ops)
    with pytest.raises(QirError, match="at most one of before= and after="):
        f.add_op("neg", [x], before=a, after=b)
    other = Op("neg", [x], [Value("o", F8)])
    with pytest.raises(QirError, match="is not in function @main"):
        f.add_op("neg", [x], before=other)
    with pytest.raises(QirError, match="already belongs to function @main"):
        f.insert_op(a)


def test_erase_op_refuses_while_used() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    with pytest.raises(QirError, match=r"result %a is still used by mul"):
        f.erase_op(a)
    with pytest.raises(QirError, match="still used by the function's outputs"):
        f.erase_op(c)
    assert f.ops == [a, b, c]
    x = f.inputs[0]
    b.result.replace_all_uses_with(x)
    f.erase_op(b)
    assert f.ops == [a, c] and b.parent is None
    assert all(u[0] is not b for u in x.uses) and a.result.uses == []
    f.erase_op(a)
    assert f.fresh_name("a") == "a"  # erasing frees the result's name
    verify(m)


def test_replace_all_uses_with_moves_uses_and_outputs() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    x = f.inputs[0]
    d = f.add_op("abs", [x], names=["d"], before=b)
    a.result.replace_all_uses_with(d.result)
    assert b.operands[0] is d.result and a.result.uses == []
    assert (b, 0) in d.result.uses
    c.result.replace_all_uses_with(b.result)
    assert f.outputs == [b.result]
    assert c.result.uses == []
    a.result.replace_all_uses_with(a.result)  # a no-op, not an error
    verify(m)
    assert "return %b" in print_module(m)


def test_set_operand_keeps_use_lists() -> None:
    m, (a, b, c) = _chain()
    x = m.main.inputs[0]
    assert x.uses == [(a, 0), (a, 1), (b, 1)]
    b.set_operand(1, a.result)
    assert x.uses == [(a, 0), (a, 1)]
    assert a.result.uses == [(b, 0), (b, 1)]
    assert a.result.users() == [b]
    assert x.users() == [a]
    verify(m)


def test_set_attrs_validates_and_resets_defaults() -> None:
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", F8)
    s = f.add_op("softmax", [x], {"axis": 1})
    s.set_attrs(axis=2)
    assert s.attrs["axis"] == 2
    s.set_attrs(axis=None)  # back to the declared default, never missing
    assert s.attrs == {"axis": -1}
    with pytest.raises(QirError, match="unknown attribute 'dim'"):
        s.set_attrs(dim=1)
    with pytest.raises(QirError, match="attribute axis must be int"):
        s.set_attrs(axis="last")
    assert s.attrs == {"axis": -1}
    with pytest.raises(TypeError):
        s.attrs["axis"] = 0  # type: ignore[index]
    t = f.add_op("transpose", [x], {"perm": [0, 2, 1]})
    assert t.attrs["perm"] == (0, 2, 1)  # lists freeze to tuples
    with pytest.raises(QirError, match="missing required attribute 'perm'"):
        t.set_attrs(perm=None)
    f.set_outputs([s.result, t.result])
    verify(m)


def test_queries() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    assert [v.name for v in f.values()] == ["x", "a", "b", "c"]
    assert f.value("b") is b.result
    assert f.find_ops("mul") == [b]
    with pytest.raises(QirError, match="no value %zz in function @main"):
        f.value("zz")
    with pytest.raises(QirError, match=r"op test.two has 2 results; use \.results"):
        _ = Op("test.two", [], [Value("p", F8), Value("q", F8)]).result
    assert m.main is f and m.function("main") is f
    with pytest.raises(QirError, match=r"no function @nope in module @m \(functions: main\)"):
        m.function("nope")
    m.add_function("decode")
    assert m.main is f
    n = Module("n")
    n.add_function("prefill")
    n.add_function("decode")
    with pytest.raises(QirError, match="has no function @main; it has prefill, decode"):
        _ = n.main
    with pytest.raises(QirError, match="no constant @w in module @n"):
        n.constant("w")


def test_rename_value() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    f.rename(a.result, "sum")
    assert "%sum = add %x, %x" in print_module(m)
    with pytest.raises(QirError, match="already used"):
        f.rename(b.result, "sum")
    with pytest.raises(QirError, match="rename constants with Module.rename_constant"):
        f.rename(m.add_constant("w", np.zeros(1, np.float32)), "v")
    assert f.fresh_name("a") == "a"
    verify(m)


# -- graph views -------------------------------------------------------------------------------------------------------
def test_topological_order_and_networkx() -> None:
    m, (a, b, c) = _chain()
    f = m.main
    x = f.inputs[0]
    d = f.add_op("abs", [x], names=["d"])
    assert f.topological_order() == [a, b, c, d]  # already valid: order kept
    f.ops[:] = [c, d, b, a]  # scrambled by hand
    assert f.topological_order() == [d, a, b, c]  # d has no dependencies and kept its place before a
    g = f.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {id(op) for op in (a, b, c, d)}
    assert g.nodes[id(b)]["op"] is b
    assert set(g.edges) == {(id(a), id(b)), (id(b), id(c))}
    assert g.edges[id(a), id(b)]["value"] == "a"
    assert nx.has_path(g, id(a), id(c)) and not nx.has_path(g, id(d), id(c))


def test_topological_order_detects_a_cycle() -> None:
    m, (a, b, c) = _chain()
    a.set_operand(0, c.result)
    with pytest.raises(QirError, match="function @main has a cycle"):
        m.main.topological_order()


# -- modules ----------------------------------------------------------------------------------------------------------
def test_clone_is_independent(block_module: Module) -> None:
    text = print_module(block_module)
    clone = block_module.clone()
    assert print_module(clone) == text
    verify(clone)
    f = clone.main
    assert all(op.parent is f for op in f.ops)
    assert not any(a is b for a, b in zip(f.ops, block_module.main.ops))
    for v in f.values():
        assert all(u[0].parent is f for u in v.uses)
    # mutate the clone in every way a pass might
    f.rename(f.value("x"), "normed")
    f.ops[-1].result.replace_all_uses_with(f.value("h2"))
    f.erase_op(f.ops[-1])
    f.find_ops("rms_norm")[0].set_attrs(eps=1e-3)
    f.add_op("abs", [f.value("h")], names=["extra"], before=f.ops[2])
    clone.rename_constant("wq.scale", "wq.s")
    clone.add_constant("new", np.zeros(2, np.float32))
    clone.add_function("decode")
    assert print_module(block_module) == text
    verify(block_module)
    verify(clone)
    # constants share their (immutable) data, but not the Constant objects or their use lists
    assert clone.constants["norm"] is not block_module.constants["norm"]
    assert clone.constants["norm"].data is block_module.constants["norm"].data
    assert all(u[0].parent is block_module.main for u in block_module.constants["norm"].uses)


def test_rename_constant_updates_specs(block_module: Module) -> None:
    m = block_module
    m.rename_constant("wq.scale", "wq.s")
    m.rename_constant("wv.zp", "wv.z")
    text = print_module(m)
    assert "@wq.scale" not in text and "@wv.zp" not in text
    assert "const @wq : i4[64,64] q(axis=1, group=32, scale=@wq.s) = blob" in text
    assert "q(axis=1, group=32, scale=@wv.scale, zp=@wv.z)" in text
    assert list(m.constants)[3] == "wq.s"  # keeps its place in the module
    assert m.constants["wq.s"].name == "wq.s"
    verify(m)
    with pytest.raises(QirError, match="constant @norm already exists"):
        m.rename_constant("wq.s", "norm")
    with pytest.raises(QirError, match="no constant @ghost"):
        m.rename_constant("ghost", "g")


def test_rename_constant_updates_function_value_specs() -> None:
    m = Module("m")
    m.add_constant("s", np.array(0.5, np.float32))
    f = m.add_function("main")
    x = f.add_input("x", F8)
    t = TensorType.of("i8", [1, "seq", 8], QuantSpec(scale="s"))
    q = f.add_op("quantize", [x], result_types=[t], names=["q"]).result
    f.set_outputs([q])
    verify(m)
    m.rename_constant("s", "act.scale")
    assert q.type.quant is not None and q.type.quant.scale == "act.scale"
    assert "q(scale=@act.scale)" in print_module(m)
    verify(m)


def test_remove_constant_refuses_when_referenced(block_module: Module) -> None:
    m = block_module
    with pytest.raises(QirError, match="cannot remove constant @norm: used by rms_norm"):
        m.remove_constant("norm")
    with pytest.raises(QirError, match="cannot remove constant @wk.scale: the quantized type of @wk refers to it"):
        m.remove_constant("wk.scale")
    m.add_constant("unused", np.zeros(3, np.float32))
    m.remove_constant("unused")
    assert "unused" not in m.constants
    with pytest.raises(QirError, match="no constant @unused"):
        m.remove_constant("unused")
    verify(m)


def test_add_constant_types_and_order() -> None:
    m = Module("m")
    m.add_constant("a", np.zeros((2, 3), np.float16))
    m.add_constant("c", None, type=TensorType.of("i4", [4, 64], QuantSpec.per_tensor(0.1)))
    m.add_constant("b", np.ones(2, np.int8), after="a")
    assert list(m.constants) == ["a", "b", "c"]
    assert str(m.constants["a"].type) == "f16[2,3]" and m.constants["a"].ref == "@a"
    with pytest.raises(QirError, match="already has a constant @a"):
        m.add_constant("a", np.zeros(1, np.float32))
    with pytest.raises(QirError, match="no constant @zz to insert @d after"):
        m.add_constant("d", np.zeros(1, np.float32), after="zz")
    with pytest.raises(QirError, match="constant @c has no data"):
        m.constants["c"].numpy()
    with pytest.raises(QirError, match="has no qir equivalent"):
        m.add_constant("e", np.zeros(2, np.complex64))


# -- symbolic shapes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "printed"), [
    ("seq", "seq"),
    ("past+1", "past+1"),
    (" past + 1 ", "past+1"),
    ("2*seq-1", "2*seq-1"),
    ("b+a", "a+b"),  # canonical order: terms by name, constant last
    ("1+seq", "seq+1"),
    ("-seq+4", "-seq+4"),
    ("seq+seq", "2*seq"),
    ("seq-seq", "0"),  # cancels to a plain int
    ("12", "12"),
    ("3*n+2*m-5", "2*m+3*n-5"),
])
def test_dim_parsing(text: str, printed: str) -> None:
    d = dim(text)
    assert str(d) == printed
    assert dim(str(d)) == d  # printing is a fixed point
    if printed.lstrip("-").isdigit():
        assert isinstance(d, int)


@pytest.mark.parametrize("bad", ["", "  ", "seq*2", "2*", "a b", "seq++1", "1.5", "2*3", "s-", "@x", -1, True, 1.5,
                                 None])
def test_dim_parsing_errors(bad: object) -> None:
    with pytest.raises(QirError, match="dimension"):
        dim(bad)  # type: ignore[arg-type]


def test_dim_arithmetic() -> None:
    seq, past = dim("seq"), dim("past")
    assert add(past, 1) == dim("past+1")
    assert add(seq, seq) == dim("2*seq")
    assert sub(add(past, 1), past) == 1 and isinstance(sub(add(past, 1), past), int)
    assert sub(seq, past) == dim("seq-past")
    assert mul(dim("seq+1"), 3) == dim("3*seq+3")
    assert mul(seq, 0) == 0
    assert add(3, 4) == 7
    assert isinstance(seq, SymDim) and seq.symbols == ("seq",)
    assert dim("b+a").symbols == ("a", "b")
    assert repr(dim("past+1")) == "SymDim('past+1')"


def test_evaluate_and_bind() -> None:
    assert evaluate(dim("2*seq-1"), {"seq": 5}) == 9
    assert evaluate(7, {}) == 7
    with pytest.raises(QirError, match="symbolic size 'past' has no value"):
        evaluate(dim("past+1"), {"seq": 3})
    shape = (1, dim("seq"), dim("past+1"), dim("2*seq"))
    bindings: dict[str, int] = {}
    bind(shape, (1, 5, 8, 10), bindings)
    assert bindings == {"seq": 5, "past": 7}
    with pytest.raises(QirError, match="size mismatch"):
        bind(shape, (1, 5, 8, 11), {})
    with pytest.raises(QirError, match="size mismatch"):
        bind((1, dim("seq")), (2, 5), {})
    with pytest.raises(QirError, match="rank mismatch"):
        bind(shape, (1, 5), {})
    pre = {"seq": 4}
    with pytest.raises(QirError, match="size mismatch"):
        bind((dim("seq"),), (5,), pre)  # an already bound symbol must agree


def test_broadcast_and_static_queries() -> None:
    seq = dim("seq")
    assert broadcast((seq, 1), (1, 8)) == (seq, 8)
    assert broadcast((1, seq, 8), (8,)) == (1, seq, 8)
    assert broadcast((seq,), (seq,)) == (seq,)
    assert broadcast((), (2, 3)) == (2, 3)
    with pytest.raises(QirError, match=r"shapes \[seq\] and \[past\] do not broadcast"):
        broadcast((seq,), (dim("past"),))
    with pytest.raises(QirError, match=r"\[2,3\] and \[4\] do not broadcast"):
        broadcast((2, 3), (4,))
    assert is_static((1, 2)) and not is_static((1, seq))
    assert numel((2, 3, 4)) == 24 and numel(()) == 1
    with pytest.raises(QirError, match=r"shape \[1,seq\] has a symbolic size"):
        numel((1, seq))
    assert format_shape((1, seq, dim("past+1"))) == "[1,seq,past+1]"
    t = TensorType.of("i4", [3, "seq"])
    with pytest.raises(QirError, match="has a symbolic size"):
        t.numel()
    assert TensorType.of("i4", [3, 5]).nbytes() == 8  # 15 nibbles pack into 8 bytes


def test_replace_op_keeps_name_place_and_uses() -> None:
    m = Module("r")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 3]))
    a = f.add_op("relu", [x], names=["a"]).result
    b = f.add_op("add", [a, x], names=["b"]).result
    f.set_outputs([b])
    new = f.replace_op(f.ops[0], "neg", [x])
    assert [op.opcode for op in f.ops] == ["neg", "add"]
    assert new.result.name == "a" and f.ops[1].operands[0] is new.result
    verify(m)
