"""Helpers shared by the built-in op definitions: type checks, axis handling and the float compute rule.

Float compute rule (every op module follows it): f16 and bf16 operands are
computed in f32 and the result is cast to the declared result dtype; f32 stays
f32 and f64 stays f64. Integer ops are exact: they compute in int64 and raise
when a result does not fit the result dtype (no silent wrap-around).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

from qir.dtypes import DType, f32, from_numpy
from qir.errors import QirError
from qir.ops.registry import Attr, InferFn, OpDef, register_op
from qir.shapes import Dim, Shape, format_shape
from qir.types import TensorType


def define(name: str, operands: Sequence[str], attrs: Sequence[Attr], infer: InferFn, compute: Callable[..., Any],
           doc: str, category: str) -> OpDef:
    """Build an :class:`OpDef` and register it."""
    return register_op(OpDef(name=name, operands=tuple(operands), attrs=tuple(attrs), infer=infer, compute=compute,
                             doc=doc, category=category))


def fail(op: str, message: str) -> NoReturn:
    """Raise the type-inference error of ``op``."""
    raise QirError(f"{op}: {message}")


def plain(op: str, role: str, t: TensorType) -> TensorType:
    """``t`` if it is not quantized; otherwise raise (plain ops take plain tensors)."""
    if t.is_quantized:
        fail(op, f"{role} has the quantized type {t}; dequantize it first (only quantize, dequantize, requantize, "
                 "qmatmul and qembedding take quantized operands)")
    return t


def _need(op: str, role: str, t: TensorType, ok: bool, what: str) -> TensorType:
    """``t`` when it is a plain tensor and ``ok``; otherwise raise saying ``role`` must be ``what``."""
    plain(op, role, t)
    if not ok:
        fail(op, f"{role} must be {what}, got {t}")
    return t


def need_float(op: str, role: str, t: TensorType) -> TensorType:
    return _need(op, role, t, t.dtype.is_float, "a float tensor")


def need_numeric(op: str, role: str, t: TensorType) -> TensorType:
    return _need(op, role, t, t.dtype.is_float or t.dtype.is_integer, "a float or integer tensor")


def need_integer(op: str, role: str, t: TensorType) -> TensorType:
    return _need(op, role, t, t.dtype.is_integer, "an integer tensor")


def need_bool(op: str, role: str, t: TensorType) -> TensorType:
    return _need(op, role, t, t.dtype.kind == "bool", "a bool tensor")


def same_dtype(op: str, types: Sequence[TensorType], roles: Sequence[str]) -> DType:
    first = types[0].dtype
    for t, role in zip(types[1:], roles[1:]):
        if t.dtype != first:
            fail(op, f"operands must share a dtype, but {roles[0]} is {types[0]} and {role} is {t}; "
                     "insert a cast")
    return first


def norm_axis(op: str, axis: int, rank: int, what: str = "axis") -> int:
    """``axis`` made non-negative for a rank-``rank`` tensor (raises when out of range)."""
    if not -rank <= axis < rank:
        fail(op, f"{what} {axis} is out of range for a rank-{rank} tensor (valid: {-rank}..{rank - 1})")
    return axis + rank if axis < 0 else axis


def vector_of(op: str, role: str, t: TensorType, size: Dim) -> None:
    """Check that ``t`` is a 1-D tensor of ``size`` elements (norm weights, biases)."""
    if t.shape != (size,):
        fail(op, f"{role} must have shape [{size}], got {t}")


def declared_one(op: str, declared: Sequence[TensorType] | None) -> TensorType | None:
    if declared is None:
        return None
    if len(declared) != 1:
        fail(op, f"has one result, but {len(declared)} result types are declared")
    return declared[0]


def declared_float(op: str, declared: Sequence[TensorType] | None, shape: Shape) -> list[TensorType]:
    """Result of an op whose result is a float of ``shape`` in a dtype the IR may choose (default f32)."""
    d = declared_one(op, declared)
    if d is None:
        return [TensorType(f32, shape)]
    if d.is_quantized or not d.dtype.is_float:
        fail(op, f"result must be a plain float tensor, but {d} is declared")
    if d.shape != shape:
        fail(op, f"result shape must be {format_shape(shape)}, but {d} is declared")
    return [d]


# -- run time -------------------------------------------------------------------------------------------------
def as_float(x: Any, cdt: np.dtype) -> np.ndarray:
    return np.asarray(x).astype(cdt, copy=False)


def as_int(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.int64, copy=False)


def to_result(op: str, y: np.ndarray, t: TensorType) -> np.ndarray:
    """Cast a computed array to the result type's dtype; integers must fit (no wrap-around)."""
    dt = t.dtype
    if dt.is_integer and y.dtype.kind in "iu" and y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < dt.qmin or hi > dt.qmax:
            bad = lo if lo < dt.qmin else hi
            raise QirError(f"{op}: integer result {bad} does not fit {dt} [{dt.qmin}, {dt.qmax}]")
    return np.asarray(y).astype(dt.numpy, copy=False)


def float_domain(*xs: Any) -> np.dtype:
    """The numpy dtype float arrays ``xs`` are computed in: f64 if any is f64, else f32."""
    return np.dtype(np.float64) if any(np.asarray(x).dtype == np.float64 for x in xs) else np.dtype(np.float32)


def kind_of(x: Any) -> str:
    """``"float"``, ``"int"``, ``"uint"`` or ``"bool"`` for an array (ml_dtypes int4/bf16 included)."""
    return from_numpy(np.asarray(x).dtype).kind
