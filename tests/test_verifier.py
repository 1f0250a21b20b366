"""The verifier: one broken module per rule, checked for the rule name and a message that names op and value."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qir.errors import QirError, VerifyError
from qir.graph import Constant, Function, Module, Op, Value
from qir.ops import Attr, OpDef, register_op
from qir.quantspec import QuantSpec
from qir.types import TensorType
from qir.verifier import MAX_READ_ELEMENTS, check, verify, verify_function

F = TensorType.of("f32", [1, "seq", 8])


def _small() -> tuple[Module, Function, Value]:
    """``@main(%x: f32[1,seq,8])`` with ``%a = add %x, %x`` and ``%b = mul %a, %x`` returning ``%b``."""
    m = Module("small")
    f = m.add_function("main")
    x = f.add_input("x", F)
    a = f.add_op("add", [x, x], names=["a"]).result
    b = f.add_op("mul", [a, x], names=["b"]).result
    f.set_outputs([b])
    verify(m)
    return m, f, x


def _fails(m: Module, rule: str, *needles: str) -> VerifyError:
    """``verify`` raises ``rule``, ``check`` lists it, and the error text contains every needle."""
    with pytest.raises(VerifyError) as info:
        verify(m)
    err = info.value
    assert err.rule == rule, str(err)
    text = str(err)
    assert text.startswith(f"verify error [{rule}]")
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert rule in {e.rule for e in check(m)}
    return err


def _poke_quant(t: TensorType, spec: QuantSpec | None) -> TensorType:
    """A type carrying ``spec`` unchecked (types validate on construction; the verifier must re-check)."""
    object.__setattr__(t, "quant", spec)
    return t


# -- valid modules --------------------------------------------------------------------------------------------------
def test_valid_transformer_block_passes(block_module: Module) -> None:
    verify(block_module)
    assert check(block_module) == []
    verify_function(block_module.main)


def test_valid_module_with_several_functions_and_shared_constants() -> None:
    m = Module("two")
    w = m.add_constant("w", np.ones((4, 8), np.float32))
    for name in ("prefill", "decode"):
        f = m.add_function(name)
        x = f.add_input("x", TensorType.of("f32", [1, "seq" if name == "prefill" else 1, 8]))
        f.set_outputs([f.add_op("linear", [x, w], names=["y"]).result])
    verify(m)
    assert check(m) == []


# -- structure / SSA -----------------------------------------------------------------------------------------------
def test_use_before_def() -> None:
    m, f, _ = _small()
    f.ops[0], f.ops[1] = f.ops[1], f.ops[0]
    err = _fails(m, "use-before-def", "op 'mul' uses %a before it is defined", "%b = mul %a, %x")
    assert err.func == "main"


def test_op_using_its_own_result_is_use_before_def() -> None:
    m, f, x = _small()
    op = f.ops[1]
    op.set_operand(1, op.result)
    _fails(m, "use-before-def", "%b", "mul")


def test_foreign_value_from_another_function() -> None:
    m, f, _ = _small()
    g = m.add_function("other")
    y = g.add_input("y", F)
    g.set_outputs([y])
    op = Op("neg", [f.inputs[0]], [Value("n", F)])
    g.insert_op(op)
    g.set_outputs([op.result])
    _fails(m, "foreign-value", "op 'neg' uses %x, which is defined by function @main", "%n = neg %x")


def test_foreign_constant_from_another_module() -> None:
    m, f, x = _small()
    other = Module("other")
    w = other.add_constant("w", np.ones((8,), np.float32))
    op = Op("add", [x, w], [Value("c", F)])
    f.insert_op(op)
    _fails(m, "foreign-value", "constant @w", "not a constant of this function's module", "%c = add %x, @w")


def test_duplicate_name() -> None:
    m, f, _ = _small()
    f.value("b").name = "a"  # bypass Function.rename, which refuses
    _fails(m, "duplicate-name", "value name %a is defined twice in @main", "mul")


@pytest.mark.parametrize("how", ["missing", "extra", "stale", "wrong-index"])
def test_use_list(how: str) -> None:
    m, f, x = _small()
    add, mul = f.ops
    if how == "missing":
        x.uses.remove((mul, 1))
        _fails(m, "use-list", "operand 1 (%x) of op 'mul' is not recorded", "%b = mul %a, %x")
    elif how == "extra":
        x.uses.append((mul, 1))  # recorded twice
        _fails(m, "use-list", "operand 1 (%x) of op 'mul'")
    elif how == "stale":
        ghost = Op("neg", [x], [Value("ghost", F)])  # registers a use of %x but is never inserted
        _fails(m, "use-list", "%x lists a use by", "ghost", "not an op of @main")
        assert ghost.parent is None
    else:
        x.uses.append((add, 5))
        _fails(m, "use-list", "%x lists itself as operand 5 of op 'add'", "%a = add %x, %x")


def test_constant_use_list_outside_every_function() -> None:
    m, f, x = _small()
    w = m.add_constant("w", np.ones((8,), np.float32))
    Op("neg", [w], [Value("ghost", TensorType.of("f32", [8]))])  # never inserted
    _fails(m, "use-list", "constant @w lists a use", "which is in no function")


def test_undefined_output() -> None:
    m, f, _ = _small()
    f.outputs.append(Value("ghost", F))
    _fails(m, "undefined-output", "output %ghost of @main is not an input or a result")


def test_output_may_be_a_module_constant() -> None:
    m, f, _ = _small()
    c = m.add_constant("c", np.zeros((2,), np.float32))
    f.set_outputs([f.outputs[0], c])
    verify(m)


def test_op_parent() -> None:
    m, f, _ = _small()
    f.ops[1].parent = None
    _fails(m, "op-parent", "op 'mul' is listed in @main but its parent is no function", "%b = mul")


def test_op_listed_twice() -> None:
    m, f, _ = _small()
    f.ops.append(f.ops[1])
    _fails(m, "op-parent", "op 'mul' is listed twice", "positions 1 and 2")


def test_function_filed_under_another_name() -> None:
    m, f, _ = _small()
    m.functions["alias"] = m.functions.pop("main")
    _fails(m, "op-parent", "function @main is filed as @alias in module @small")


def test_producer() -> None:
    m, f, _ = _small()
    f.value("b").producer = f.ops[0]
    _fails(m, "producer", "result %b of op 'mul' names", "as its producer")


def test_constant_name() -> None:
    m, f, _ = _small()
    m.constants["alias"] = m.add_constant("w", np.ones(3, np.float32))
    _fails(m, "constant-name", "files @w under the name @alias")


# -- ops ------------------------------------------------------------------------------------------------------------
def test_unknown_op_suggests_close_names() -> None:
    m, f, x = _small()
    f.insert_op(Op("lineer", [x], [Value("y", F)]))
    _fails(m, "unknown-op", "op 'lineer' is not a registered op", "did you mean linear", "%y = lineer %x")


def test_arity() -> None:
    m, f, x = _small()
    f.insert_op(Op("add", [x], [Value("y", F)]))
    _fails(m, "arity", "op add takes 2 operands", "got 1", "%y = add %x")


@pytest.mark.parametrize(("attrs", "message"), [
    ({"axes": 1}, "unknown attribute 'axes'"),
    ({"axis": "last"}, "attribute axis must be int, got 'last'"),
    ({}, "lacks attribute 'axis'"),
])
def test_attribute(attrs: dict, message: str) -> None:
    m, f, x = _small()
    f.insert_op(Op("softmax", [x], [Value("y", F)], attrs))
    _fails(m, "attribute", message, "%y = softmax %x")


def test_missing_required_attribute() -> None:
    m, f, x = _small()
    f.insert_op(Op("transpose", [x], [Value("y", F)]))
    _fails(m, "attribute", "missing required attribute 'perm'", "%y = transpose %x")


def test_result_count() -> None:
    m, f, x = _small()
    f.insert_op(Op("add", [x, x], [Value("y", F), Value("z", F)]))
    _fails(m, "result-count", "op 'add' has 2 results; it defines 1", "%y, %z = add %x, %x")


def test_type_check_reports_inference_errors() -> None:
    m = Module("m")
    w = m.add_constant("w", None, type=TensorType.of("f32", [1536, 512]))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 576]))
    y = f.add_op("linear", [x, w], result_types=[TensorType.of("f32", [1, "seq", 1536])], names=["y"]).result
    f.set_outputs([y])
    _fails(m, "type-check", "op 'linear' rejects its operand types (f32[1,seq,576], f32[1536,512])", "576",
           "512", "%y = linear %x, @w")


def test_type_check_survives_a_crashing_inference() -> None:
    def infer(types: object, attrs: object, declared: object) -> list[TensorType]:
        raise ZeroDivisionError("boom")

    register_op(OpDef("test.crash", ("x",), (Attr("k", "int", 0),), infer, lambda *a: []), replace=True)
    m, f, x = _small()
    f.insert_op(Op("test.crash", [x], [Value("y", F)], {"k": 0}))
    _fails(m, "type-check", "ZeroDivisionError: boom", "test.crash")


def test_result_type_message_matches_the_documented_form() -> None:
    m = Module("m")
    w = m.add_constant("w", None, type=TensorType.of("f32", [1536, 576]))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 576]))
    y = f.add_op("linear", [x, w], result_types=[TensorType.of("f32", [1, "seq", 1535])], names=["y"]).result
    f.set_outputs([y])
    err = _fails(m, "result-type")
    assert str(err) == ("verify error [result-type] in func @main: op 'linear' declares f32[1,seq,1535] for %y "
                        "but its operands give f32[1,seq,1536]\n  at: %y = linear %x, @w : f32[1,seq,1535]")
    assert err.op_text == "%y = linear %x, @w : f32[1,seq,1535]"


def test_result_type_of_a_declared_choice_op() -> None:
    m, f, x = _small()
    spec = QuantSpec.dynamic_spec(axis=2, group_size=8)
    q = f.add_op("quantize", [x], result_types=[TensorType.of("i8", [1, "seq", 8], spec)], names=["q"]).result
    d = f.add_op("dequantize", [q], names=["d"]).result
    verify(m)
    d.type = TensorType.of("f32", [1, "seq", 4])
    _fails(m, "type-check", "dequantize", "%d = dequantize %q")


# -- quantization invariants ---------------------------------------------------------------------------------------
def _weight_module(scale: np.ndarray | None, spec: QuantSpec, *, codes: np.ndarray | None = None,
                   zp: np.ndarray | None = None, shape: tuple[int, ...] = (4, 8), dt: str = "i8") -> Module:
    """``@w`` quantized with ``spec`` (scale constant ``@s``, zero point ``@z``) used by one dequantize."""
    m = Module("q")
    if scale is not None:
        m.add_constant("s", scale)
    if zp is not None:
        m.add_constant("z", zp)
    w = m.add_constant("w", codes, type=TensorType.of(dt, shape, spec))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, shape[1]]))
    f.set_outputs([x, f.add_op("dequantize", [w], names=["y"]).result])
    return m


def test_quantized_weight_module_is_valid() -> None:
    m = _weight_module(np.full((4, 2), 0.5, np.float32), QuantSpec.per_group(1, 4, "s", "z"),
                       codes=np.zeros((4, 8), np.int8), zp=np.zeros((4, 2), np.int8))
    verify(m)


def test_quant_dtype() -> None:
    m, f, _ = _small()
    x = f.inputs[0]
    x.type = _poke_quant(TensorType.of("f32", [1, "seq", 8]), QuantSpec.per_tensor(0.1))
    _fails(m, "quant-dtype", "input %x has type f32[1,seq,8] q(scale=0.1)", "cannot carry a quantization spec")


def test_quant_spec() -> None:
    m, f, _ = _small()
    f.inputs[0].type = _poke_quant(TensorType.of("i8", [1, "seq", 8]), QuantSpec(axis=1, group_size=4, scale="s"))
    _fails(m, "quant-spec", "input %x has an invalid quantized type", "fixed size along axis 1")


def test_quant_ref_missing_constant() -> None:
    m = _weight_module(None, QuantSpec.per_axis(0, "s"))
    _fails(m, "quant-ref", "constant @w has type i8[4,8] q(axis=0, scale=@s), whose scale @s is not a constant")


def test_quant_ref_missing_on_an_op_result() -> None:
    m, f, x = _small()
    t = TensorType.of("i8", [1, "seq", 8], QuantSpec(scale="nowhere"))
    f.add_op("quantize", [x], result_types=[t], names=["q"])
    _fails(m, "quant-ref", "result %q of op 'quantize'", "@nowhere", "%q = quantize %x")


def test_quant_ref_to_itself() -> None:
    m = Module("m")
    m.add_constant("w", None, type=TensorType.of("i8", [4], QuantSpec.per_axis(0, "w")))
    _fails(m, "quant-ref", "constant @w names itself as its own scale")


def test_quant_scale_dtype() -> None:
    m = _weight_module(np.ones(4, np.int32), QuantSpec.per_axis(0, "s"))
    _fails(m, "quant-scale-dtype", "takes its scale from @s of type i32[4]", "double quantization")


@pytest.mark.parametrize(("spec", "scale_shape", "want"), [
    (QuantSpec.per_axis(0, "s"), (8,), "[4] (axis granularity)"),
    (QuantSpec.per_axis(1, "s"), (4,), "[8] (axis granularity)"),
    (QuantSpec.per_group(1, 3, "s"), (4, 2), "[4,3] (group granularity)"),  # 8/3 groups: the last one padded
    (QuantSpec(scale="s"), (1,), "[] (tensor granularity)"),
])
def test_quant_scale_shape(spec: QuantSpec, scale_shape: tuple[int, ...], want: str) -> None:
    m = _weight_module(np.ones(scale_shape, np.float32), spec)
    _fails(m, "quant-scale-shape", "constant @w", "whose scale @s must have shape " + want)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_quant_scale_value(bad: float) -> None:
    scale = np.full(4, 0.25, np.float32)
    scale[2] = bad
    m = _weight_module(scale, QuantSpec.per_axis(0, "s"))
    _fails(m, "quant-scale-value", "takes its scale from @s, which holds", "1 of 4 entries are not finite")


@pytest.mark.parametrize("signed", [0.0, -0.5])
def test_quant_scale_value_signed_only_on_constants(signed: float) -> None:
    """A constant's scales may be 0 or negative (GGUF Q4_0's d = max/-8); a run-time value's may not."""
    scale = np.full(4, 0.25, np.float32)
    scale[2] = signed
    m = _weight_module(scale, QuantSpec.per_axis(0, "s"))
    verify(m)
    f = m.functions["main"]
    f.inputs[0].type = _poke_quant(TensorType.of("i8", [1, 8]), QuantSpec.per_axis(1, "t"))
    m.add_constant("t", np.array([0.5, 0.5, 0.5, signed, 0.5, 0.5, 0.5, 0.5], np.float32))
    _fails(m, "quant-scale-value", "input %x", "takes its scale from @t", "not finite and > 0")


