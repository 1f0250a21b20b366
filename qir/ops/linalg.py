"""Dense linear algebra on plain tensors: ``linear``, ``matmul`` and ``embedding``.

Floats follow the compute rule of :mod:`qir.ops.common` (f16/bf16 in f32, the
result cast back); integer ``matmul`` is exact (int64, the result must fit the
dtype). The quantized forms are ``qmatmul`` and ``qembedding``
(:mod:`qir.ops.quantized`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.ops.common import (
    as_float,
    as_int,
    define,
    fail,
    float_domain,
    kind_of,
    need_float,
    need_integer,
    need_numeric,
    plain,
    same_dtype,
    to_result,
)
from qir.shapes import Shape, broadcast, format_shape
from qir.types import TensorType

Array = np.ndarray


def _linear_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "linear"
    x = need_float(op, "x", types[0])
    w = need_float(op, "weight", types[1])
    if x.rank < 1:
        fail(op, f"x must have a feature axis, got {x}")
    if w.rank != 2:
        fail(op, f"weight must be [out_features, in_features], got {w}")
    if x.shape[-1] != w.shape[1]:
        fail(op, f"x has {x.shape[-1]} features but weight {format_shape(w.shape)} expects {w.shape[1]}")
    roles = ["x", "weight"]
    if len(types) > 2:
        bias = need_float(op, "bias", types[2])
        if bias.shape != (w.shape[0],):
            fail(op, f"bias must have shape [{w.shape[0]}] (one per output feature), got {bias}")
        roles.append("bias")
    same_dtype(op, types, roles)
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


def _linear_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    cdt = float_domain(*args)
    y = np.matmul(as_float(args[0], cdt), as_float(args[1], cdt).T)
    if len(args) > 2:
        y = y + as_float(args[2], cdt)
    return [y.astype(rt[0].dtype.numpy, copy=False)]


define("linear", ("x", "weight", "bias?"), (), _linear_infer, _linear_compute,
       "x @ weight.T + bias, weight [out, in], x [..., in]", "linalg")


def matmul_shape(op: str, a: Shape, b: Shape) -> Shape:
    """numpy ``matmul`` result shape (1-D operands get a dimension added and removed, batches broadcast)."""
    if not a or not b:
        fail(op, f"operands must have at least one axis, got {format_shape(a)} and {format_shape(b)}")
    a2 = a if len(a) > 1 else (1,) + a
    b2 = b if len(b) > 1 else b + (1,)
    if a2[-1] != b2[-2]:
        fail(op, f"a {format_shape(a)} has {a2[-1]} columns but b {format_shape(b)} has {b2[-2]} rows")
    try:
        batch = broadcast(a2[:-2], b2[:-2])
    except QirError:
        fail(op, f"batch dimensions of a {format_shape(a)} and b {format_shape(b)} do not broadcast")
    return batch + (a2[-2:-1] if len(a) > 1 else ()) + (b2[-1:] if len(b) > 1 else ())


def _matmul_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    a = need_numeric("matmul", "a", types[0])
    b = need_numeric("matmul", "b", types[1])
    dt = same_dtype("matmul", types, ("a", "b"))
    return [TensorType(dt, matmul_shape("matmul", a.shape, b.shape))]


def _matmul_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    a, b = args
    if kind_of(a) == "float":
        cdt = float_domain(a, b)
        y = np.matmul(as_float(a, cdt), as_float(b, cdt))
    else:
        y = np.matmul(as_int(a), as_int(b))
    return [to_result("matmul", np.asarray(y), rt[0])]


define("matmul", ("a", "b"), (), _matmul_infer, _matmul_compute,
       "numpy matmul with batch broadcasting (integers exact)", "linalg")


def _embedding_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    table = plain("embedding", "table", types[0])
    ids = need_integer("embedding", "ids", types[1])
    if table.rank != 2:
        fail("embedding", f"table must be [vocab, dim], got {table}")
    return [TensorType(table.dtype, ids.shape + (table.shape[1],))]


def check_ids(op: str, ids: Array, vocab: int) -> Array:
    """``ids`` as int64, raising when one lies outside ``[0, vocab)``."""
    ids = as_int(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise QirError(f"{op}: id {bad} is outside the table's {vocab} rows [0, {vocab})")
    return ids


def _embedding_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                       ) -> list[Array]:
    table = np.asarray(args[0])
    ids = check_ids("embedding", args[1], table.shape[0])
    return [table[ids].astype(rt[0].dtype.numpy, copy=False)]


define("embedding", ("table", "ids"), (), _embedding_infer, _embedding_compute,
       "table[ids]: rows of a [vocab, dim] table, result ids.shape + [dim]", "linalg")
