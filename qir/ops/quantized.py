"""Quantized ops: quantize, dequantize, requantize, qmatmul and qembedding.

At run time a value of a quantized type is a :class:`qir.quant.QTensor`
(codes plus scale and zero point in the spec's layout); the arithmetic is that
of :mod:`qir.quant` (``q = clamp(rint(x/scale) + zp)``, ``x~ = scale*(q - zp)``).

``qmatmul (x, w, bias?)`` computes ``x @ w~.T + bias`` for a quantized weight
``w [N, K]`` (per tensor, per output row = axis 0, or per group along axis 1):

* x float (weight-only): ``y = f32(x) @ dequantize(w).T + bias``, all in f32.
* x quantized with parameters constant along K (per tensor; per token = a group
  along the last axis with group_size >= K; per axis on another axis): the
  integer path. For each weight group ``g`` (one group spanning K unless the
  weight is per group), in group order::

      acc_g = (xq - zx)[..., g] @ (wq - zw)[:, g].T       exact integer, int32 accumulator
      y    += f32(acc_g) * (sx * sw[:, g])                  f32: sx*sw first, then the product, then the sum

  except for a symmetric activation whose scale varies per row (per token) times a weight with one group
  along K (per tensor or per row), where ``y = (f32(acc) * sw) * sx``: the weight scale is applied first, as
  ONNX Runtime's ``MatMulIntegerToFloat`` does inside its GEMM (its activation scale is per tensor only), so
  the ``ort-cpu`` lowering keeps that fused kernel and stays bit-exact.

  then ``y + bias`` in f32, then the cast to the result dtype (f32 default; f16
  or bf16 when declared). Type inference refuses operands whose accumulator
  could overflow int32 (``depth * max|xq - zx| * max|wq - zw| >= 2**31``, depth
  being K or the group size). The accumulation runs as a float64 matmul, which
  is exact here because every partial sum stays below 2**31 < 2**53.

``qembedding (table, ids)`` dequantizes only the rows it gathers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qir.dtypes import DType
from qir.errors import QirError
from qir.ops.common import (
    as_float,
    as_int,
    declared_float,
    declared_one,
    define,
    fail,
    need_float,
    need_integer,
)
from qir.ops.linalg import check_ids
from qir.quant import QTensor, quantize_dynamic, quantize_spec
from qir.quantspec import QuantSpec
from qir.shapes import format_shape
from qir.types import TensorType

Array = np.ndarray
INT32_MAX = 2**31 - 1


def need_quantized(op: str, role: str, t: TensorType) -> QuantSpec:
    if t.quant is None:
        fail(op, f"{role} must be quantized, got the plain type {t}")
    return t.quant


def _declared_quantized(op: str, declared: Sequence[TensorType] | None, src: TensorType) -> list[TensorType]:
    d = declared_one(op, declared)
    if d is not None and d.quant is not None and d.quant.offset is not None:
        fail(op, f"cannot quantize into {d}: a spec with an offset describes stored weights (GGUF minimums) and "
                 f"is only ever dequantized")
    if d is None:
        fail(op, f"the result type is a choice: give result_types, e.g. "
                 f"[TensorType(i8, {format_shape(src.shape)}, QuantSpec.per_tensor(0.05))]")
    if not d.is_quantized:
        fail(op, f"result must be a quantized type, but {d} is declared")
    if d.shape != src.shape:
        fail(op, f"result shape must be {format_shape(src.shape)} like its operand, but {d} is declared")
    return [d]


def quantize_to(ctx: Any, x: Array, t: TensorType) -> QTensor:
    """Quantize float ``x`` to the quantized type ``t`` (dynamic: parameters from the data)."""
    assert t.quant is not None
    if t.quant.dynamic:
        return quantize_dynamic(x, t.quant, t.dtype)
    scale, zp = ctx.params(t)
    return quantize_spec(x, t.quant, t.dtype, scale, zp)


# -- quantize / dequantize / requantize ------------------------------------------------------------------------
def _quantize_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    need_float("quantize", "x", types[0])
    return _declared_quantized("quantize", declared, types[0])


def _quantize_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                      ) -> list[Any]:
    return [quantize_to(ctx, as_float(args[0], np.dtype(np.float32)), rt[0])]


define("quantize", ("x",), (), _quantize_infer, _quantize_compute,
       "float -> the declared quantized type (static parameters, or dynamic: min/max per group)", "quant")


def _dequantize_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    need_quantized("dequantize", "q", types[0])
    return declared_float("dequantize", declared, types[0].shape)


def _dequantize_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                        ) -> list[Array]:
    return [args[0].dequantize().astype(rt[0].dtype.numpy, copy=False)]


define("dequantize", ("q",), (), _dequantize_infer, _dequantize_compute,
       "scale * (q - zero_point) as a float of the same shape (f32 unless declared)", "quant")


def _requantize_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    need_quantized("requantize", "q", types[0])
    return _declared_quantized("requantize", declared, types[0])


def _requantize_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                        ) -> list[Any]:
    return [quantize_to(ctx, args[0].dequantize(), rt[0])]


define("requantize", ("q",), (), _requantize_infer, _requantize_compute,
       "quantize(dequantize(q)) to the declared quantized type, in f32", "quant")


# -- qmatmul ---------------------------------------------------------------------------------------------------
def code_range(dt: DType, spec: QuantSpec) -> int:
    """The largest ``|q - zero_point|`` a ``dt`` code can have under ``spec``."""
    if spec.symmetric:
        return max(-dt.qmin, dt.qmax)
    return dt.qmax - dt.qmin


def _weight_kind(op: str, w: TensorType) -> str:
    spec = need_quantized(op, "w", w)
    if w.rank != 2:
        fail(op, f"w must be [out_features, in_features], got {w}")
    if spec.axis is None:
        return "tensor"
    if spec.axis == 0 and spec.group_size is None:
        return "axis"
    if spec.axis == 1 and spec.group_size is not None:
        return "group"
    fail(op, f"w must be quantized per tensor, per output row (axis=0) or per group along the input axis "
             f"(axis=1, group=...), got {w}")


def _x_is_constant_along_k(x: TensorType, k: Any) -> bool:
    spec = x.quant
    assert spec is not None
    last = x.rank - 1
    if spec.axis is None:
        return True
    if spec.group_size is None:
        return spec.axis != last
    return spec.axis == last and isinstance(k, int) and spec.group_size >= k


def _qmatmul_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "qmatmul"
    x, w = types[0], types[1]
    kind = _weight_kind(op, w)
    n, k = w.shape
    if x.rank < 1:
        fail(op, f"x must have a feature axis, got {x}")
    if x.shape[-1] != k:
        fail(op, f"x has {x.shape[-1]} features but w {format_shape(w.shape)} expects {k}")
    if x.quant is not None:
        if not x.dtype.is_integer:
            fail(op, f"x {x} must be stored as integers")
        assert w.quant is not None
        if w.quant.offset is not None and kind != "group":
            fail(op, f"w {w} has an offset (x = scale*q + offset) but no groups along K; the integer path adds "
                     f"offset * sum(x) per group of K (a float minimum per block, llama.cpp's Q4_1 x Q8 dot)")
        if not _x_is_constant_along_k(x, k):
            fail(op, f"x {x} must be quantized with parameters constant along its last axis: per tensor, "
                     f"per token (axis={x.rank - 1}, group >= {k}) or per axis on another axis")
        assert w.quant is not None
        depth = w.quant.group_size if kind == "group" else k
        if not isinstance(depth, int):
            fail(op, f"the integer path needs a fixed reduction size, but w is {w}")
        depth = min(depth, k) if isinstance(k, int) else depth
        worst = depth * code_range(x.dtype, x.quant) * code_range(w.dtype, w.quant)
        if worst > INT32_MAX:
            fail(op, f"an int32 accumulator could overflow: {depth} products of |x - zx| <= "
                     f"{code_range(x.dtype, x.quant)} and |w - zw| <= {code_range(w.dtype, w.quant)} reach {worst} "
                     f"> {INT32_MAX}; use smaller groups or a narrower dtype")
    else:
        need_float(op, "x", x)
    if len(types) > 2:
        bias = need_float(op, "bias", types[2])
        if bias.shape != (n,):
            fail(op, f"bias must have shape [{n}] (one per output feature), got {bias}")
    return declared_float(op, declared, x.shape[:-1] + (n,))


def _along_k_param(full: Array | None) -> Array | None:
    """A parameter expanded to x's shape, reduced to one value per row (it is constant along K)."""
    if full is None or full.ndim == 0:
        return full
    return full[..., :1]


