"""Tests of the built-in ops: each op run through the interpreter against an independent oracle
(torch CPU functions, the ONNX reference evaluator, hand-written int64 references), plus type
inference with symbolic sizes and its error messages.

``@covers`` records which ops a test checks against an oracle; the last test fails when a
registered op has no such test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from qir import quant
from qir.dtypes import from_numpy
from qir.errors import InterpretError, QirError
from qir.graph import Module
from qir.interpreter import run
from qir.ops import all_ops, get_op
from qir.quant import QTensor
from qir.quantspec import QuantSpec
from qir.types import TensorType
from qir.verifier import verify

COVERED: set[str] = set()
RNG = np.random.default_rng(1234)


def covers(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test as an oracle test of ``names``."""
    COVERED.update(names)
    return lambda fn: fn


class Const:
    """An operand that becomes a module constant instead of a function input."""

    def __init__(self, value: np.ndarray | QTensor, dtype: str | None = None) -> None:
        self.value = value
        self.dtype = dtype


def _type_of(value: np.ndarray | QTensor, dtype: str | None = None) -> TensorType:
    if isinstance(value, QTensor):
        return TensorType(dtype or from_numpy(value.codes.dtype), value.shape, value.spec)
    return TensorType(from_numpy(value.dtype), value.shape)


def build(opcode: str, args: Sequence[Any], attrs: dict[str, Any] | None = None,
          result_types: list[TensorType] | None = None, input_types: dict[int, TensorType] | None = None
          ) -> tuple[Module, list[Any]]:
    """A verified one-op module over ``args`` (arrays / QTensors as inputs, :class:`Const` as constants)."""
    m = Module("t")
    f = m.add_function("main")
    operands, feed = [], []
    for i, a in enumerate(args):
        if isinstance(a, Const):
            v = a.value
            if isinstance(v, QTensor):
                for ref, arr in ((v.spec.scale, v.scale), (v.spec.zero_point, v.zero_point)):
                    if isinstance(ref, str):
                        m.add_constant(ref, np.asarray(arr))
                operands.append(m.add_constant(f"c{i}", v.codes, type=_type_of(v, a.dtype)))
            else:
                operands.append(m.add_constant(f"c{i}", v))
        else:
            t = (input_types or {}).get(i) or _type_of(a)
            operands.append(f.add_input(f"a{i}", t))
            feed.append(a)
    op = f.add_op(opcode, operands, attrs or {}, result_types=result_types, loc=f"test:{opcode}")
    f.set_outputs(op.results)
    verify(m)
    return m, feed


def run_op(opcode: str, *args: Any, attrs: dict[str, Any] | None = None,
           result_types: list[TensorType] | None = None, input_types: dict[int, TensorType] | None = None) -> Any:
    m, feed = build(opcode, args, attrs, result_types, input_types)
    out = run(m, feed)
    return out[0] if len(out) == 1 else out


def T(a: np.ndarray) -> torch.Tensor:  # noqa: N802 - reads like a constructor
    return torch.from_numpy(np.ascontiguousarray(a))


def randn(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def close(got: np.ndarray, want: torch.Tensor | np.ndarray, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    want_np = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want_np.shape, (got.shape, want_np.shape)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want_np, np.float64), atol=atol, rtol=rtol)


# ==================================================================================================
# elementwise
# ==================================================================================================
BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
          "maximum": torch.maximum, "minimum": torch.minimum}


@covers(*BINARY)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_float_broadcasts_like_torch(name: str) -> None:
    a = np.abs(randn(2, 3, 4)) + 0.5 if name == "pow" else randn(2, 3, 4)
    b = randn(3, 1) + (3.0 if name == "div" else 0.0)
    got = run_op(name, a, b)
    assert got.dtype == np.float32
    close(got, BINARY[name](T(a), T(b)))


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "maximum", "minimum", "pow"])
def test_binary_int32_is_exact(name: str) -> None:
    a = RNG.integers(-50, 50, (3, 5)).astype(np.int32)
    b = RNG.integers(1, 4, (5,)).astype(np.int32) * np.array([1, -1, 1, -1, 1], np.int32)
    if name == "pow":
        b = np.abs(b)
    got = run_op(name, a, b)
    want = {"div": lambda x, y: torch.div(x, y, rounding_mode="trunc")}.get(name, BINARY[name])(T(a), T(b))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want.numpy())


def test_integer_overflow_raises_naming_the_op() -> None:
    a = np.array([100, 20], np.int8)
    with pytest.raises(InterpretError, match=r"op add .*test:add.*200 does not fit i8"):
        run_op("add", a, a)


def test_integer_division_by_zero_raises() -> None:
    with pytest.raises(InterpretError, match="division by zero"):
        run_op("div", np.array([1, 2], np.int32), np.array([1, 0], np.int32))


def test_float16_and_bfloat16_compute_in_f32_and_round_once() -> None:
    a, b = randn(4, 8), randn(4, 8)
    h = run_op("add", a.astype(np.float16), b.astype(np.float16))
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, (T(a).half() + T(b).half()).numpy())
    bf = run_op("mul", a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16))
    assert bf.dtype == ml_dtypes.bfloat16
    want = (T(a.astype(ml_dtypes.bfloat16).astype(np.float32)).bfloat16()
            * T(b.astype(ml_dtypes.bfloat16).astype(np.float32)).bfloat16()).float().numpy()
    np.testing.assert_array_equal(bf.astype(np.float32), want)
    g = run_op("gelu", a.astype(np.float16))
    assert g.dtype == np.float16
    close(g, F.gelu(T(a.astype(np.float16)).float()).half(), atol=1e-3, rtol=1e-3)


COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