def test_quant_scale_value_literal() -> None:
    m, f, _ = _small()
    f.inputs[0].type = _poke_quant(TensorType.of("i8", [1, "seq", 8]), QuantSpec(scale=-1.0))
    _fails(m, "quant-scale-value", "input %x", "scale must be finite and > 0")


def test_quant_scale_value_through_double_quantization() -> None:
    m = Module("m")
    # u8 codes 0 with zero point 0 dequantize to a scale of exactly 0
    m.add_constant("s", np.array([3, 0, 1, 2], np.uint8), type=TensorType.of("u8", [4], QuantSpec.per_tensor(0.5)))
    m.add_constant("w", np.zeros((4, 8), np.int8), type=TensorType.of("i8", [4, 8], QuantSpec.per_axis(0, "s")))
    verify(m)  # a constant's scale may be 0 (only dequantized)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("i8", [4, 8], QuantSpec.per_axis(0, "s")))
    f.set_outputs([f.add_op("dequantize", [x], names=["y"]).result])
    _fails(m, "quant-scale-value", "input %x takes its scale from @s, which holds 0.0")
    m.constants["s"].data = np.array([3, 1, 1, 2], np.uint8)
    verify(m)


@pytest.mark.parametrize(("zp", "message"), [
    (np.zeros(4, np.float32), "a zero point constant must be a plain integer tensor"),
    (np.zeros(3, np.int8), "whose zero point @z must have shape [4]"),
    (np.array([0, 1, 16, 2], np.uint8), "holds values in [0, 16], outside the u4 storage range [0, 15]"),
])
def test_quant_zero_point(zp: np.ndarray, message: str) -> None:
    m = _weight_module(np.ones(4, np.float32), QuantSpec.per_axis(0, "s", "z"), zp=zp, dt="u4")
    _fails(m, "quant-zero-point", "constant @w", message)


