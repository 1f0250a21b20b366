"""Tests of the canonical text format: printer, parser, round trips, float exactness and parse errors.

The tests register their own ops (names starting with ``test.``) so they do not depend on the
built-in op set; one golden file uses the real ops and needs them registered.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qir.ops
from qir.dtypes import ALL_DTYPES, QUANT_STORAGE_DTYPES, DType
from qir.errors import ParseError, SerializationError
from qir.graph import Module, Value
from qir.ops import Attr, OpDef, register_op, unregister_op
from qir.parser import parse, parse_file
from qir.printer import INLINE_LIMIT, format_attrs, format_constant, format_op, is_inline, print_module
from qir.quantspec import QuantSpec
from qir.shapes import dim
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden"
REAL_OPS = ("add", "linear", "softmax", "quantize", "dequantize", "qmatmul")


def _infer(types: Any, attrs: Any, declared: Any) -> list[TensorType]:
    if declared is not None:
        return list(declared)
    return [types[0]] if types else [TensorType.of("f32", [])]


def _compute(ctx: Any, args: Any, attrs: Any, result_types: Any) -> list[Any]:
    return list(args[:len(result_types)])


TEST_ATTRS = (
    Attr("k", "int"), Attr("i", "int", 0), Attr("f", "float", 1.0), Attr("b", "bool", False), Attr("s", "str", ""),
    Attr("ints", "ints", ()), Attr("floats", "floats", ()), Attr("dims", "dims", ()), Attr("oi", "int?", None),
    Attr("of", "float?", None), Attr("os", "str?", None),
)
TEST_OPS = (
    OpDef(name="test.unary", operands=("x",), attrs=(), infer=_infer, compute=_compute),
    OpDef(name="test.binary", operands=("a", "b"), attrs=(), infer=_infer, compute=_compute),
    OpDef(name="test.attrs", operands=("*xs",), attrs=TEST_ATTRS, infer=_infer, compute=_compute),
    OpDef(name="test.split", operands=("x",), attrs=(Attr("n", "int", 2),), infer=_infer, compute=_compute,
          num_results=2),
)


@pytest.fixture(scope="module", autouse=True)
def _test_ops() -> Any:
    """Register the test ops while this file runs, then take them out so other test files see only real ops."""
    before = qir.ops.all_ops()
    for opdef in TEST_OPS:
        register_op(opdef, replace=True)
    yield
    for opdef in TEST_OPS:
        unregister_op(opdef.name)
        if opdef.name in before:
            register_op(before[opdef.name], replace=True)


def roundtrip(text: str, **kw: Any) -> Module:
    m = parse(text, **kw)
    assert print_module(m) == text
    return m


def same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, except that every NaN equals every NaN (the text spells all of them ``nan``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or a.dtype in (np.dtype(ml_dtypes.bfloat16),):
        with np.errstate(invalid="ignore"):
            fa, fb = a.astype(np.float64), b.astype(np.float64)
        nan = np.isnan(fa)
        if not np.array_equal(nan, np.isnan(fb)):
            return False
        width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        return bool(np.array_equal(a.view(width)[~nan], b.view(width)[~nan]))
    return bool(np.array_equal(a.astype(np.int64) if a.dtype.kind != "b" else a,
                               b.astype(np.int64) if b.dtype.kind != "b" else b))


# -- golden files --------------------------------------------------------------------------------------------------
def test_golden_test_ops_roundtrip() -> None:
    text = (GOLDEN / "test_ops.qir").read_text()
    m = roundtrip(text, filename="test_ops.qir")
    assert list(m.functions) == ["prefill", "decode", "nothing"]
    assert m.constants["w"].type.quant == QuantSpec.per_group(1, 32, "w.scale")
    assert m.constants["w"].data is None
    assert m.constants["ids"].numpy().tolist() == [0, -2**63, 2**63 - 1]
    assert m.constants["u4s"].numpy().dtype == np.dtype(ml_dtypes.uint4)
    a = m.functions["prefill"].value("a").producer
    assert a.attrs["s"] == 'tab\there "q" \u00e9'
    assert a.attrs["dims"] == (1, "seq", "past+1")
    assert math.isnan(a.attrs["floats"][2]) and math.copysign(1.0, a.attrs["floats"][3]) == -1.0
    assert a.loc == "model.py:12"
    # use-def lists built through the graph API
    y = m.functions["prefill"].value("y")
    assert [op.opcode for op in y.users()] == ["test.unary"] * 4 + ["test.attrs"]
    assert [op.opcode for op, _ in m.constants["w"].uses] == ["test.attrs"]
    assert m.functions["decode"].outputs[2] is m.constants["eps"]


def test_golden_real_ops_roundtrip() -> None:
    missing = [op for op in REAL_OPS if not qir.ops.has_op(op)]
    assert not missing, f"built-in ops not registered yet: {missing}"
    for path in sorted(GOLDEN.glob("*.qir")):
        text = path.read_text()
        m = roundtrip(text, filename=str(path))
        assert m.functions, path


def test_real_ops_golden_verifies() -> None:
    from qir.verifier import verify

    text = (GOLDEN / "tiny_llm.qir").read_text()
    blobs = {"w": np.zeros((4, 64), ml_dtypes.int4), "w.scale": np.ones((4, 2), np.float16)}
    verify(parse(text, blobs=blobs))


def test_docs_example_roundtrips_and_verifies() -> None:
    from qir.verifier import verify

    doc = (Path(__file__).parents[1] / "docs" / "text-format.md").read_text()
    example = doc.split("## A complete example", 1)[1].split("```\n", 2)[1]
    assert example.startswith("module @tiny\n")
    verify(roundtrip(example, blobs={"w": np.zeros((4, 64), ml_dtypes.int4)}))


def test_default_attrs_are_omitted_for_real_ops() -> None:
    text = GOLDEN_BRIEF.replace("{axis=-1} ", "")
    assert print_module(parse(GOLDEN_BRIEF)) == text
    m = roundtrip(text)
    assert m.main.value("z").producer.attrs == {"axis": -1}


GOLDEN_BRIEF = """module @tiny