@covers(*COMPARE)
@pytest.mark.parametrize("name", sorted(COMPARE))
@pytest.mark.parametrize("dt", [np.float32, np.int8])
def test_comparisons_give_bool(name: str, dt: Any) -> None:
    a = RNG.integers(-3, 3, (4, 6)).astype(dt)
    b = RNG.integers(-3, 3, (6,)).astype(dt)
    got = run_op(name, a, b)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, COMPARE[name](T(a), T(b)).numpy())


@covers("and", "or", "not")
def test_bool_logic() -> None:
    a = RNG.random((3, 4)) > 0.5
    b = RNG.random((4,)) > 0.5
    np.testing.assert_array_equal(run_op("and", a, b), torch.logical_and(T(a), T(b)).numpy())
    np.testing.assert_array_equal(run_op("or", a, b), torch.logical_or(T(a), T(b)).numpy())
    np.testing.assert_array_equal(run_op("not", a), torch.logical_not(T(a)).numpy())


UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    # name: (torch oracle, needs a positive input)
    "neg": (torch.neg, False), "abs": (torch.abs, False), "sqrt": (torch.sqrt, True),
    "rsqrt": (torch.rsqrt, True), "exp": (torch.exp, False), "log": (torch.log, True),
    "tanh": (torch.tanh, False), "erf": (torch.erf, False), "gelu": (F.gelu, False), "silu": (F.silu, False),
    "relu": (torch.relu, False), "sigmoid": (torch.sigmoid, False), "sin": (torch.sin, False),
    "cos": (torch.cos, False), "reciprocal": (torch.reciprocal, True),
}


@covers(*UNARY)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_float_matches_torch(name: str) -> None:
    fn, positive = UNARY[name]
    x = randn(3, 17) * 3
    if positive:
        x = np.abs(x) + 0.1
    got = run_op(name, x)
    assert got.dtype == np.float32
    close(got, fn(T(x)))


def test_gelu_tanh_approximation_and_bad_mode() -> None:
    x = randn(64) * 4
    close(run_op("gelu", x, attrs={"approximate": "tanh"}), F.gelu(T(x), approximate="tanh"))
    with pytest.raises(QirError, match="gelu: approximate must be 'none' or 'tanh', got 'fast'"):
        build("gelu", [x], {"approximate": "fast"})


@pytest.mark.parametrize("name", ["neg", "abs", "relu"])
def test_integer_unary(name: str) -> None:
    x = np.array([-5, 0, 7, -127], np.int8)
    np.testing.assert_array_equal(run_op(name, x), UNARY[name][0](T(x)).numpy())
    with pytest.raises(QirError, match="sqrt: x must be a float tensor"):
        build("sqrt", [x])


@covers("cast")
def test_cast_matches_torch() -> None:
    x = np.clip(randn(40) * 50, -127, 127).astype(np.float32)
    x[:3] = [-0.7, 0.7, -1.5]
    to_i8 = run_op("cast", x, result_types=[TensorType.of("i8", [40])])
    np.testing.assert_array_equal(to_i8, T(x).to(torch.int8).numpy())
    close(run_op("cast", x, result_types=[TensorType.of("f16", [40])]), T(x).half(), atol=0, rtol=0)
    i = RNG.integers(-1000, 1000, 40).astype(np.int32)
    np.testing.assert_array_equal(run_op("cast", i, result_types=[TensorType.of("f32", [40])]), T(i).float().numpy())
    np.testing.assert_array_equal(run_op("cast", x, result_types=[TensorType.of("bool", [40])]), T(x).bool().numpy())
    b = x > 0
    np.testing.assert_array_equal(run_op("cast", b, result_types=[TensorType.of("i32", [40])]), T(b).int().numpy())


def test_cast_refuses_out_of_range_and_nan() -> None:
    with pytest.raises(InterpretError, match="300 does not fit i8"):
        run_op("cast", np.array([300.0], np.float32), result_types=[TensorType.of("i8", [1])])
    with pytest.raises(InterpretError, match="NaN or Inf"):
        run_op("cast", np.array([np.nan], np.float32), result_types=[TensorType.of("i32", [1])])
    with pytest.raises(QirError, match="cast: the result dtype is a choice"):
        build("cast", [np.zeros(2, np.float32)])


@covers("where")
def test_where() -> None:
    c = RNG.random((2, 1, 5)) > 0.5
    a, b = randn(3, 5), randn(2, 3, 1)
    got = run_op("where", c, a, b)
    close(got, torch.where(T(c), T(a), T(b)), atol=0, rtol=0)


# ==================================================================================================
# nn
# ==================================================================================================
@covers("softmax")
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(axis: int) -> None:
    x = randn(2, 5, 7) * 10
    close(run_op("softmax", x, attrs={"axis": axis}), torch.softmax(T(x), dim=axis))


@covers("layer_norm")
def test_layer_norm() -> None:
    x, w, b = randn(2, 3, 16) * 3 + 1, randn(16), randn(16)
    close(run_op("layer_norm", x, w, b), F.layer_norm(T(x), (16,), T(w), T(b), eps=1e-5))
    close(run_op("layer_norm", x, attrs={"eps": 1e-3}), F.layer_norm(T(x), (16,), eps=1e-3))


@covers("rms_norm")
def test_rms_norm() -> None:
    x, w = randn(2, 3, 16) * 3, randn(16)
    close(run_op("rms_norm", x, w, attrs={"eps": 1e-5}), F.rms_norm(T(x), (16,), T(w), eps=1e-5))
    close(run_op("rms_norm", x), F.rms_norm(T(x), (16,), eps=1e-6))


@covers("mean", "sum", "max")
@pytest.mark.parametrize("keepdim", [False, True])
def test_reductions(keepdim: bool) -> None:
    x = randn(2, 3, 4, 5)
    attrs = {"axes": [1, -1], "keepdim": keepdim}
    close(run_op("mean", x, attrs=attrs), torch.mean(T(x), dim=(1, 3), keepdim=keepdim))
    close(run_op("sum", x, attrs=attrs), torch.sum(T(x), dim=(1, 3), keepdim=keepdim))
    close(run_op("max", x, attrs=attrs), torch.amax(T(x), dim=(1, 3), keepdim=keepdim), atol=0, rtol=0)
    i = RNG.integers(-100, 100, (4, 50)).astype(np.int32)
    np.testing.assert_array_equal(run_op("sum", i, attrs={"axes": [1]}), torch.sum(T(i), dim=1).numpy())