def test_quant_zero_point_literal() -> None:
    m, f, _ = _small()
    f.inputs[0].type = _poke_quant(TensorType.of("i4", [1, "seq", 8]), QuantSpec(scale=0.1, zero_point=9,
                                                                                  symmetric=False))
    _fails(m, "quant-zero-point", "input %x", "zero point 9 lies outside the i4 storage range [-8, 7]")


def test_quant_codes() -> None:
    codes = np.zeros((4, 8), np.int8)
    codes[1, 3] = 9  # i4 holds -8..7; int8 storage lets the bad code exist at all
    m = _weight_module(np.ones(4, np.float32), QuantSpec.per_axis(0, "s"), codes=codes, dt="i4")
    _fails(m, "quant-codes", "constant @w: codes span [0, 9], outside the i4 storage range [-8, 7]")


# -- constants ------------------------------------------------------------------------------------------------------
def test_constant_data_shape() -> None:
    m = Module("m")
    m.add_constant("w", np.ones((4, 8), np.float32), type=TensorType.of("f32", [4, 9]))
    _fails(m, "constant-data", "constant @w is declared f32[4,9] but its data has shape [4, 8]")


def test_constant_data_dtype() -> None:
    m = Module("m")
    m.add_constant("w", np.ones((4, 8), np.float64), type=TensorType.of("f32", [4, 8]))
    _fails(m, "constant-data", "constant @w is declared f32[4,8] but its data has numpy dtype float64")