const @w : i4[4,64] q(axis=1, group=32, scale=@w.scale) = blob
const @w.scale : f16[4,2] = blob
const @eps : f32[] = dense(1e-05)
const @b : f32[4] = dense(0.5, -1.0, 2.0, 0.25)

func @main(%x: f32[1,seq,64]) -> (f32[1,seq,4]) {
  %y = qmatmul %x, @w, @b : f32[1,seq,4]
  %z = softmax %y {axis=-1} : f32[1,seq,4] loc("model.py:12")
  return %z
}
"""


def test_every_golden_file_is_canonical_and_ascii() -> None:
    for path in sorted(GOLDEN.glob("*.qir")):
        text = path.read_text()
        assert text.endswith("\n") and not text.endswith("\n\n"), path
        assert text.isascii(), path
        assert "  \n" not in text and "\t" not in text, path


# -- programmatic modules ------------------------------------------------------------------------------------------
def build_module() -> Module:
    m = Module("built")
    m.add_constant("w", np.arange(-16, 16, dtype=np.int8).clip(-8, 7).astype(ml_dtypes.int4).reshape(2, 16),
                   type=TensorType.of("i4", [2, 16], QuantSpec.per_group(1, 8, "w.scale")))
    m.add_constant("w.scale", np.array([[0.5, 0.25], [1.5, 3.0]], dtype=np.float16))
    m.add_constant("big", np.linspace(0, 1, INLINE_LIMIT + 1, dtype=np.float32))
    m.add_constant("unloaded", None, type=TensorType.of("bf16", [1000]))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 8]))
    y = f.add_op("test.binary", [x, m.constants["w"]], result_types=[TensorType.of("f32", [1, "seq", 2])],
                 names=["y"], loc="a.py:3").result
    q = f.add_op("test.unary", [y], result_types=[
        TensorType.of("i8", [1, "seq", 2], QuantSpec.dynamic_spec(2, 2, symmetric=False))], names=["q"]).result
    a = f.add_op("test.attrs", [y, q], {"k": 5, "f": 2.5, "ints": [3, 4], "s": "a\nb"}, names=["a"]).result
    lo, hi = f.add_op("test.split", [a], {"n": 3}, result_types=[a.type, a.type], names=["lo", "hi"]).results
    f.set_outputs([lo, hi, q])
    g = m.add_function("empty")
    g.set_outputs([])
    return m


def test_programmatic_module_roundtrip() -> None:
    m = build_module()
    text = print_module(m)
    assert text == (
        "module @built\n\n"
        "const @w : i4[2,16] q(axis=1, group=8, scale=@w.scale) = blob\n"
        "const @w.scale : f16[2,2] = dense(0.5, 0.25, 1.5, 3.0)\n"
        "const @big : f32[17] = blob\n"
        "const @unloaded : bf16[1000] = blob\n\n"
        "func @main(%x: f32[1,seq,8]) -> "
        "(f32[1,seq,2], f32[1,seq,2], i8[1,seq,2] q(axis=2, group=2, dynamic, asym)) {\n"
        '  %y = test.binary %x, @w : f32[1,seq,2] loc("a.py:3")\n'
        "  %q = test.unary %y : i8[1,seq,2] q(axis=2, group=2, dynamic, asym)\n"
        '  %a = test.attrs %y, %q {k=5, f=2.5, s="a\\nb", ints=[3, 4]} : f32[1,seq,2]\n'
        "  %lo, %hi = test.split %a {n=3} : f32[1,seq,2], f32[1,seq,2]\n"
        "  return %lo, %hi, %q\n"
        "}\n\n"
        "func @empty() -> () {\n"
        "  return\n"
        "}\n"
    )
    blobs = {"w": m.constants["w"].data, "big": m.constants["big"].data}
    back = roundtrip(text, blobs=blobs)
    assert back.constants["w"].data is blobs["w"]
    assert back.constants["big"].data is blobs["big"]
    assert back.constants["unloaded"].data is None
    assert same_array(back.constants["w.scale"].numpy(), m.constants["w.scale"].numpy())
    f = back.functions["main"]
    assert f.value("a").producer.attrs == m.functions["main"].value("a").producer.attrs
    assert [(op.opcode, idx) for op, idx in f.value("y").uses] == [("test.unary", 0), ("test.attrs", 0)]
    assert f.value("q").type.quant == QuantSpec.dynamic_spec(2, 2, symmetric=False)


def test_noncanonical_text_prints_canonically() -> None:
    text = (
        "# leading comment\n\n"
        "module   @m    # trailing comment\n"
        "const @c:f32[2]=dense(1, 2.5)   \n"
        "const @s : i8[ 3 ] q( zp=-1 , scale=2 ) = dense(1,2,3)\n"
        "\n\n"
        "func @f( %x : f32[ 2 , seq ] )->( f32[2,seq] ){\n"
        "\n"
        "    %y = test.attrs %x {os=\"a\", k=1, i=0, f=1.0, floats=[1, 2]}:f32[2,seq]   # defaults spelled out\n"
        "  # a comment line\n"
        "  return   %y\n"
        "}"
    )
    assert print_module(parse(text)) == (
        "module @m\n\n"
        "const @c : f32[2] = dense(1.0, 2.5)\n"
        "const @s : i8[3] q(scale=2.0, zp=-1) = dense(1, 2, 3)\n\n"
        "func @f(%x: f32[2,seq]) -> (f32[2,seq]) {\n"
        '  %y = test.attrs %x {k=1, floats=[1.0, 2.0], os="a"} : f32[2,seq]\n'
        "  return %y\n"
        "}\n"
    )


def test_empty_module() -> None:
    assert roundtrip("module @m\n").name == "m"
    m = roundtrip("module @m\n\nconst @a : f32[2,seq] = blob\n")
    assert m.constants["a"].type.shape == (2, dim("seq"))


# -- printer details -----------------------------------------------------------------------------------------------
def test_format_op_and_attrs() -> None:
    m = Module("m")
    f = m.add_function("f")
    x = f.add_input("x", TensorType.of("f32", [2]))
    op = f.add_op("test.attrs", [x], {"k": 1, "i": 0, "b": True, "of": None}, names=["r"], loc='say "hi"')
    assert format_op(op) == '%r = test.attrs %x {k=1, b=true} : f32[2] loc("say \\"hi\\"")'
    opdef = qir.ops.get_op("test.attrs")
    # defaults are compared strictly: True is not 1, -0.0 is not 0.0
    assert format_attrs(opdef, {"k": 1, "i": True}) == "{k=1, i=true}"
    assert format_attrs(opdef, {"k": 1, "f": -0.0}) == "{k=1, f=-0.0}"
    assert format_attrs(opdef, {"k": 1, "f": 1.0, "b": False, "ints": ()}) == "{k=1}"
    assert format_attrs(None, {"z": [1, [2.0, None]], "a": "s"}) == '{a="s", z=[1, [2.0, none]]}'
    assert format_attrs(opdef, {"k": 1, "extra": 2}) == "{k=1, extra=2}"
    assert format_attrs(None, {}) == ""


def test_inline_limit() -> None:
    m = Module("m")
    small = m.add_constant("small", np.arange(INLINE_LIMIT, dtype=np.int32))
    big = m.add_constant("big", np.arange(INLINE_LIMIT + 1, dtype=np.int32))
    none = m.add_constant("none", None, type=TensorType.of("f32", [2]))
    sym = m.add_constant("sym", np.zeros(3, np.float32), type=TensorType.of("f32", ["n"]))

    class Lazy:
        shape = (2,)
        dtype = np.dtype(np.float32)

        def numpy(self) -> np.ndarray:
            return np.array([1.5, -2.0], dtype=np.float32)

    lazy = m.add_constant("lazy", Lazy())
    assert [is_inline(c) for c in (small, big, none, sym, lazy)] == [True, False, False, False, True]
    assert format_constant(small).endswith("= dense(" + ", ".join(str(i) for i in range(INLINE_LIMIT)) + ")")
    assert format_constant(big) == "const @big : i32[17] = blob"
    assert format_constant(lazy) == "const @lazy : f32[2] = dense(1.5, -2.0)"


# -- float exactness -----------------------------------------------------------------------------------------------
FLOAT_WIDTH = {"f64": (64, np.uint64), "f32": (32, np.uint32), "f16": (16, np.uint16), "bf16": (16, np.uint16)}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FLOAT_WIDTH)), st.data())
def test_dense_floats_are_exact(name: str, data: st.DataObject) -> None:
    bits, utype = FLOAT_WIDTH[name]
    raw = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=INLINE_LIMIT))
    dt = qir.dtypes.dtype(name)
    arr = np.array(raw, dtype=utype).view(dt.numpy)
    m = Module("m")
    m.add_constant("c", arr)
    text = print_module(m)
    assert "dense(" in text
    for token in re.search(r"dense\((.*)\)", text).group(1).split(", "):
        assert any(ch in token for ch in ".en"), token
    back = roundtrip(text)
    assert same_array(back.constants["c"].numpy(), arr)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.lists(st.floats(), max_size=4),
       st.floats(min_value=1e-30, max_value=1e30))
def test_float_attrs_and_scales_are_exact(f: float, fs: list[float], scale: float) -> None:
    m = Module("m")
    fn = m.add_function("f")
    x = fn.add_input("x", TensorType.of("i8", [2], QuantSpec.per_tensor(scale)))
    r = fn.add_op("test.attrs", [x], {"k": 0, "f": f, "floats": fs, "of": f}, names=["r"]).result
    fn.set_outputs([r])
    back = roundtrip(print_module(m))
    attrs = back.functions["f"].value("r").producer.attrs
    assert same_float(attrs["f"], f) and same_float(attrs["of"], f)
    assert len(attrs["floats"]) == len(fs) and all(same_float(a, b) for a, b in zip(attrs["floats"], fs))
    assert back.functions["f"].inputs[0].type.quant.scale == float(np.float32(scale))


def test_shortest_float_text() -> None:
    m = Module("m")
    m.add_constant("a", np.array([0.1, 1e-05, 100.0], np.float32))
    m.add_constant("b", np.array([0.1, 1.0], ml_dtypes.bfloat16))
    m.add_constant("c", np.array([0.1, 65504.0], np.float16))
    m.add_constant("d", np.array([0.1, 1 / 3], np.float64))
    text = print_module(m)
    assert "const @a : f32[3] = dense(0.1, 1e-05, 100.0)" in text
    assert "const @b : bf16[2] = dense(0.1, 1.0)" in text
    assert "const @c : f16[2] = dense(0.1, 6.55e+04)" in text
    assert "const @d : f64[2] = dense(0.1, 0.3333333333333333)" in text


# -- symbolic dims and quantization specs --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["seq", "past+1", "2*seq-1", "-seq+4", "a+b", "3*n"])
def test_symbolic_dims_roundtrip(text: str) -> None:
    src = f"module @m\n\nconst @c : f32[1,{text}] = blob\n"
    m = roundtrip(src)
    assert m.constants["c"].type.shape == (1, dim(text))


@pytest.mark.parametrize("spec", [
    "q(scale=0.0486)",
    "q(scale=0.0486, zp=1)",
    "q(scale=@s)",
    "q(scale=@s, zp=@z)",
    "q(axis=0, scale=@s)",
    "q(axis=1, scale=@s, zp=@z)",
    "q(axis=1, group=32, scale=@s)",
    "q(axis=1, group=32, scale=@s, zp=@z)",
    "q(dynamic)",
    "q(dynamic, asym)",
    "q(axis=0, dynamic)",
    "q(axis=1, group=16, dynamic)",
    "q(axis=1, group=16, dynamic, asym)",
])
@pytest.mark.parametrize("storage", ["i8", "u8", "i4", "u4", "i2", "i16", "i32"])
def test_quant_specs_roundtrip(spec: str, storage: str) -> None:
    src = f"module @m\n\nconst @c : {storage}[4,64] {spec} = blob\n"
    m = roundtrip(src)
    q = m.constants["c"].type.quant
    assert q.dynamic == ("dynamic" in spec)
    assert q.symmetric == ("zp=" not in spec and "asym" not in spec)
    assert q.granularity == ("group" if "group" in spec else "axis" if "axis" in spec else "tensor")


# -- random valid modules ------------------------------------------------------------------------------------------
NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,5}", fullmatch=True)
SYM_DIMS = ["seq", "past+1", "2*seq-1", "n_1", "-seq+4"]


@st.composite
def tensor_types(draw: st.DrawFn, max_rank: int = 3) -> TensorType:
    dt = draw(st.sampled_from(ALL_DTYPES))
    shape = tuple(dim(d) for d in draw(st.lists(
        st.one_of(st.integers(0, 5), st.sampled_from(SYM_DIMS)), max_size=max_rank)))
    if dt not in QUANT_STORAGE_DTYPES or not draw(st.booleans()):
        return TensorType(dt, shape)
    kind = draw(st.sampled_from(["tensor", "axis", "group", "dynamic"] if shape else ["tensor", "dynamic"]))
    ref = NAME
    if kind == "tensor":
        scale = draw(st.floats(min_value=1e-30, max_value=1e30))
        zp = draw(st.one_of(st.none(), st.integers(dt.qmin, dt.qmax)))
        if draw(st.booleans()):
            spec = QuantSpec.per_tensor(scale, zp)
        else:
            spec = QuantSpec(scale=draw(ref), zero_point=None if zp is None else draw(ref), symmetric=zp is None)
    elif kind == "dynamic":
        axis = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1))) if shape else None
        group = draw(st.one_of(st.none(), st.integers(1, 64))) if axis is not None else None
        spec = QuantSpec.dynamic_spec(axis, group, symmetric=draw(st.booleans()))
    else:
        axis = draw(st.integers(0, len(shape) - 1))
        zp = draw(st.one_of(st.none(), ref))
        if kind == "group" and isinstance(shape[axis], int):
            spec = QuantSpec.per_group(axis, draw(st.integers(1, 64)), draw(ref), zp)
        else:
            spec = QuantSpec.per_axis(axis, draw(ref), zp)
    return TensorType(dt, shape, spec)


def random_data(draw: st.DrawFn, dt: DType, n: int) -> np.ndarray:
    if dt.is_float:
        bits, utype = FLOAT_WIDTH[dt.name]
        return np.array(draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), utype).view(dt.numpy)
    if dt.kind == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_)
    ints = draw(st.lists(st.integers(dt.qmin, dt.qmax), min_size=n, max_size=n))
    return np.array(ints, dtype=np.int64).astype(dt.numpy)


ATTR_VALUES = {
    "k": st.integers(-2**70, 2**70), "i": st.integers(-5, 5), "f": st.floats(), "b": st.booleans(),
    "s": st.text(max_size=8), "ints": st.lists(st.integers(-9, 9), max_size=3),
    "floats": st.lists(st.floats(), max_size=3),
    "dims": st.lists(st.one_of(st.integers(0, 9), st.sampled_from(SYM_DIMS)), max_size=3),
    "oi": st.one_of(st.none(), st.integers()), "of": st.one_of(st.none(), st.floats()),
    "os": st.one_of(st.none(), st.text(max_size=5)),
}


@st.composite
def modules(draw: st.DrawFn) -> Module:
    m = Module(draw(NAME))
    for cname in draw(st.lists(NAME, unique=True, max_size=4)):
        t = draw(tensor_types())
        data = None
        if t.is_static and t.numel() <= INLINE_LIMIT and draw(st.booleans()):
            data = random_data(draw, t.dtype, t.numel()).reshape(tuple(int(d) for d in t.shape))
        m.add_constant(cname, data, type=t)
    for fname in draw(st.lists(NAME, unique=True, min_size=1, max_size=2)):
        f = m.add_function(fname)
        names = iter(draw(st.lists(NAME, unique=True, min_size=12, max_size=12)))
        avail: list[Value] = list(m.constants.values())
        for _ in range(draw(st.integers(0, 2))):
            avail.append(f.add_input(next(names), draw(tensor_types())))
        for _ in range(draw(st.integers(0, 4))):
            opcode = draw(st.sampled_from(["test.unary", "test.binary", "test.attrs", "test.split"]))
            if opcode != "test.attrs" and not avail:
                opcode = "test.attrs"
            if opcode == "test.binary":
                operands = [draw(st.sampled_from(avail)), draw(st.sampled_from(avail))]
            elif opcode == "test.attrs":
                operands = draw(st.lists(st.sampled_from(avail), max_size=3)) if avail else []
            else:
                operands = [draw(st.sampled_from(avail))]
            attrs: dict[str, Any] = {}
            if opcode == "test.attrs":
                attrs = {"k": draw(ATTR_VALUES["k"])}
                for key in draw(st.lists(st.sampled_from(sorted(ATTR_VALUES)), unique=True, max_size=5)):
                    attrs[key] = draw(ATTR_VALUES[key])
            elif opcode == "test.split" and draw(st.booleans()):
                attrs = {"n": draw(st.integers(-3, 3))}
            n_results = 2 if opcode == "test.split" else 1
            types = [draw(tensor_types()) for _ in range(n_results)]
            loc = draw(st.one_of(st.none(), st.text(max_size=10)))
            op = f.add_op(opcode, operands, attrs, result_types=types, names=[next(names) for _ in types], loc=loc)
            avail += op.results
        f.set_outputs(draw(st.lists(st.sampled_from(avail), max_size=3)) if avail else [])
    return m


def same_attr(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(same_attr(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and same_float(a, b)
    return type(a) is type(b) and a == b


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(modules())
def test_random_modules_roundtrip(m: Module) -> None:
    text = print_module(m)
    back = roundtrip(text, filename="random.qir")
    assert list(back.constants) == list(m.constants)
    for name, c in m.constants.items():
        b = back.constants[name]
        assert b.type == c.type
        if is_inline(c):
            assert same_array(b.numpy(), c.numpy())
        else:
            assert b.data is None
    for fname, f in m.functions.items():
        g = back.functions[fname]
        assert [v.type for v in g.inputs] == [v.type for v in f.inputs]
        assert [v.name for v in g.outputs] == [v.name for v in f.outputs]
        for op, bop in zip(f.ops, g.ops, strict=True):
            assert bop.opcode == op.opcode and bop.loc == op.loc
            assert [v.ref for v in bop.operands] == [v.ref for v in op.operands]
            assert [r.type for r in bop.results] == [r.type for r in op.results]
            assert set(bop.attrs) == set(op.attrs)
            assert all(same_attr(op.attrs[k], bop.attrs[k]) for k in op.attrs)
        for v, bv in zip(f.values(), g.values(), strict=True):
            assert [(o.opcode, i) for o, i in bv.uses] == [(o.opcode, i) for o, i in v.uses]


# -- fuzzing: only ParseError may escape ---------------------------------------------------------------------------
def only_parse_error(text: str) -> Module | None:
    try:
        m = parse(text, filename="fuzz.qir")
    except ParseError as exc:
        assert "internal parser error" not in str(exc), str(exc)
        assert exc.file == "fuzz.qir" and exc.line >= 1 and exc.col >= 1
        assert str(exc).startswith(f"fuzz.qir:{exc.line}:{exc.col}: error: ")
        return None
    # Whatever parses prints, and its canonical text is a fixed point.
    canonical = print_module(m)
    assert print_module(parse(canonical)) == canonical
    return m


GRAMMAR_CHARS = "%@:=,{}[]()\"#\\-+.*0123456789 \n\tqaxisgroupscalezpdynamicfuncconstreturnblobdensefi4u8loc>"


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=GRAMMAR_CHARS, max_size=120)))
def test_fuzz_random_text(text: str) -> None:
    only_parse_error(text)
    only_parse_error("module @m\n" + text)
    only_parse_error("module @m\n\nfunc @f(%x: f32[2]) -> (f32[2]) {\n" + text)


FUZZ_BASE = (GOLDEN / "test_ops.qir").read_text()


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_fuzz_mutated_text(data: st.DataObject) -> None:
    text = FUZZ_BASE
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "drop_line", "swap_lines"]))
        pos = data.draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 6)):]
        elif kind == "insert":
            text = text[:pos] + data.draw(st.text(alphabet=GRAMMAR_CHARS, min_size=1, max_size=4)) + text[pos:]
        elif kind == "replace":
            text = text[:pos] + data.draw(st.text(min_size=1, max_size=2)) + text[pos + 1:]
        else:
            lines = text.split("\n")
            i = data.draw(st.integers(0, len(lines) - 1))
            j = data.draw(st.integers(0, len(lines) - 1))
            if kind == "dup_line":
                lines.insert(j, lines[i])
            elif kind == "drop_line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    only_parse_error(text)


def test_deep_nesting_and_long_numbers_are_parse_errors() -> None:
    head = "module @m\n\nfunc @f(%x: f32[2]) -> (f32[2]) {\n  %y = test.attrs %x {k=1, dims="
    with pytest.raises(ParseError, match="nested more than"):
        parse(head + "[" * 5000 + "]" * 5000 + "} : f32[2]\n  return %y\n}\n")
    with pytest.raises(ParseError, match="too long"):
        parse(head.replace("dims=", "i=") + "9" * 5000 + "} : f32[2]\n  return %y\n}\n")
    with pytest.raises(ParseError, match="too long"):
        parse("module @m\n\nconst @c : f32[" + "9" * 5000 + "] = blob\n")


# -- error messages ------------------------------------------------------------------------------------------------
BASE = """module @m