def test_reduction_errors() -> None:
    with pytest.raises(QirError, match=r"mean: axes entry 3 is out of range for a rank-2 tensor"):
        build("mean", [randn(2, 3)], {"axes": [3]})
    with pytest.raises(QirError, match="name an axis twice"):
        build("sum", [randn(2, 3)], {"axes": [1, -1]})
    with pytest.raises(InterpretError, match="does not fit i8"):
        run_op("sum", np.full((4, 10), 100, np.int8), attrs={"axes": [1]})


def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> torch.Tensor:
    return F.scaled_dot_product_attention(T(q), T(k), T(v), enable_gqa=q.shape[1] != k.shape[1], **kw)


@covers("attention")
def test_attention_gqa_causal_and_masks_match_sdpa() -> None:
    q, k, v = randn(2, 6, 5, 8), randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    close(run_op("attention", q, k, v), _sdpa(q, k, v))
    close(run_op("attention", q, k, v, attrs={"causal": True}), _sdpa(q, k, v, is_causal=True))
    close(run_op("attention", q, k, v, attrs={"scale": 0.3}), _sdpa(q, k, v, scale=0.3))
    bool_mask = RNG.random((2, 1, 5, 5)) > 0.3
    bool_mask[..., 0] = True  # every query keeps a key, so torch has no NaN row
    close(run_op("attention", q, k, v, bool_mask), _sdpa(q, k, v, attn_mask=T(bool_mask)))
    add_mask = randn(5, 5)
    close(run_op("attention", q, k, v, add_mask), _sdpa(q, k, v, attn_mask=T(add_mask)))


def test_attention_causal_is_bottom_right_aligned_for_a_kv_cache() -> None:
    q, k, v = randn(1, 4, 3, 8), randn(1, 4, 7, 8), randn(1, 4, 7, 8)
    # query i sees keys j <= i + (7 - 3): torch's lower-triangular mask shifted by Sk - Sq
    keep = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=7 - 3)
    close(run_op("attention", q, k, v, attrs={"causal": True}), _sdpa(q, k, v, attn_mask=keep))
    # a single decode query sees every key
    close(run_op("attention", q[:, :, -1:], k, v, attrs={"causal": True}), _sdpa(q[:, :, -1:], k, v))


def test_attention_row_without_keys_is_zero_and_f16_is_computed_in_f32() -> None:
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 2, 8), randn(1, 2, 2, 8)
    out = run_op("attention", q, k, v, attrs={"causal": True})  # Sq > Sk: the first 2 queries see nothing
    assert np.all(out[:, :, :2] == 0) and np.all(np.isfinite(out))
    keep = torch.ones(4, 2, dtype=torch.bool).tril(diagonal=-2)
    close(out[:, :, 2:], _sdpa(q, k, v, attn_mask=keep)[:, :, 2:])
    h = run_op("attention", q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert h.dtype == np.float16
    want = _sdpa(q.astype(np.float16).astype(np.float32), k.astype(np.float16).astype(np.float32),
                 v.astype(np.float16).astype(np.float32))
    close(h, want.half(), atol=2e-3, rtol=2e-3)


# ==================================================================================================
# linalg
# ==================================================================================================
@covers("linear")
def test_linear() -> None:
    x, w, b = randn(2, 3, 16), randn(8, 16), randn(8)
    close(run_op("linear", x, Const(w), Const(b)), F.linear(T(x), T(w), T(b)))
    close(run_op("linear", x, w), F.linear(T(x), T(w)))


@covers("matmul")
def test_matmul_numpy_semantics() -> None:
    for sa, sb in [((2, 1, 3, 4), (5, 4, 6)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,)), ((4,), (4,))]:
        a, b = randn(*sa), randn(*sb)
        close(run_op("matmul", a, b), torch.matmul(T(a), T(b)))
    ai = RNG.integers(-100, 100, (3, 40)).astype(np.int32)
    bi = RNG.integers(-100, 100, (40, 2)).astype(np.int32)
    np.testing.assert_array_equal(run_op("matmul", ai, bi), torch.matmul(T(ai), T(bi)).numpy())


@covers("embedding")
def test_embedding() -> None:
    table = randn(10, 4)
    ids = np.array([[0, 9, 3], [3, 3, 1]], np.int64)
    close(run_op("embedding", Const(table), ids), F.embedding(T(ids), T(table)), atol=0, rtol=0)
    with pytest.raises(InterpretError, match=r"embedding: id 10 is outside the table's 10 rows"):
        run_op("embedding", Const(table), np.array([10], np.int64))


# ==================================================================================================
# shape ops
# ==================================================================================================
@covers("reshape")
def test_reshape() -> None:
    x = randn(2, 3, 4)
    close(run_op("reshape", x, attrs={"shape": [4, -1]}), T(x).reshape(4, -1), atol=0)
    close(run_op("reshape", x, attrs={"shape": [24]}), T(x).reshape(24), atol=0)


@covers("transpose")
def test_transpose() -> None:
    x = randn(2, 3, 4)
    close(run_op("transpose", x, attrs={"perm": [2, 0, 1]}), T(x).permute(2, 0, 1), atol=0)


@covers("slice")
def test_slice_python_semantics() -> None:
    x = randn(4, 10)
    for start, end, step in [(2, None, 1), (1, 8, 3), (-3, None, 1), (0, -2, 2), (5, 2, 1)]:
        got = run_op("slice", x, attrs={"axis": 1, "start": start, "end": end, "step": step})
        close(got, T(x)[:, start:end:step], atol=0)
    rev = run_op("slice", x, attrs={"axis": 1, "start": 8, "end": 1, "step": -3})
    cols = list(range(10))[8:1:-3]
    close(rev, x[:, cols], atol=0)


