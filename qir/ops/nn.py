"""Neural-network ops: softmax, layer_norm, rms_norm, the mean/sum/max reductions and attention.

All of them compute floats in f32 (f64 when an operand is f64) and cast the
result to the result dtype; see :mod:`qir.ops.common`. ``sum`` and ``max`` of
integers are exact.

``attention`` semantics, written down for backends to follow::

    q [B,Hq,Sq,D], k [B,Hkv,Sk,D], v [B,Hkv,Sk,Dv], Hq % Hkv == 0
    query head h uses key/value head h // (Hq/Hkv)      (grouped-query attention)
    s = (q @ k^T) * scale                    scale defaults to 1/sqrt(D)
    s = s + mask (float mask) | s where mask else -inf (bool mask, true = attend)
    causal: query i attends key j only when j <= i + (Sk - Sq)
    p = softmax(s) over keys (in f32); a row with no key left gives p = 0 (output 0, not NaN)
    out = p @ v  -> [B,Hq,Sq,Dv]

The causal rule is aligned to the bottom-right corner: with ``Sq == Sk`` it is
torch's ``is_causal``; with a KV cache (``Sk = past + Sq``) the new queries see
the whole cache plus the new keys up to their own position, which is what a
decode step needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qir.dtypes import f64
from qir.errors import QirError
from qir.ops.common import (
    as_float,
    as_int,
    define,
    fail,
    float_domain,
    kind_of,
    need_float,
    need_numeric,
    norm_axis,
    plain,
    same_dtype,
    to_result,
    vector_of,
)
from qir.ops.registry import Attr
from qir.shapes import Shape, broadcast, format_shape
from qir.types import TensorType

Array = np.ndarray


# -- softmax and norms -----------------------------------------------------------------------------------------
def _softmax_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    (x,) = types
    need_float("softmax", "x", x)
    norm_axis("softmax", attrs["axis"], x.rank)
    return [x]


def _softmax_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                     ) -> list[Array]:
    x = as_float(args[0], float_domain(args[0]))
    axis = attrs["axis"]
    with np.errstate(invalid="ignore"):  # a row of -inf gives NaN, as in torch
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        y = e / np.sum(e, axis=axis, keepdims=True)
    return [y.astype(rt[0].dtype.numpy, copy=False)]


define("softmax", ("x",), (Attr("axis", "int", -1),), _softmax_infer, _softmax_compute,
       "exp(x - max) / sum(exp(x - max)) along axis", "nn")


def _norm_infer(op: str, roles: Sequence[str]) -> Any:
    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        x = need_float(op, "x", types[0])
        if x.rank == 0:
            fail(op, f"x must have at least one axis (it normalizes the last), got {x}")
        for t, role in zip(types[1:], roles[1:]):
            need_float(op, role, t)
            vector_of(op, role, t, x.shape[-1])
        same_dtype(op, types, roles)
        if not attrs["eps"] >= 0:
            fail(op, f"eps must be >= 0, got {attrs['eps']}")
        return [x]

    return infer


def _layer_norm_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                        ) -> list[Array]:
    cdt = float_domain(*args)
    x = as_float(args[0], cdt)
    mean = np.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    y = centered / np.sqrt(var + cdt.type(attrs["eps"]))
    if len(args) > 1:
        y = y * as_float(args[1], cdt)
    if len(args) > 2:
        y = y + as_float(args[2], cdt)
    return [y.astype(rt[0].dtype.numpy, copy=False)]


define("layer_norm", ("x", "weight?", "bias?"), (Attr("eps", "float", 1e-5),),
       _norm_infer("layer_norm", ("x", "weight", "bias")), _layer_norm_compute,
       "(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance)", "nn")


def _rms_norm_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                      ) -> list[Array]:
    cdt = float_domain(*args)
    x = as_float(args[0], cdt)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    y = x * (cdt.type(1) / np.sqrt(ms + cdt.type(attrs["eps"])))
    if len(args) > 1:
        y = y * as_float(args[1], cdt)
    return [y.astype(rt[0].dtype.numpy, copy=False)]


define("rms_norm", ("x", "weight?"), (Attr("eps", "float", 1e-6),),
       _norm_infer("rms_norm", ("x", "weight")), _rms_norm_compute,
       "x * rsqrt(mean(x^2) + eps) * weight over the last axis", "nn")


# -- reductions ------------------------------------------------------------------------------------------------
def _axes(op: str, axes: Sequence[int], rank: int) -> tuple[int, ...]:
    if not axes:
        fail(op, "axes must name at least one axis")
    norm = tuple(sorted(norm_axis(op, a, rank, "axes entry") for a in axes))
    if len(set(norm)) != len(norm):
        fail(op, f"axes {list(axes)} name an axis twice")
    return norm


def _make_reduce(op: str, floats_only: bool) -> tuple[Any, Any]:
    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        (x,) = types
        (need_float if floats_only else need_numeric)(op, "x", x)
        axes = _axes(op, attrs["axes"], x.rank)
        if op == "max":
            for a in axes:
                if x.shape[a] == 0:
                    fail(op, f"cannot take the max over the empty axis {a} of {x}")
        if attrs["keepdim"]:
            shape: Shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [TensorType(x.dtype, shape)]

    fn = {"mean": np.mean, "sum": np.sum, "max": np.max}[op]

    def compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
        x = args[0]
        axes = tuple(attrs["axes"])
        if rt[0].dtype.is_float:
            y = fn(as_float(x, float_domain(x)), axis=axes, keepdims=attrs["keepdim"])
        else:
            y = fn(as_int(x), axis=axes, keepdims=attrs["keepdim"])
        return [to_result(op, np.asarray(y), rt[0])]

    return infer, compute


for _op, _floats, _doc in (("mean", True, "mean over axes (float)"),
                           ("sum", False, "sum over axes (integers: exact, the result must fit the dtype)"),
                           ("max", False, "max over axes")):
    _inf, _comp = _make_reduce(_op, _floats)
    define(_op, ("x",), (Attr("axes", "ints"), Attr("keepdim", "bool", False)), _inf, _comp, _doc, "nn")


# -- attention -------------------------------------------------------------------------------------------------
def _attention_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    op = "attention"
    q, k, v = types[:3]
    for t, role in zip(types[:3], ("q", "k", "v")):
        need_float(op, role, t)
        if t.rank != 4:
            fail(op, f"{role} must be [batch, heads, seq, head_dim], got {t}")
    same_dtype(op, types[:3], ("q", "k", "v"))
    b, hq, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        fail(op, f"q, k and v must have one batch size, got {q}, {k}, {v}")
    if k.shape[3] != d:
        fail(op, f"q has head_dim {d} but k {k} has {k.shape[3]}")
    if v.shape[1:3] != k.shape[1:3]:
        fail(op, f"k and v must have the same heads and keys, got {k} and {v}")
    hkv, sk = k.shape[1], k.shape[2]
    if hq != hkv and not (isinstance(hq, int) and isinstance(hkv, int) and hkv > 0 and hq % hkv == 0):
        fail(op, f"q has {hq} heads, which is not a multiple of the {hkv} key/value heads")
    target = (b, hq, sq, sk)
    if len(types) > 3:
        mask = plain(op, "mask", types[3])
        if not (mask.dtype.is_float or mask.dtype.kind == "bool"):
            fail(op, f"mask must be bool (true = attend) or an additive float, got {mask}")
        try:
            ok = broadcast(mask.shape, target) == target and mask.rank <= 4
        except QirError:
            ok = False
        if not ok:
            fail(op, f"mask {mask} does not broadcast to the scores' shape {format_shape(target)}")
    scale = attrs["scale"]
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        fail(op, f"scale must be finite and > 0, got {scale}")
    return [TensorType(q.dtype, (b, hq, sq, v.shape[3]))]


def _attention_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]
                       ) -> list[Array]:
    cdt = np.dtype(np.float64) if rt[0].dtype == f64 else np.dtype(np.float32)
    q, k, v = (as_float(a, cdt) for a in args[:3])
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    rep = hq // hkv
    # Group query heads by the kv head they read (head h -> kv head h // rep) instead of copying k and v rep times.
    qg = q.reshape(b, hkv, rep, sq, d)
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    s = np.matmul(qg, np.swapaxes(k, -1, -2)[:, :, None]).reshape(b, hq, sq, sk) * cdt.type(scale)
    allowed = None
    if len(args) > 3:
        mask = np.asarray(args[3])
        if kind_of(mask) == "bool":
            allowed = mask
        else:
            s = s + as_float(mask, cdt)
    if attrs["causal"]:
        causal = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
        allowed = causal if allowed is None else np.logical_and(allowed, causal)
    if allowed is not None:
        s = np.where(allowed, s, cdt.type(-np.inf))
    top = np.max(s, axis=-1, keepdims=True) if sk else np.zeros(s.shape[:-1] + (1,), cdt)
    top = np.where(np.isfinite(top), top, cdt.type(0))
    e = np.exp(s - top)
    total = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, cdt.type(1))
    out = np.matmul(p.reshape(b, hkv, rep, sq, sk), v[:, :, None]).reshape(b, hq, sq, dv)
    return [out.astype(rt[0].dtype.numpy, copy=False)]


define("attention", ("q", "k", "v", "mask?"),
       (Attr("causal", "bool", False, "bottom-right aligned causal mask"),
        Attr("scale", "float?", None, "score scale; none means 1/sqrt(head_dim)")),
       _attention_infer, _attention_compute,
       "scaled dot-product attention with grouped-query heads, optional mask and bottom-right causal mask", "nn")