def test_constant_data_quantized_storage_dtype() -> None:
    # codes that fit i4 but are held as int8 instead of ml_dtypes int4
    m = _weight_module(np.ones(4, np.float32), QuantSpec.per_axis(0, "s"), codes=np.zeros((4, 8), np.int8), dt="i4")
    _fails(m, "constant-data", "declared i4[4,8]", "numpy dtype int8", "i4 data is held as int4")


def test_constant_data_symbolic_shape() -> None:
    m = Module("m")
    m.add_constant("w", np.ones((4,), np.float32), type=TensorType.of("f32", ["n"]))
    _fails(m, "constant-data", "constant @w has data but its declared type f32[n] has a symbolic size")


class _Lazy:
    """A lazy array that counts reads (and can refuse them)."""

    def __init__(self, array: np.ndarray, shape: tuple[int, ...] | None = None, *, readable: bool = True) -> None:
        self.array = array
        self.shape = shape if shape is not None else array.shape
        self.dtype = array.dtype
        self.readable = readable
        self.reads = 0

    def numpy(self) -> np.ndarray:
        self.reads += 1
        if not self.readable:
            raise OSError("disk on fire")
        return self.array


def test_huge_lazy_constants_are_never_read() -> None:
    n = MAX_READ_ELEMENTS + 1
    scale = _Lazy(np.zeros(1, np.float32), shape=(n,), readable=False)  # reading would fail loudly
    m = Module("m")
    m.add_constant("s", scale, type=TensorType.of("f32", [n]))
    m.add_constant("w", _Lazy(np.zeros(1, np.int8), shape=(n, 2), readable=False),
                   type=TensorType.of("i8", [n, 2], QuantSpec.per_axis(0, "s")))
    verify(m)
    assert scale.reads == 0