@covers("concat")
def test_concat() -> None:
    a, b, c = randn(2, 1, 3), randn(2, 4, 3), randn(2, 2, 3)
    close(run_op("concat", a, b, c, attrs={"axis": 1}), torch.cat([T(a), T(b), T(c)], dim=1), atol=0)


@covers("gather")
def test_gather() -> None:
    x = randn(3, 5, 2)
    idx = np.array([[4, 0], [-1, 2]], np.int64)
    close(run_op("gather", x, idx, attrs={"axis": 1}), T(x)[:, T(idx)], atol=0)
    flat = np.array([2, 0], np.int32)
    close(run_op("gather", x, flat), torch.index_select(T(x), 0, T(flat)), atol=0)
    with pytest.raises(InterpretError, match="index 5 is out of range for axis 1 of size 5"):
        run_op("gather", x, np.array([5], np.int64), attrs={"axis": 1})


@covers("unsqueeze", "squeeze")
def test_unsqueeze_squeeze() -> None:
    x = randn(2, 1, 3)
    close(run_op("unsqueeze", x, attrs={"axis": -1}), T(x).unsqueeze(-1), atol=0)
    close(run_op("unsqueeze", x, attrs={"axis": 0}), T(x).unsqueeze(0), atol=0)
    close(run_op("squeeze", x, attrs={"axis": 1}), T(x).squeeze(1), atol=0)
    with pytest.raises(QirError, match=r"squeeze: axis 0 of f32\[2,1,3\] has size 2, not 1"):
        build("squeeze", [x], {"axis": 0})


@covers("expand")
def test_expand() -> None:
    x = randn(3, 1)
    close(run_op("expand", x, attrs={"shape": [2, 3, 4]}), T(x).expand(2, 3, 4), atol=0)
    close(run_op("expand", x, attrs={"shape": [-1, 5]}), T(x).expand(-1, 5), atol=0)
    with pytest.raises(QirError, match="only size-1 axes expand"):
        build("expand", [x], {"shape": [2, 4]})


# ==================================================================================================
# quantized ops
# ==================================================================================================
_ONNX_DT = {"i8": 3, "u8": 2, "i4": 22, "u4": 21}  # onnx.TensorProto element types


def onnx_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dt: str, axis: int | None,
                  block: int | None, *, dequantize: bool = False) -> np.ndarray:
    """ONNX QuantizeLinear / DequantizeLinear (opset 21) by the ONNX reference evaluator."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from qir.dtypes import dtype

    npdt = dtype(dt).numpy
    z = np.zeros(scale.shape, npdt) if zp is None else zp.astype(npdt)
    kw: dict[str, int] = {}
    if axis is not None:
        kw["axis"] = axis
    if block is not None:
        kw["block_size"] = block
    op = "DequantizeLinear" if dequantize else "QuantizeLinear"
    in_t, out_t = (_ONNX_DT[dt], TensorProto.FLOAT) if dequantize else (TensorProto.FLOAT, _ONNX_DT[dt])
    node = helper.make_node(op, ["x", "s", "z"], ["y"], **kw)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", in_t, list(x.shape)),
                                        helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape)),
                                        helper.make_tensor_value_info("z", _ONNX_DT[dt], list(scale.shape))],
                          [helper.make_tensor_value_info("y", out_t, list(x.shape))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    (y,) = ReferenceEvaluator(model).run(None, {"x": x, "s": scale.astype(np.float32), "z": z})
    return y


QUANT_CASES = [
    # dt, axis, group, symmetric
    ("i8", None, None, True),
    ("u8", None, None, False),
    ("i8", 0, None, True),
    ("u4", 1, 8, False),
    ("i4", 1, 8, True),
]


@covers("quantize", "dequantize")
@pytest.mark.parametrize("dt,axis,group,symmetric", QUANT_CASES)
def test_static_quantize_and_dequantize_match_onnx(dt: str, axis: int | None, group: int | None,
                                                   symmetric: bool) -> None:
    x = randn(6, 24) * 2
    spec, scale, zp = quant.choose_params(x, dt, symmetric=symmetric, axis=axis, group_size=group,
                                          scale_name="s", zero_point_name="z")
    qtype = TensorType.of(dt, [6, 24], spec)
    m = Module("t")
    if axis is not None:
        m.add_constant("s", scale)
        if zp is not None:
            m.add_constant("z", zp.astype(qtype.dtype.numpy))
    f = m.add_function("main")
    xin = f.add_input("x", TensorType.of("f32", [6, 24]))
    q = f.add_op("quantize", [xin], result_types=[qtype]).result
    d = f.add_op("dequantize", [q]).result
    f.set_outputs([q, d])
    verify(m)
    qt, deq = run(m, [x])
    onnx_scale = np.asarray(scale, np.float32).reshape(np.shape(scale) or ())
    onnx_zp = None if zp is None else np.asarray(zp).reshape(np.shape(zp) or ())
    want = onnx_quantize(x, onnx_scale, onnx_zp, dt, axis, group)
    assert isinstance(qt, QTensor) and qt.codes.dtype == qtype.dtype.numpy
    np.testing.assert_array_equal(qt.codes.astype(np.int32), want.astype(np.int32))
    want_deq = onnx_quantize(want, onnx_scale, onnx_zp, dt, axis, group, dequantize=True)
    np.testing.assert_allclose(deq, want_deq, rtol=1e-6, atol=1e-7)
    assert deq.dtype == np.float32


def test_dynamic_quantize_per_token_matches_torch() -> None:
    x = randn(1, 5, 32) * 3
    x[0, 2] *= 10  # one loud token must not change the others' scales
    spec = QuantSpec.dynamic_spec(axis=2, group_size=32)
    qt = run_op("quantize", x, result_types=[TensorType.of("i8", [1, 5, 32], spec)])
    tx = T(x)
    scale = tx.abs().amax(dim=-1, keepdim=True) / 127
    codes = torch.round(tx / scale).clamp(-128, 127).to(torch.int8)
    np.testing.assert_array_equal(qt.codes, codes.numpy())
    np.testing.assert_allclose(qt.scale, scale.numpy(), rtol=1e-7)
    assert qt.scale.shape == (1, 5, 1) and qt.zero_point is None


def test_quantize_needs_a_declared_quantized_type() -> None:
    with pytest.raises(QirError, match="quantize: the result type is a choice"):
        build("quantize", [randn(2, 3)])
    with pytest.raises(QirError, match="quantize: result must be a quantized type"):
        build("quantize", [randn(2, 3)], result_types=[TensorType.of("i8", [2, 3])])
    with pytest.raises(QirError, match=r"quantize: result shape must be \[2,3\]"):
        build("quantize", [randn(2, 3)], result_types=[TensorType.of("i8", [3, 2], QuantSpec.per_tensor(0.1))])


@covers("requantize")
def test_requantize_equals_quantize_of_dequantize() -> None:
    x = randn(4, 16) * 2
    src = TensorType.of("i8", [4, 16], QuantSpec.dynamic_spec(axis=1, group_size=16))
    dst = TensorType.of("u8", [4, 16], QuantSpec.per_tensor(0.031, 120))
    m = Module("t")
    f = m.add_function("main")
    xin = f.add_input("x", TensorType.of("f32", [4, 16]))
    q = f.add_op("quantize", [xin], result_types=[src]).result
    direct = f.add_op("requantize", [q], result_types=[dst]).result
    viaf = f.add_op("quantize", [f.add_op("dequantize", [q]).result], result_types=[dst]).result
    f.set_outputs([q, direct, viaf])
    verify(m)
    qt, a, b = run(m, [x])
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.dtype == np.uint8
    # and against torch doing the same arithmetic
    deq = (T(qt.codes.astype(np.float32)) * T(qt.scale))
    want = (torch.round(deq / np.float32(0.031)) + 120).clamp(0, 255).to(torch.uint8)
    np.testing.assert_array_equal(a.codes, want.numpy())


def _int_reference(xc: np.ndarray, wc: np.ndarray, groups: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per-group integer accumulators in plain int64 loops over K (the hand-written oracle)."""
    out = []
    for lo, hi in groups:
        acc = np.zeros(xc.shape[:-1] + (wc.shape[0],), np.int64)
        for kk in range(lo, hi):
            acc += xc[..., kk:kk + 1].astype(np.int64) * wc[:, kk].astype(np.int64)
        out.append(acc)
    return out


