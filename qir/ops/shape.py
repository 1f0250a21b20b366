"""Shape ops: reshape, transpose, slice, concat, gather, unsqueeze, squeeze and expand.

They move elements without arithmetic, so every dtype is accepted (quantized
tensors excepted: dequantize first). Type inference works on symbolic sizes:

* ``reshape`` takes ``shape`` as ints (``-1`` at most once) and symbolic sizes
  written as strings (``"seq"``). ``-1`` is solved by cancelling factors: the
  element counts are products of a number and symbolic factors (``2*seq``
  counts as the number 2 times the factor ``seq``), so
  ``[1,seq,576] -> [1,seq,9,64]``, back, and ``[1,seq,9,64] -> [1,seq,-1]``
  all infer; a reshape whose size cannot be shown equal is refused.
* ``slice`` uses Python semantics. On a symbolic size it assumes the size is
  at least as large as the bounds (``x[2:]`` of ``seq`` has ``seq-2``
  elements); the interpreter checks the real size at run time.
* ``expand`` is ``numpy.broadcast_to``; ``-1`` in ``shape`` keeps that size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.ops.common import as_int, define, fail, need_integer, norm_axis, plain, same_dtype
from qir.ops.registry import Attr
from qir.shapes import Dim, SymDim, add, dim, evaluate, mul, sub
from qir.types import TensorType

Array = np.ndarray


def _attr_dims(op: str, values: Sequence[int | str], allow_minus_one: bool) -> list[Dim | None]:
    """Attribute dims as :data:`Dim`, with ``None`` standing for ``-1``."""
    out: list[Dim | None] = []
    for v in values:
        if isinstance(v, int) and v == -1 and allow_minus_one:
            out.append(None)
        elif isinstance(v, int) and v < 0:
            fail(op, f"shape entries must be >= 0{' or -1' if allow_minus_one else ''}, got {v}")
        else:
            try:
                out.append(dim(v))
            except Exception as exc:  # noqa: BLE001 - re-raised with the op's name
                fail(op, f"bad shape entry {v!r}: {exc}")
    if allow_minus_one and sum(1 for d in out if d is None) > 1:
        fail(op, f"shape {list(values)} has -1 more than once")
    return out


def _runtime_dims(values: Sequence[int | str], bindings: Mapping[str, int]) -> list[int]:
    return [v if isinstance(v, int) else evaluate(dim(v), dict(bindings)) for v in values]


# -- reshape ---------------------------------------------------------------------------------------------------
def _factor(d: Dim) -> tuple[int, SymDim | None]:
    """``d`` as ``k * s`` with the common factor of its coefficients pulled out (``2*seq+2`` -> 2, ``seq+1``)."""
    if isinstance(d, int):
        return d, None
    g = math.gcd(*(c for _, c in d.terms), d.const)
    if d.terms[0][1] < 0:
        g = -g
    return g, SymDim(tuple((n, c // g) for n, c in d.terms), d.const // g)


def _count(shape: Sequence[Dim]) -> tuple[int, Counter[SymDim]]:
    k = 1
    syms: Counter[SymDim] = Counter()
    for d in shape:
        c, s = _factor(d)
        k *= c
        if s is not None:
            syms[s] += 1
    return k, syms


def _reshape_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "reshape"
    x = plain(op, "x", types[0])
    target = _attr_dims(op, attrs["shape"], allow_minus_one=True)
    known = [d for d in target if d is not None]
    k_in, s_in = _count(x.shape)
    k_out, s_out = _count(known)
    what = f"{x} to {list(attrs['shape'])}"
    if None not in target:
        if (k_in, s_in) != (k_out, s_out) and not (k_in == 0 and k_out == 0):
            if not s_in and not s_out:
                fail(op, f"cannot reshape {what}: {k_in} elements do not fit in {k_out}")
            fail(op, f"cannot reshape {what}: the element counts cannot be shown equal")
        return [TensorType(x.dtype, tuple(known))]
    rest = s_in - s_out
    if k_out == 0 or k_in % k_out or s_out - s_in or len(rest) > 1 or sum(rest.values()) > 1:
        fail(op, f"cannot reshape {what}: the size that -1 stands for is not a whole size "
                 "(give every size explicitly, symbolic ones as names)")
    k = k_in // k_out
    solved: Dim = k if not rest else mul(next(iter(rest)), k)
    return [TensorType(x.dtype, tuple(solved if d is None else d for d in target))]


def _reshape_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                     ) -> list[Array]:
    return [np.reshape(np.asarray(args[0]), _runtime_dims(attrs["shape"], ctx.bindings))]


define("reshape", ("x",), (Attr("shape", "dims", doc="ints, -1 once, symbolic sizes as names"),),
       _reshape_infer, _reshape_compute, "same elements in a new shape (row-major)", "shape")


# -- transpose -------------------------------------------------------------------------------------------------
def _perm(op: str, perm: Sequence[int], rank: int) -> list[int]:
    norm = [norm_axis(op, p, rank, "perm entry") for p in perm]
    if sorted(norm) != list(range(rank)):
        fail(op, f"perm {list(perm)} is not a permutation of the {rank} axes")
    return norm


def _transpose_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = plain("transpose", "x", types[0])
    perm = _perm("transpose", attrs["perm"], x.rank)
    return [TensorType(x.dtype, tuple(x.shape[p] for p in perm))]


def _transpose_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                       ) -> list[Array]:
    return [np.transpose(np.asarray(args[0]), attrs["perm"])]


define("transpose", ("x",), (Attr("perm", "ints"),), _transpose_infer, _transpose_compute,
       "permute axes: result axis i is x axis perm[i]", "shape")


# -- slice -----------------------------------------------------------------------------------------------------
def slice_size(op: str, size: Dim, start: int, end: int | None, step: int) -> Dim:
    """The length of ``range(size)[start:end:step]`` (symbolic: assuming ``size`` covers the bounds)."""
    if step == 0:
        fail(op, "step must not be 0")
    if isinstance(size, int):
        return len(range(*slice(start, end, step).indices(size)))
    if step != 1:
        fail(op, f"a step of {step} on the symbolic size {size} has no closed form; use step 1")
    if start < 0 and end is not None and end >= 0:
        fail(op, f"start {start} (from the end) with end {end} (from the front) on the symbolic size {size} "
                 "depends on the size; use bounds from one side")
    begin: Dim = start if start >= 0 else add(size, start)
    finish: Dim = size if end is None else (end if end >= 0 else add(size, end))
    length = sub(finish, begin)
    return max(length, 0) if isinstance(length, int) else length


def _slice_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = plain("slice", "x", types[0])
    axis = norm_axis("slice", attrs["axis"], x.rank)
    n = slice_size("slice", x.shape[axis], attrs["start"], attrs["end"], attrs["step"])
    return [TensorType(x.dtype, x.shape[:axis] + (n,) + x.shape[axis + 1:])]


def _slice_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
    x = np.asarray(args[0])
    axis = attrs["axis"] % x.ndim
    index = (slice(None),) * axis + (slice(attrs["start"], attrs["end"], attrs["step"]),)
    return [x[index]]


define("slice", ("x",), (Attr("axis", "int"), Attr("start", "int", 0), Attr("end", "int?", None),
                         Attr("step", "int", 1)),
       _slice_infer, _slice_compute, "x[start:end:step] along axis (Python semantics)", "shape")


# -- concat ----------------------------------------------------------------------------------------------------
def _concat_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "concat"
    if not types:
        fail(op, "needs at least one operand")
    roles = [f"operand {i}" for i in range(len(types))]
    for t, role in zip(types, roles):
        plain(op, role, t)
    same_dtype(op, types, roles)
    first = types[0]
    axis = norm_axis(op, attrs["axis"], first.rank)
    total: Dim = 0
    for t, role in zip(types, roles):
        if t.rank != first.rank or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
            fail(op, f"{role} {t} does not match operand 0 {first} outside axis {axis}")
        total = add(total, t.shape[axis])
    return [TensorType(first.dtype, first.shape[:axis] + (total,) + first.shape[axis + 1:])]


def _concat_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    return [np.concatenate([np.asarray(a) for a in args], axis=attrs["axis"])]


define("concat", ("*xs",), (Attr("axis", "int"),), _concat_infer, _concat_compute,
       "join tensors along axis (sizes add, symbolically too)", "shape")


# -- gather ----------------------------------------------------------------------------------------------------
def _gather_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = plain("gather", "x", types[0])
    idx = need_integer("gather", "indices", types[1])
    axis = norm_axis("gather", attrs["axis"], x.rank)
    return [TensorType(x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _gather_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    x = np.asarray(args[0])
    axis = attrs["axis"] % x.ndim
    idx = as_int(args[1])
    n = x.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = int(idx.min()) if idx.min() < -n else int(idx.max())
        raise QirError(f"gather: index {bad} is out of range for axis {axis} of size {n} (valid: {-n}..{n - 1})")
    return [np.take(x, idx, axis=axis)]


define("gather", ("x", "indices"), (Attr("axis", "int", 0),), _gather_infer, _gather_compute,
       "numpy take along axis (negative indices count from the end)", "shape")


# -- unsqueeze / squeeze ---------------------------------------------------------------------------------------
def _unsqueeze_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = plain("unsqueeze", "x", types[0])
    axis = norm_axis("unsqueeze", attrs["axis"], x.rank + 1)
    return [TensorType(x.dtype, x.shape[:axis] + (1,) + x.shape[axis:])]


def _unsqueeze_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                       ) -> list[Array]:
    return [np.expand_dims(np.asarray(args[0]), attrs["axis"])]


define("unsqueeze", ("x",), (Attr("axis", "int"),), _unsqueeze_infer, _unsqueeze_compute,
       "insert a size-1 axis at axis (of the result)", "shape")


def _squeeze_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    x = plain("squeeze", "x", types[0])
    axis = norm_axis("squeeze", attrs["axis"], x.rank)
    if x.shape[axis] != 1:
        fail("squeeze", f"axis {axis} of {x} has size {x.shape[axis]}, not 1")
    return [TensorType(x.dtype, x.shape[:axis] + x.shape[axis + 1:])]


def _squeeze_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                     ) -> list[Array]:
    return [np.squeeze(np.asarray(args[0]), attrs["axis"])]


define("squeeze", ("x",), (Attr("axis", "int"),), _squeeze_infer, _squeeze_compute, "remove a size-1 axis", "shape")


# -- expand ----------------------------------------------------------------------------------------------------
def _expand_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "expand"
    x = plain(op, "x", types[0])
    target = _attr_dims(op, attrs["shape"], allow_minus_one=True)
    if len(target) < x.rank:
        fail(op, f"shape {list(attrs['shape'])} has fewer axes than {x}")
    lead = len(target) - x.rank
    out: list[Dim] = []
    for i, t in enumerate(target):
        src = x.shape[i - lead] if i >= lead else None
        if t is None:
            if src is None:
                fail(op, f"-1 at position {i} of {list(attrs['shape'])} has no axis of {x} to keep")
            out.append(src)
        elif src is not None and src != 1 and src != t:
            fail(op, f"cannot expand {x} to {list(attrs['shape'])}: axis {i - lead} has size {src}, "
                     "only size-1 axes expand")
        else:
            out.append(t)
    return [TensorType(x.dtype, tuple(out))]


def _expand_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                    ) -> list[Array]:
    x = np.asarray(args[0])
    values = attrs["shape"]
    lead = len(values) - x.ndim
    dims = _runtime_dims(values, ctx.bindings)
    shape = [x.shape[i - lead] if d == -1 else d for i, d in enumerate(dims)]
    return [np.ascontiguousarray(np.broadcast_to(x, shape))]


define("expand", ("x",), (Attr("shape", "dims", doc="target sizes; -1 keeps x's size"),),
       _expand_infer, _expand_compute, "broadcast to shape (numpy broadcast_to), materialized", "shape")