def _qmatmul_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                     ) -> list[Array]:
    x, w = args[0], args[1]
    bias = as_float(args[2], np.dtype(np.float32)) if len(args) > 2 else None
    if not isinstance(x, QTensor):
        y = np.matmul(as_float(x, np.dtype(np.float32)), w.dequantize().T)
    else:
        y = _integer_path(x, w)
    if bias is not None:
        y = y + bias
    return [y.astype(rt[0].dtype.numpy, copy=False)]


def _integer_path(x: QTensor, w: QTensor) -> Array:
    n, k = w.shape
    xc = as_int(x.codes)
    zx = _along_k_param(x.zero_point_full())
    if zx is not None:
        xc = xc - zx
    sx = _along_k_param(x.scale_full())
    wc = as_int(w.codes)
    zw = w.zero_point_full()
    if zw is not None:
        wc = wc - zw
    spec = w.spec
    if spec.group_size is not None:
        bounds = [(lo, min(lo + spec.group_size, k)) for lo in range(0, k, spec.group_size)]
    else:
        bounds = [(0, k)]
    xf = xc.astype(np.float64)
    wf = wc.astype(np.float64)
    y: Array | None = None
    for g, (lo, hi) in enumerate(bounds):
        acc = np.matmul(xf[..., lo:hi], wf[:, lo:hi].T)  # exact: |partial sums| < 2**31 (checked by infer)
        if acc.size and np.max(np.abs(acc)) > INT32_MAX:
            raise QirError(f"qmatmul: int32 accumulator overflow in group {g} ({int(np.max(np.abs(acc)))})")
        if spec.axis is None:
            sw = np.asarray(w.scale, np.float32).reshape(())
        elif spec.group_size is None:
            sw = np.asarray(w.scale, np.float32)
        else:
            sw = np.asarray(w.scale, np.float32)[:, g]
        if len(bounds) == 1 and x.spec.axis is not None and zx is None:  # per-token order, see the docstring
            term = (acc.astype(np.float32) * sw).astype(np.float32) * np.asarray(sx, np.float32)
        else:
            scale = (np.asarray(sx, np.float32) * sw).astype(np.float32)
            term = acc.astype(np.float32) * scale
        if w.offset is not None:
            # A float minimum per group (w = scale*q + offset): offset * sum over the group of x, whose codes sum
            # exactly in int64 (xf holds integers); x's scale applied after, as for the products.
            xsum = xf[..., lo:hi].sum(axis=-1, keepdims=True).astype(np.float32)
            term = term + (xsum * np.asarray(w.offset, np.float32)[:, g]).astype(np.float32) * np.asarray(
                sx, np.float32)
        y = term if y is None else y + term
    if y is None:  # K == 0
        y = np.zeros(x.shape[:-1] + (n,), np.float32)
    return y