def _qmatmul_module(x_t: TensorType, w: QTensor, w_dt: str, consts: dict[str, np.ndarray],
                    bias: np.ndarray | None = None) -> Module:
    m = Module("t")
    for name, arr in consts.items():
        m.add_constant(name, arr)
    wc = m.add_constant("w", w.codes, type=TensorType.of(w_dt, w.shape, w.spec))
    f = m.add_function("main")
    x = f.add_input("x", x_t)
    operands = [x, wc] + ([m.add_constant("b", bias)] if bias is not None else [])
    f.set_outputs([f.add_op("qmatmul", operands).result])
    verify(m)
    return m


@covers("qmatmul")
def test_qmatmul_int8_per_tensor_exact() -> None:
    k, n = 64, 5
    xq = RNG.integers(-128, 128, (2, 3, k)).astype(np.int8)
    wq = RNG.integers(-128, 128, (n, k)).astype(np.int8)
    for sx, sw in [(1.0, 1.0), (0.125, 0.0625), (0.0137, 0.0219)]:
        x_t = TensorType.of("i8", [2, 3, k], QuantSpec.per_tensor(sx))
        w = QTensor(wq, np.float32(sw), None, QuantSpec.per_tensor(sw))
        m = _qmatmul_module(x_t, w, "i8", {})
        (y,) = run(m, [xq])
        (acc,) = _int_reference(xq, wq, [(0, k)])
        if (sx, sw) == (1.0, 1.0):
            np.testing.assert_array_equal(y, acc.astype(np.float32))  # the accumulator itself, exactly
        want = acc.astype(np.float32) * (np.float32(sx) * np.float32(sw))
        np.testing.assert_array_equal(y, want)  # epilogue: f32(acc) * (sx * sw), one rounding each


@pytest.mark.parametrize("x_dt,x_sym,w_dt,w_sym", [("i8", True, "i8", True), ("u8", False, "u4", False),
                                                   ("i8", True, "i4", True)])