const @w : i4[4,64] q(axis=1, group=32, scale=@w.scale) = blob
const @w.scale : f16[4,2] = blob
const @b : f32[4] = dense(0.5, -1.0, 2.0, 0.25)

func @main(%x: f32[1,seq,64]) -> (f32[1,seq,4]) {
  %y = test.binary %x, @w : f32[1,seq,4]
  %z = test.attrs %y {k=1, s="hi"} : f32[1,seq,4] loc("model.py:12")
  return %z
}
"""


def test_base_text_is_canonical() -> None:
    roundtrip(BASE)


ERRORS = [
    # (old, new, line, col, message fragment)
    ("%y {k=1", "%y : {k=1", 9, 24, "expected a type such as f32[1,seq,64], found '{'"),
    ("%y {k=1, s=\"hi\"} :", "%y {k=1, s=\"hi\"}", 9, 36, "expected ':' after the attributes, found 'f32'"),
    ("%x, @w :", "%x, @w f32", 8, 27, "expected ':' after operands, found 'f32'"),
    ("test.attrs", "test.atrs", 9, 8, "unknown op 'test.atrs'; did you mean test.attrs"),
    ("%y {k=1", "%yy {k=1", 9, 19, "use of undefined value %yy"),
    ("%x, @w :", "%x, @v :", 8, 24, "use of undefined constant @v"),
    ("%z = test", "%y = test", 9, 3, "value %y defined twice (first defined on line 8)"),
    ("const @b :", "const @w :", 5, 7, "duplicate constant @w (first defined on line 3)"),
    (": f32[1,seq,4]\n  %z", ": f32[1,seq,4], f32[2]\n  %z", 8, 29, "op test.binary has 1 result but 2 types"),
    ("%x: f32[1,seq,64]", "%x: f32[1,s q,64]", 7, 22, "bad symbolic dimension 's q'"),
    ("%x: f32[1,seq,64]", "%x: f32[1,-3,64]", 7, 22, "sizes must be >= 0"),
    ("%x: f32[1,seq,64]", "%x: f32[1,seq,64", 7, 28, "expected ']' to close the shape"),
    ("f16[4,2]", "f17[4,2]", 4, 18, "unknown dtype 'f17'; known dtypes: f64, f32"),
    ('loc("model.py:12")', 'loc("model.py:12)', 9, 55, "unterminated string"),
    ('s="hi"', 's="h\\qi"', 9, 32, "bad string literal: Invalid \\escape"),
    ("  return %z\n}\n", "  return %z\n", 11, 1, "expected '}' after return to close func @main, found end of file"),
    ("  return %z\n}\n", "", 10, 1, "expected 'return' and '}' to close func @main, found end of file"),
    ("0.25)", "0.25, 1.0)", 5, 21, "dense value of @b has 5 elements but its type f32[4] holds 4"),
    ("return %z\n}\n", "return %z\n}\ngarbage\n", 12, 1, "expected 'const' or 'func' at the start of a top-level line"),
    ("return %z\n}\n", "return %z\n} x\n", 11, 3, "expected end of line after '}' closing func @main, found 'x'"),
    ('loc("model.py:12")', 'loc("model.py:12") extra', 9, 70, "expected end of line after the op"),
    ("{k=1,", "{k=1.5,", 9, 25, "op test.attrs: attribute k must be int, got 1.5"),
    ("{k=1,", "{k=seq,", 9, 25, "expected an attribute value (int, float, true/false, none, \"string\" or [list])"),
    ("{k=1,", "{kk=1,", 9, 23, "op test.attrs has no attribute 'kk' (attributes: k, i, f, b, s, ints"),
    ("{k=1, s=\"hi\"}", "{s=\"hi\"}", 9, 22, "op test.attrs: missing required attribute 'k'"),
    ("{k=1, s=\"hi\"}", "{k=1, k=2}", 9, 28, "attribute 'k' given twice"),
    ("group=32, scale=@w.scale)", "group=32, scale=@w.scale, zp=3)", 3, 21,
     "invalid quantized type i4[4,64]: a group spec needs a zero-point constant, not the literal 3"),
    ("q(axis=1, group=32,", "q(axis=1, grp=32,", 3, 31, "expected a quantization parameter (axis=, group="),
    ("-> (f32[1,seq,4])", "-> (f32[1,seq,5])", 10, 3,
     "func @main declares result types (f32[1,seq,5]) but returns %z: f32[1,seq,4]"),
    ("  %y = test.binary", "  test.binary", 8, 3, "op test.binary has no results"),
    ("module @m", "modul @m", 1, 1, "expected 'module' at the start of the file"),
    ("module @m", "module @.m", 1, 9, "invalid module name '.m'"),
    ("func @main", "func @main\n", 7, 11, "expected '(' after the function name @main, found end of line"),
    ("  return %z\n", "  return %z\n  %q = test.unary %z : f32[2]\n", 11, 3, "expected '}' after return"),
    ("  return %z\n", "}\n", 10, 1, "expected 'return' before '}' in func @main"),
]


@pytest.mark.parametrize("old,new,line,col,fragment", ERRORS)
def test_error_messages(old: str, new: str, line: int, col: int, fragment: str) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    with pytest.raises(ParseError) as info:
        parse(text, filename="bad.qir")
    exc = info.value
    assert (exc.file, exc.line, exc.col) == ("bad.qir", line, col), str(exc)
    assert fragment in exc.reason, str(exc)
    message = str(exc)
    assert message.startswith(f"bad.qir:{line}:{col}: error: ")
    source_line = text.split("\n")[line - 1]
    assert message.endswith(f"\n  {source_line}\n  {' ' * (col - 1)}^")


def test_unknown_op_suggests_close_matches() -> None:
    with pytest.raises(ParseError, match=r"did you mean test\.unary"):
        parse(BASE.replace("test.binary", "test.unry"))


def test_quant_error_points_at_q() -> None:
    text = "module @m\n\nconst @c : i8[2,3] q(scale=0.5, zp=-300) = dense(1, 2, 3, 4, 5, 6)\n"
    with pytest.raises(ParseError) as info:
        parse(text)
    assert (info.value.line, info.value.col) == (3, 20)
    assert "zero point -300 lies outside the i8 storage range [-128, 127]" in info.value.reason


@pytest.mark.parametrize("init,fragment", [
    ("dense(1, 2, 3, 4, 5, 300)", "dense element 300 of @c is outside the i8 range [-128, 127]"),
    ("dense(1, 2, 3, 4, 5, 6.5)", "expected an integer (an i8 element), found the float '6.5'"),
    ("dense(1 2)", "expected ',' or ')' between dense elements, found '2'"),
    ("bloob", "expected 'blob' or 'dense(...)' as the value of @c, found 'bloob'"),
])
def test_dense_errors(init: str, fragment: str) -> None:
    with pytest.raises(ParseError, match=re.escape(fragment)):
        parse(f"module @m\n\nconst @c : i8[2,3] = {init}\n")


def test_dense_needs_static_shape() -> None:
    with pytest.raises(ParseError, match="dense data needs a static shape"):
        parse("module @m\n\nconst @c : f32[n] = dense(1.0)\n")


def test_graph_errors_become_parse_errors() -> None:
    # the graph refuses a second function of the same name; the parser reports it at the name
    text = BASE + "\nfunc @main() -> () {\n  return\n}\n"
    with pytest.raises(ParseError, match="duplicate function @main") as info:
        parse(text)
    assert (info.value.line, info.value.col) == (13, 6)


# -- blobs and files -----------------------------------------------------------------------------------------------
def test_blobs_mapping() -> None:
    w = np.zeros((4, 64), ml_dtypes.int4)
    m = parse(BASE, blobs={"w": w})
    assert m.constants["w"].data is w
    assert m.constants["w.scale"].data is None
    assert parse(BASE).constants["w"].data is None
    assert m.constants["b"].numpy().tolist() == [0.5, -1.0, 2.0, 0.25]


def test_parse_file(tmp_path: Path) -> None:
    path = tmp_path / "model.qir"
    path.write_text(BASE)
    assert print_module(parse_file(path)) == BASE
    path.write_text(BASE.replace("test.binary", "test.nope"))
    with pytest.raises(ParseError) as info:
        parse_file(path)
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}:8:8: error: unknown op 'test.nope'")
    path.write_bytes(b"module @m\n\nconst @c : f32[2] = bl\xffob\n")
    with pytest.raises(ParseError, match="not valid UTF-8") as info:
        parse_file(path)
    assert (info.value.line, info.value.col) == (3, 23)
    with pytest.raises(SerializationError, match="cannot read"):
        parse_file(tmp_path / "missing.qir")