define("qmatmul", ("x", "w", "bias?"), (), _qmatmul_infer, _qmatmul_compute,
       "x @ dequantize(w).T + bias for a quantized [N, K] weight; integer path when x is quantized", "quant")


# -- qembedding ------------------------------------------------------------------------------------------------
def _qembedding_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "qembedding"
    table, ids = types
    spec = need_quantized(op, "table", table)
    need_integer(op, "ids", ids)
    if table.rank != 2:
        fail(op, f"table must be [vocab, dim], got {table}")
    ok = spec.axis is None or (spec.axis == 0 and spec.group_size is None) or (
        spec.axis == 1 and spec.group_size is not None)
    if not ok:
        fail(op, f"table must be quantized per tensor, per row (axis=0) or per group along the row "
                 f"(axis=1, group=...), got {table}")
    return declared_float(op, declared, ids.shape + (table.shape[1],))


def _qembedding_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                        ) -> list[Array]:
    table: QTensor = args[0]
    ids_in = np.asarray(args[1])
    ids = check_ids("qembedding", ids_in, table.shape[0]).reshape(-1)
    spec = table.spec
    offset = None
    if spec.axis is None:
        scale, zp = table.scale, table.zero_point
    else:
        scale = np.asarray(table.scale)[ids]
        zp = None if table.zero_point is None else np.asarray(table.zero_point)[ids]
        offset = None if table.offset is None else np.asarray(table.offset)[ids]
    rows = QTensor(table.codes[ids], scale, zp, spec, offset).dequantize()
    return [rows.reshape(ids_in.shape + (table.shape[1],)).astype(rt[0].dtype.numpy, copy=False)]


define("qembedding", ("table", "ids"), (), _qembedding_infer, _qembedding_compute,
       "dequantized rows of a quantized [vocab, dim] table (only the gathered rows are dequantized)", "quant")