def test_small_lazy_constants_are_read_and_checked() -> None:
    scale = _Lazy(np.array([0.5, np.inf, 0.5, 0.5], np.float32))
    m = _weight_module(None, QuantSpec.per_axis(0, "s"))
    m.add_constant("s", scale, type=TensorType.of("f32", [4]))
    with pytest.raises(VerifyError, match=r"\[quant-scale-value\].*@s, which holds inf"):
        verify(m)
    assert scale.reads == 1  # read once, cached across the rules that look at it


def test_unreadable_small_lazy_constant_is_reported() -> None:
    m = Module("m")
    m.add_constant("w", _Lazy(np.zeros(4, np.float32), readable=False), type=TensorType.of("f32", [4]))
    _fails(m, "constant-data", "constant @w: its data could not be read (disk on fire)")


# -- collecting and scoping ---------------------------------------------------------------------------------------
def test_check_collects_several_errors() -> None:
    m, f, x = _small()
    m.add_constant("w", np.ones((4, 8), np.float64), type=TensorType.of("f32", [4, 8]))
    f.insert_op(Op("lineer", [x], [Value("y", F)]))
    f.outputs.append(Value("ghost", F))
    errors = check(m)
    assert [e.rule for e in errors] == ["constant-data", "unknown-op", "undefined-output"]
    assert all(isinstance(e, VerifyError) for e in errors)
    with pytest.raises(VerifyError) as info:
        verify(m)
    assert info.value.rule == "constant-data"  # verify stops at the first