def test_qmatmul_per_token_x_per_group_weight_exact(x_dt: str, x_sym: bool, w_dt: str, w_sym: bool) -> None:
    from qir.dtypes import dtype

    k, n, g = 48, 6, 16
    wd = dtype(w_dt)
    x = randn(1, 4, k) * 2
    xs = QuantSpec.dynamic_spec(axis=2, group_size=k, symmetric=x_sym)
    wq = RNG.integers(wd.qmin, wd.qmax + 1, (n, k)).astype(wd.numpy)
    sw = (2.0 ** -RNG.integers(2, 6, (n, k // g))).astype(np.float32)  # powers of two: exact products
    zw = None if w_sym else RNG.integers(wd.qmin + 3, wd.qmax - 3, (n, k // g)).astype(wd.numpy)
    wspec = QuantSpec.per_group(1, g, "w.scale", None if w_sym else "w.zp")
    w = QTensor(wq, sw, None if zw is None else zw.astype(np.int32), wspec)
    bias = randn(n)
    consts = {"w.scale": sw} if zw is None else {"w.scale": sw, "w.zp": zw}
    m = _qmatmul_module(TensorType.of(x_dt, [1, 4, k]).with_quant(xs), w, w_dt, consts, bias)
    xqt = quant.quantize_dynamic(x, xs.normalized(3), x_dt)
    (y,) = run(m, [xqt])
    xc = xqt.codes.astype(np.int64)
    if xqt.zero_point is not None:
        xc = xc - xqt.zero_point.astype(np.int64)  # one zero point per token, [1,4,1]
    wc = wq.astype(np.int64)
    if zw is not None:
        wc = wc - np.repeat(zw.astype(np.int64), g, axis=1)
    groups = [(lo, lo + g) for lo in range(0, k, g)]
    accs = _int_reference(xc, wc, groups)
    # with unit scales the output is the sum of the exact integer accumulators
    ones = np.ones_like(sw)
    m1 = _qmatmul_module(TensorType.of(x_dt, [1, 4, k]).with_quant(xs), QTensor(wq, ones, w.zero_point, wspec),
                         w_dt, {**consts, "w.scale": ones})
    unit = QTensor(xqt.codes, np.ones_like(xqt.scale), xqt.zero_point, xqt.spec)
    (y1,) = run(m1, [unit])
    np.testing.assert_array_equal(y1, sum(accs).astype(np.float32))
    want = np.zeros((1, 4, n), np.float32)
    for gi, acc in enumerate(accs):
        want = want + acc.astype(np.float32) * (xqt.scale * sw[:, gi]).astype(np.float32)
    want = want + bias
    np.testing.assert_array_equal(y, want)
    # and it approximates the float product
    close(y, x @ w.dequantize().T + bias, atol=0.5, rtol=0.05)


def test_qmatmul_per_row_weight_per_axis_x_and_short_last_group() -> None:
    k, n = 40, 3
    xq = RNG.integers(-128, 128, (4, k)).astype(np.int8)
    sx = (2.0 ** -RNG.integers(1, 5, 4)).astype(np.float32)  # per axis 0 of x: one scale per row
    wq = RNG.integers(-8, 8, (n, k)).astype(ml_dtypes.int4)
    sw = (2.0 ** -RNG.integers(1, 5, n)).astype(np.float32)
    m = _qmatmul_module(TensorType.of("i8", [4, k], QuantSpec.per_axis(0, "x.scale")),
                        QTensor(wq, sw, None, QuantSpec.per_axis(0, "w.scale")), "i4",
                        {"x.scale": sx, "w.scale": sw})
    (y,) = run(m, [xq])
    (acc,) = _int_reference(xq, wq.astype(np.int64), [(0, k)])
    np.testing.assert_array_equal(y, acc.astype(np.float32) * (sx[:, None] * sw[None, :]))
    # groups of 16 over K=40: the last group has 8 elements
    sg = np.ones((n, 3), np.float32)
    m2 = _qmatmul_module(TensorType.of("i8", [4, k], QuantSpec.per_tensor(1.0)),
                         QTensor(wq, sg, None, QuantSpec.per_group(1, 16, "w.scale")), "i4", {"w.scale": sg})
    (y2,) = run(m2, [xq])
    np.testing.assert_array_equal(y2, acc.astype(np.float32))


def test_qmatmul_weight_only_matches_torch() -> None:
    x, wf = randn(2, 5, 32), randn(12, 32)
    spec, scale, _ = quant.choose_params(wf, "i4", axis=1, group_size=8, scale_name="w.scale")
    w = quant.quantize_spec(wf, spec, "i4", scale)
    m = _qmatmul_module(TensorType.of("f32", [2, 5, 32]), w, "i4", {"w.scale": scale}, randn(12))
    (y,) = run(m, [x])
    deq = T(w.codes.astype(np.float32)) * T(np.repeat(scale, 8, axis=1))
    close(y, F.linear(T(x), deq, T(m.constant("b").numpy())))
    # f16 output when declared
    m16 = Module("t")
    m16.add_constant("w.scale", scale)
    wc = m16.add_constant("w", w.codes, type=TensorType.of("i4", [12, 32], spec))
    f = m16.add_function("main")
    xi = f.add_input("x", TensorType.of("f32", [2, 5, 32]))
    f.set_outputs([f.add_op("qmatmul", [xi, wc], result_types=[TensorType.of("f16", [2, 5, 12])]).result])
    verify(m16)
    (y16,) = run(m16, [x])
    assert y16.dtype == np.float16
    close(y16, F.linear(T(x), deq).half(), atol=2e-3, rtol=2e-3)


def test_qmatmul_type_rules() -> None:
    w_t = TensorType.of("i8", [16, 64], QuantSpec.per_tensor(0.1))
    x_bad = TensorType.of("i8", [1, 64], QuantSpec.per_axis(1, "x.scale"))
    infer = get_op("qmatmul").infer
    with pytest.raises(QirError, match="qmatmul: x has 32 features but w"):
        infer([TensorType.of("f32", [1, 32]), w_t], {}, None)
    with pytest.raises(QirError, match="parameters constant along its last axis"):
        infer([x_bad, w_t], {}, None)
    with pytest.raises(QirError, match="per tensor, per output row"):
        infer([TensorType.of("f32", [1, 64]), w_t.with_quant(QuantSpec.per_axis(1, "s"))], {}, None)
    big = TensorType.of("i16", [16, 4096], QuantSpec.per_tensor(0.1))
    with pytest.raises(QirError, match="int32 accumulator could overflow"):
        infer([TensorType.of("i16", [1, 4096], QuantSpec.per_tensor(0.1)), big], {}, None)
    out = infer([TensorType.of("f32", [1, "seq", 64]), w_t], {}, None)
    assert str(out[0]) == "f32[1,seq,16]"


@covers("qembedding")
@pytest.mark.parametrize("axis,group", [(None, None), (0, None), (1, 4)])
def test_qembedding_equals_dequantize_then_embedding(axis: int | None, group: int | None) -> None:
    table = randn(10, 8)
    spec, scale, zp = quant.choose_params(table, "u8", symmetric=False, axis=axis, group_size=group,
                                          scale_name="t.scale", zero_point_name="t.zp")
    qt = quant.quantize_spec(table, spec, "u8", scale, zp)
    ids = np.array([[1, 9], [0, 1]], np.int64)
    got = run_op("qembedding", Const(qt), ids)
    m, feed = build("dequantize", [Const(qt)])
    deq = run(m, feed)[0]
    want = F.embedding(T(ids), T(deq))
    close(got, want, atol=0, rtol=0)
    assert got.dtype == np.float32
    with pytest.raises(InterpretError, match="qembedding: id -1 is outside"):
        run_op("qembedding", Const(qt), np.array([-1], np.int64))


# ==================================================================================================
# type inference with symbolic sizes
# ==================================================================================================
def infer(opcode: str, types: Sequence[TensorType], **attrs: Any) -> str:
    opdef = get_op(opcode)
    return ", ".join(str(t) for t in opdef.infer(list(types), opdef.complete_attrs(attrs), None))


def t(spec: str, *shape: int | str) -> TensorType:
    return TensorType.of(spec, shape)


def test_infer_symbolic_shapes() -> None:
    assert infer("add", [t("f32", 1, "seq", 576), t("f32", 576)]) == "f32[1,seq,576]"
    assert infer("add", [t("f32", 1, "seq", 1), t("f32", "seq", 4)]) == "f32[1,seq,4]"
    assert infer("lt", [t("i64", "seq", 1), t("i64", 1, "past+seq")]) == "bool[seq,past+seq]"
    assert infer("linear", [t("f32", 1, "seq", 576), t("f32", 1536, 576)]) == "f32[1,seq,1536]"
    assert infer("matmul", [t("f32", 1, 9, "seq", 64), t("f32", 1, 9, 64, "past+1")]) == "f32[1,9,seq,past+1]"
    assert infer("embedding", [t("f32", 100, 8), t("i64", 1, "seq")]) == "f32[1,seq,8]"
    assert infer("reshape", [t("f32", 1, "seq", 576)], shape=[1, "seq", 9, 64]) == "f32[1,seq,9,64]"
    assert infer("reshape", [t("f32", 1, "seq", 9, 64)], shape=[1, "seq", 576]) == "f32[1,seq,576]"
    assert infer("reshape", [t("f32", 1, "seq", 9, 64)], shape=[1, "seq", -1]) == "f32[1,seq,576]"
    assert infer("reshape", [t("f32", 1, "seq", 576)], shape=[-1, 64]) == "f32[9*seq,64]"
    assert infer("reshape", [t("f32", 2, "2*seq", 4)], shape=["seq", -1]) == "f32[seq,16]"
    assert infer("transpose", [t("f32", 1, "seq", 9, 64)], perm=[0, 2, 1, 3]) == "f32[1,9,seq,64]"
    assert infer("slice", [t("f32", 1, "seq")], axis=1, start=2) == "f32[1,seq-2]"
    assert infer("slice", [t("f32", 1, "seq")], axis=1, start=-1) == "f32[1,1]"
    assert infer("slice", [t("f32", 1, "seq")], axis=1, start=1, end=-1) == "f32[1,seq-2]"
    assert infer("slice", [t("f32", 1, "seq")], axis=1, start=0, end=4) == "f32[1,4]"
    assert infer("concat", [t("f32", 1, 2, "past", 64), t("f32", 1, 2, "seq", 64)], axis=2) == \
        "f32[1,2,past+seq,64]"
    assert infer("concat", [t("f32", "past", 4), t("f32", 1, 4)], axis=0) == "f32[past+1,4]"
    assert infer("gather", [t("f32", 10, "seq"), t("i32", 3, 2)], axis=0) == "f32[3,2,seq]"
    assert infer("unsqueeze", [t("f32", "seq", 4)], axis=0) == "f32[1,seq,4]"
    assert infer("squeeze", [t("f32", 1, "seq")], axis=0) == "f32[seq]"
    assert infer("expand", [t("f32", 1, 1, "seq")], shape=[2, 3, -1]) == "f32[2,3,seq]"
    assert infer("softmax", [t("f16", 1, "seq", "seq")]) == "f16[1,seq,seq]"
    assert infer("mean", [t("f32", 1, "seq", 8)], axes=[-1], keepdim=True) == "f32[1,seq,1]"
    assert infer("rms_norm", [t("f32", 1, "seq", 8), t("f32", 8)]) == "f32[1,seq,8]"
    assert infer("attention", [t("f32", 1, 9, "seq", 64), t("f32", 1, 3, "past+seq", 64),
                               t("f32", 1, 3, "past+seq", 64), t("bool", 1, 1, "seq", "past+seq")],
                 causal=True) == "f32[1,9,seq,64]"
    assert infer("dequantize", [TensorType.of("i8", [1, "seq", 8], QuantSpec.dynamic_spec(2, 8))]) == \
        "f32[1,seq,8]"
    assert infer("qembedding", [TensorType.of("i8", [10, 8], QuantSpec.per_axis(0, "s")), t("i64", 1, "seq")]) \
        == "f32[1,seq,8]"


@pytest.mark.parametrize("opcode,types,attrs,message", [
    ("linear", [t("f32", 1, "seq", 576), t("f32", 1536, 512)], {},
     r"linear: x has 576 features but weight \[1536,512\] expects 512"),
    ("linear", [t("f32", 2, 8), t("f16", 4, 8)], {}, "linear: operands must share a dtype"),
    ("add", [t("f32", "seq", 4), t("f32", "past", 4)], {}, r"add: operands .* do not broadcast"),
    ("add", [t("f32", 4), t("i32", 4)], {}, "add: operands must share a dtype.*insert a cast"),
    ("add", [TensorType.of("i8", [4], QuantSpec.per_tensor(0.1)), t("i8", 4)], {},
     "add: a has the quantized type .* dequantize it first"),
    ("and", [t("f32", 4), t("bool", 4)], {}, "and: a must be a bool tensor"),
    ("reshape", [t("f32", 2, 3)], {"shape": [4, 2]}, "reshape: cannot reshape .* 6 elements do not fit in 8"),
    ("reshape", [t("f32", 1, "seq", 576)], {"shape": [1, "past", 576]}, "cannot be shown equal"),
    ("reshape", [t("f32", 1, "seq", 576)], {"shape": [-1, -1]}, "has -1 more than once"),
    ("reshape", [t("f32", "a", "b")], {"shape": [-1]}, "not a whole size"),
    ("reshape", [t("f32", 7, "seq")], {"shape": [2, -1]}, "not a whole size"),
    ("transpose", [t("f32", 2, 3)], {"perm": [0, 0]}, r"transpose: perm \[0, 0\] is not a permutation"),
    ("slice", [t("f32", "seq")], {"axis": 0, "start": 0, "step": 2}, "step of 2 on the symbolic size seq"),
    ("slice", [t("f32", "seq")], {"axis": 0, "start": -2, "end": 3}, "depends on the size"),
    ("slice", [t("f32", 4)], {"axis": 0, "step": 0}, "step must not be 0"),
    ("concat", [t("f32", 2, 3), t("f32", 3, 3)], {"axis": 1}, r"concat: operand 1 f32\[3,3\] does not match"),
    ("matmul", [t("f32", 2, 3), t("f32", 4, 5)], {}, r"matmul: a \[2,3\] has 3 columns but b \[4,5\] has 4 rows"),
    ("embedding", [t("f32", 10, 4), t("f32", 3)], {}, "embedding: ids must be an integer tensor"),
    ("attention", [t("f32", 1, 6, 4, 8), t("f32", 1, 4, 4, 8), t("f32", 1, 4, 4, 8)], {},
     "attention: q has 6 heads, which is not a multiple of the 4 key/value heads"),
    ("attention", [t("f32", 1, 4, 4, 8), t("f32", 1, 4, 4, 8), t("f32", 1, 4, 4, 8), t("f32", 4, 5)], {},
     r"mask f32\[4,5\] does not broadcast to the scores' shape \[1,4,4,4\]"),
    ("attention", [t("f32", 1, 4, 4, 8), t("f32", 1, 4, 4, 16), t("f32", 1, 4, 4, 8)], {},
     "attention: q has head_dim 8 but k"),
    ("layer_norm", [t("f32", 2, 8), t("f32", 4)], {}, r"layer_norm: weight must have shape \[8\]"),
    ("softmax", [t("i32", 2, 8)], {"axis": -1}, "softmax: x must be a float tensor"),
    ("softmax", [t("f32", 2, 8)], {"axis": 2}, "softmax: axis 2 is out of range for a rank-2 tensor"),
    ("dequantize", [t("i8", 4)], {}, "dequantize: q must be quantized"),
])
def test_infer_errors_name_op_and_rule(opcode: str, types: list[TensorType], attrs: dict[str, Any],
                                       message: str) -> None:
    opdef = get_op(opcode)
    with pytest.raises(QirError, match=message):
        opdef.infer(types, opdef.complete_attrs(attrs), None)


def test_choice_ops_check_declared_types() -> None:
    x = t("f32", 2, 3)
    q = TensorType.of("i8", [2, 3], QuantSpec.per_tensor(0.5))
    assert get_op("quantize").infer([x], {}, [q]) == [q]
    assert get_op("requantize").infer([q], {}, [q.with_dtype("u8")])[0].dtype.name == "u8"
    with pytest.raises(QirError, match="requantize: the result type is a choice"):
        get_op("requantize").infer([q], {}, None)
    assert str(get_op("dequantize").infer([q], {}, [t("bf16", 2, 3)])[0]) == "bf16[2,3]"
    with pytest.raises(QirError, match="dequantize: result must be a plain float tensor"):
        get_op("dequantize").infer([q], {}, [t("i32", 2, 3)])
    with pytest.raises(QirError, match=r"cast: a cast keeps the shape"):
        get_op("cast").infer([x], {}, [t("f16", 3, 2)])


def test_symbolic_shapes_run_at_two_lengths() -> None:
    for seq in (3, 7):
        x = randn(1, seq, 12)
        r = run_op("reshape", x, attrs={"shape": [1, "seq", 3, -1]},
                   input_types={0: t("f32", 1, "seq", 12)})
        close(r, T(x).reshape(1, seq, 3, 4), atol=0)
        s = run_op("slice", x, attrs={"axis": 1, "start": 1}, input_types={0: t("f32", 1, "seq", 12)})
        assert s.shape == (1, seq - 1, 12)
        xe = randn(1, seq, 1)
        e = run_op("expand", xe, attrs={"shape": [2, "seq", 4]}, input_types={0: t("f32", 1, "seq", 1)})
        close(e, T(xe).expand(2, seq, 4), atol=0)


# qir/ops/indexing.py (the torch frontend's ops): oracle tests in tests/test_frontend_torch.py (test_op_*).
COVERED.update(("arange", "cumsum", "index", "index_copy", "take_along_axis"))


def test_every_registered_op_has_an_oracle_test() -> None:
    # Ops that other test files register for themselves (their compute lives in tests/) are not qir's.
    builtin = {name: d for name, d in all_ops().items() if d.compute.__module__.startswith("qir.")}
    assert len(builtin) >= 56
    missing = sorted(set(builtin) - COVERED)
    assert not missing, f"ops without an oracle test in tests/test_ops.py: {missing}"
    for name, opdef in builtin.items():
        assert opdef.doc, f"op {name} has no doc line"
