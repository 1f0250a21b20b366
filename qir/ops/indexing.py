"""Indexing ops the torch frontend needs: ``arange``, ``cumsum``, ``index_copy``, ``take_along_axis`` and ``index``.

* ``arange {start, step, size, dtype}`` is ``start + step * range(size)`` where ``size`` (a one-element ``dims``
  list) may be symbolic (``arange`` of a dynamic sequence length gives ``i64[seq]``).
* ``cumsum {axis}`` is ``numpy.cumsum`` (integers exact, floats in the compute rule).
* ``index_copy(x, index, source) {axis}`` is torch's out-of-place ``index_copy``: a copy of ``x`` whose slices
  ``index[i]`` along ``axis`` are ``source``'s slices ``i`` (how a static KV cache is written).
* ``take_along_axis(x, indices) {axis}`` is ``numpy.take_along_axis`` (torch's ``gather``); ``indices``
  broadcast against ``x`` outside ``axis``.
* ``index(x, *indices) {axes}`` is numpy advanced indexing ``x[..., i0, ..., i1, ...]`` with one integer index
  tensor per axis in ``axes`` (torch's ``index.Tensor``); index tensors broadcast together, and their broadcast
  shape takes the place of the indexed axes when those are adjacent, else it goes first (numpy's rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qir.dtypes import dtype as to_dtype
from qir.errors import QirError
from qir.ops.common import (
    as_float,
    as_int,
    define,
    fail,
    float_domain,
    need_integer,
    need_numeric,
    norm_axis,
    plain,
    same_dtype,
    to_result,
)
from qir.ops.registry import Attr
from qir.shapes import Dim, Shape, broadcast, dim, evaluate, format_shape
from qir.types import TensorType

Array = np.ndarray


# -- arange ----------------------------------------------------------------------------------------------------
def _arange_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    size = attrs["size"]
    if len(size) != 1:
        fail("arange", f"size must hold exactly one (possibly symbolic) size, got {list(size)}")
    try:
        n = dim(size[0])
        dt = to_dtype(attrs["dtype"])
    except QirError as exc:
        fail("arange", str(exc))
    if not (dt.is_float or dt.is_integer) or dt.is_subbyte:
        fail("arange", f"dtype must be a float or a byte-sized integer dtype, got {dt}")
    return [TensorType(dt, (n,))]


def _arange_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    n = evaluate(dim(attrs["size"][0]), dict(ctx.bindings))
    y = attrs["start"] + attrs["step"] * np.arange(n, dtype=np.int64)
    return [to_result("arange", y, rt[0])]


define("arange", (), (Attr("size", "dims", doc="[n]: the number of elements, may be symbolic"),
                      Attr("start", "int", 0), Attr("step", "int", 1), Attr("dtype", "str", "i64")),
       _arange_infer, _arange_compute, "start + step * [0, 1, ..., size-1] in dtype", "indexing")


# -- cumsum ----------------------------------------------------------------------------------------------------
def _cumsum_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = need_numeric("cumsum", "x", types[0])
    norm_axis("cumsum", attrs["axis"], x.rank)
    return [x]


def _cumsum_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    x = args[0]
    if rt[0].dtype.is_float:
        y = np.cumsum(as_float(x, float_domain(x)), axis=attrs["axis"])
    else:
        y = np.cumsum(as_int(x), axis=attrs["axis"])
    return [to_result("cumsum", np.asarray(y), rt[0])]


define("cumsum", ("x",), (Attr("axis", "int"),), _cumsum_infer, _cumsum_compute,
       "running sum along axis (numpy cumsum; integers exact)", "indexing")


# -- index_copy ------------------------------------------------------------------------------------------------
def _index_copy_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "index_copy"
    x = plain(op, "x", types[0])
    idx = need_integer(op, "index", types[1])
    src = plain(op, "source", types[2])
    same_dtype(op, (x, src), ("x", "source"))
    axis = norm_axis(op, attrs["axis"], x.rank)
    if idx.rank != 1:
        fail(op, f"index must be a vector, got {idx}")
    want = x.shape[:axis] + (idx.shape[0],) + x.shape[axis + 1:]
    if src.shape != want:
        fail(op, f"source must have shape {format_shape(want)} (x with axis {axis} sized like index), got {src}")
    return [x]


def _index_copy_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                        ) -> list[Array]:
    x = np.array(np.asarray(args[0]), copy=True)
    idx = as_int(args[1])
    axis = attrs["axis"] % x.ndim
    n = x.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = int(idx.min()) if idx.min() < -n else int(idx.max())
        raise QirError(f"index_copy: index {bad} is out of range for axis {axis} of size {n}")
    moved = np.moveaxis(x, axis, 0)
    moved[idx] = np.moveaxis(np.asarray(args[2]), axis, 0)
    return [x]


define("index_copy", ("x", "index", "source"), (Attr("axis", "int"),), _index_copy_infer, _index_copy_compute,
       "copy of x with slices index[i] along axis replaced by source's slices i (torch index_copy)", "indexing")


# -- take_along_axis -------------------------------------------------------------------------------------------
def _take_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "take_along_axis"
    x = plain(op, "x", types[0])
    idx = need_integer(op, "indices", types[1])
    axis = norm_axis(op, attrs["axis"], x.rank)
    if idx.rank != x.rank:
        fail(op, f"indices must have the rank of x ({x.rank}), got {idx}")
    out: list[Dim] = []
    for i, (a, b) in enumerate(zip(x.shape, idx.shape)):
        if i == axis:
            out.append(b)
            continue
        try:
            out.append(broadcast((a,), (b,))[0])
        except QirError:
            fail(op, f"indices {idx} do not broadcast against x {x} outside axis {axis}")
    return [TensorType(x.dtype, tuple(out))]


def _take_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
    x = np.asarray(args[0])
    idx = as_int(args[1])
    axis = attrs["axis"] % x.ndim
    n = x.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = int(idx.min()) if idx.min() < -n else int(idx.max())
        raise QirError(f"take_along_axis: index {bad} is out of range for axis {axis} of size {n}")
    shape = [max(a, b) if i != axis else b for i, (a, b) in enumerate(zip(x.shape, idx.shape))]
    xs = [a if i == axis else s for i, (a, s) in enumerate(zip(x.shape, shape))]
    return [np.take_along_axis(np.broadcast_to(x, xs), np.broadcast_to(idx, shape), axis=axis)]


define("take_along_axis", ("x", "indices"), (Attr("axis", "int"),), _take_infer, _take_compute,
       "numpy take_along_axis (torch gather): x's elements at indices along axis", "indexing")


# -- index -----------------------------------------------------------------------------------------------------
def _index_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "index"
    x = plain(op, "x", types[0])
    axes = [norm_axis(op, a, x.rank, "axes entry") for a in attrs["axes"]]
    if len(axes) != len(types) - 1:
        fail(op, f"axes {list(attrs['axes'])} name {len(axes)} axes but {len(types) - 1} index tensors are given")
    if not axes or len(set(axes)) != len(axes) or axes != sorted(axes):
        fail(op, f"axes must be increasing and distinct, got {list(attrs['axes'])}")
    shape: Shape = ()
    for i, t in enumerate(types[1:]):
        need_integer(op, f"index {i}", t)
        try:
            shape = broadcast(shape, t.shape)
        except QirError:
            fail(op, f"index tensors {', '.join(str(t) for t in types[1:])} do not broadcast together")
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
    pos = axes[0] if adjacent else 0
    return [TensorType(x.dtype, tuple(rest[:pos]) + shape + tuple(rest[pos:]))]


def _index_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                   ) -> list[Array]:
    x = np.asarray(args[0])
    key: list[Any] = [slice(None)] * x.ndim
    for a, idx in zip(attrs["axes"], args[1:]):
        ix = as_int(idx)
        n = x.shape[a]
        if ix.size and (ix.min() < -n or ix.max() >= n):
            bad = int(ix.min()) if ix.min() < -n else int(ix.max())
            raise QirError(f"index: index {bad} is out of range for axis {a % x.ndim} of size {n}")
        key[a] = ix
    return [np.asarray(x[tuple(key)])]


define("index", ("x", "*indices"), (Attr("axes", "ints"),), _index_infer, _index_compute,
       "numpy advanced indexing: one integer index tensor per axis in axes (torch index.Tensor)", "indexing")