def test_check_on_a_valid_block_after_mutation(block_module: Module) -> None:
    f = block_module.main
    f.value("x").type = TensorType.of("f32", [1, "seq", 63])
    rules = [e.rule for e in check(block_module)]
    assert rules.count("result-type") == 1  # rms_norm declares 63 but gives 64
    assert "type-check" in rules  # the qmatmuls now see 63 features against weights of 64


def test_verify_function_checks_only_that_function() -> None:
    m, f, _ = _small()
    g = m.add_function("broken")
    y = g.add_input("y", F)
    g.insert_op(Op("lineer", [y], [Value("z", F)]))
    verify_function(f)
    with pytest.raises(VerifyError, match=r"\[unknown-op\] in func @broken"):
        verify_function(g)


def test_verify_error_is_a_qir_error() -> None:
    m, f, _ = _small()
    f.outputs.append(Value("ghost", F))
    with pytest.raises(QirError):
        verify(m)


def test_constant_values_of_module_built_from_block(block_module: Module) -> None:
    # corrupt one scale of the double-quantized @wq.scale chain: its per-tensor f32 scale goes negative
    c: Constant = block_module.constants["wq.scale"]
    assert c.type.quant is not None
    c.type = _poke_quant(c.type, QuantSpec(scale=-1.0, zero_point=0, symmetric=False))
    _fails(block_module, "quant-scale-value", "constant @wq.scale", "scale must be finite and > 0")


@pytest.mark.parametrize(("offset", "message"), [
    (np.zeros((4, 3), np.float16), "whose offset @o must have shape [4,2] (the scale's layout)"),
    (np.zeros((4, 2), np.int8), "an offset constant must be float, or quantized itself"),
    (np.array([[0.0, np.inf]] * 4, np.float32), "which holds values that are not finite"),
])
def test_quant_offset(offset: np.ndarray, message: str) -> None:
    """``offset=@o`` (GGUF minimums): float (or two-level) in the scale's layout, finite."""
    spec = QuantSpec(axis=1, group_size=4, scale="s", offset="o")
    m = _weight_module(np.ones((4, 2), np.float16), spec, dt="u4", codes=np.zeros((4, 8), ml_dtypes.uint4))
    m.add_constant("o", offset)
    _fails(m, "quant-offset", "constant @w", message)
    m.constants["o"].data = np.full((4, 2), -0.5, np.float16)
    m.constants["o"].type = TensorType.of("f16", [4, 2])
    verify(m)


def test_offset_needs_a_static_spec_with_an_axis() -> None:
    with pytest.raises(QirError, match="an offset .* needs a static spec with an axis"):
        QuantSpec(scale=0.5, offset="o").check(TensorType.of("u4", [4]).dtype, (4,))
    with pytest.raises(QirError, match="an offset .* needs a static spec with an axis"):
        QuantSpec(axis=0, dynamic=True, offset="o").check(TensorType.of("u8", [4]).dtype, (4,))
