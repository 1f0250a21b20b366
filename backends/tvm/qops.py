"""TE compute definitions of qir's quantized ops (the arithmetic of :mod:`qir.quant` and ``qir/ops/quantized.py``).

Each function takes TE tensors (created by ``BlockBuilder.emit_te``) and returns one TE tensor; the lowering
(:mod:`qir.backends.tvm.lower`) decides what to emit. They follow the reference interpreter op for op so the
integer results are bit-exact:

* ``quantize``: ``clamp(nearbyint(f32(x) / scale) + zp, qmin, qmax)`` (``nearbyint`` rounds half to even,
  like ``numpy.rint``; the division stays a division, never a multiplication by a reciprocal);
* dynamic parameters: ``min``/``max`` per group widened to contain 0, then qir's ``params_from_range``;
* ``qmatmul`` integer path: exact int32 accumulation per weight group, then ``f32(acc) * f32(sx * sw)``
  summed over groups in order, then ``+ bias``;
* ``dequantize`` / weight-only ``qmatmul`` / ``qembedding``: ``f32(q - zp) * scale (+ offset)``; the offset is
  the spec's ``offset=@...`` (GGUF's block minimum), in the scale's layout. Scale and offset tensors may be
  ``float16`` (GGUF's own block parameters): they are widened to f32 where they are read, which is exact.

Parameter layout (:class:`QParam`): a per-tensor scale or zero point is a ``[1]`` tensor (never 0-d), a
per-axis one ``[n]``, a per-group one the tensor's shape with the grouped axis divided (qir's layout).
Sub-byte codes (int4, int2) stay packed in ``uint8`` bytes along the last axis (element ``j`` of a row in
bits ``bits * (j % per)`` of byte ``j // per``, two's complement when signed: ``qir.safetensors_io.pack``'s
layout row by row) and are unpacked inside the kernels, so weights are never expanded in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qir.dtypes import DType

__all__ = ["QLayout", "NestedParam", "code_at", "param_index", "quantize_te", "dequantize_te", "dyn_scale_te",
           "dyn_zp_te", "qmatmul_int_te", "wmatmul_te", "qembedding_te", "qembedding_tiles_te", "pack_rows",
           "tvm_dtype"]

_TVM_DTYPES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
               "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool",
               "i4": "uint8", "u4": "uint8", "i2": "uint8", "u2": "uint8"}


def tvm_dtype(dt: DType) -> str:
    """The TVM dtype that stores a qir dtype (sub-byte integers are packed into ``uint8``)."""
    return _TVM_DTYPES[dt.name]


@dataclass(frozen=True)
class QLayout:
    """How a quantized value's codes and parameters are laid out (static facts, no tensors).

    ``axis``/``group``: the normalized spec; ``bits``: the code width (``8``: one code per byte, ``4``/``2``:
    packed along the last axis); ``signed``: two's complement codes; ``has_zp``: a zero-point tensor exists.
    """

    axis: int | None
    group: int | None
    bits: int
    signed: bool
    has_zp: bool
    qmin: int
    qmax: int

    @property
    def packed(self) -> bool:
        return self.bits < 8


def _i32(x: Any) -> Any:
    return x.astype("int32")


def code_at(codes: Any, lay: QLayout, idx: Sequence[Any]) -> Any:
    """The int32 code at logical index ``idx`` (unpacking sub-byte codes inside the expression)."""
    if not lay.packed:
        return _i32(codes[tuple(idx)])
    from tvm import tirx as tir

    per = 8 // lay.bits
    last = idx[-1]
    byte = _i32(codes[tuple(idx[:-1]) + (tir.floordiv(last, per),)])
    shift = (tir.floormod(last, per) * lay.bits).astype("int32")
    v = (byte >> shift) & ((1 << lay.bits) - 1)
    if lay.signed:
        # Two's complement within the field: values >= 2**(bits-1) are negative.
        v = v - ((v >> (lay.bits - 1)) << lay.bits)
    return v


def param_index(lay: QLayout, idx: Sequence[Any]) -> tuple[Any, ...]:
    """Index into a scale/zero-point tensor (qir's layout, per tensor as ``[1]``) for element ``idx``."""
    from tvm import tirx as tir

    if lay.axis is None:
        return (0,)
    if lay.group is None:
        return (idx[lay.axis],)
    return tuple(tir.floordiv(i, lay.group) if a == lay.axis else i for a, i in enumerate(idx))


def _f32(e: Any) -> Any:
    """``e`` widened to f32 (a buffer load has ``dtype``, a computed expression such as a nested dequantization
    ``ty``)."""
    dt = getattr(e, "dtype", None)
    return e if str(dt if dt is not None else e.ty) == "float32" else e.astype("float32")


@dataclass(frozen=True)
class NestedParam:
    """A block parameter (scale or offset) that is quantized itself (two-level: ``compress-scales``, K-quants).

    Indexing it dequantizes in place, ``f32(codes[i] - zp) * scale[p(i)] + offset[p(i)]`` (the interpreter's
    values, up to an FMA), so the kernels read the small codes instead of one f32 per block.
    """

    codes: Any
    scale: Any
    zp: Any | None
    offset: Any | None
    lay: QLayout

    dtype = "float32"

    def __getitem__(self, idx: Any) -> Any:
        return _dequant_elem(self.codes, self.scale, self.zp, self.lay, tuple(idx), self.offset)


def _dequant_elem(codes: Any, scale: Any, zp: Any | None, lay: QLayout, idx: Sequence[Any],
                  offset: Any | None = None) -> Any:
    q = code_at(codes, lay, idx)
    p = param_index(lay, idx)
    if zp is not None:
        q = q - _i32(zp[p])
    v = q.astype("float32") * _f32(scale[p])
    return v + _f32(offset[p]) if offset is not None else v


def quantize_te(x: Any, scale: Any, zp: Any | None, lay: QLayout, out_dtype: str) -> Any:
    """Codes of float ``x`` (8-bit storage; sub-byte results are kept one per byte, see the lowering)."""
    from tvm import te
    from tvm import tirx as tir

    def f(*idx: Any) -> Any:
        p = param_index(lay, idx)
        q = tir.nearbyint(x[idx].astype("float32") / scale[p])
        if zp is not None:
            q = q + zp[p].astype("float32")
        q = tir.if_then_else(q != q, tir.const(0.0, "float32"), q)  # NaN -> 0 (numpy's nan_to_num)
        q = tir.max(tir.min(q, tir.const(float(lay.qmax), "float32")), tir.const(float(lay.qmin), "float32"))
        return q.astype(out_dtype)

    return te.compute(x.shape, f, name="quantize")


def dequantize_te(codes: Any, scale: Any, zp: Any | None, lay: QLayout, shape: Sequence[Any],
                  out_dtype: str = "float32", offset: Any | None = None) -> Any:
    """``f32(q - zp) * scale (+ offset)`` at every element (``shape``: the logical shape, codes may be packed)."""
    from tvm import te

    def f(*idx: Any) -> Any:
        v = _dequant_elem(codes, scale, zp, lay, idx, offset)
        return v if out_dtype == "float32" else v.astype(out_dtype)

    return te.compute(tuple(shape), f, name="dequantize")


def dyn_scale_te(lo: Any, hi: Any, qmin: int, qmax: int, symmetric: bool) -> Any:
    """qir's ``params_from_range`` scale from per-group ``min``/``max`` (``lo``/``hi`` already include 0)."""
    from tvm import te
    from tvm import tirx as tir

    tiny = float(np.finfo(np.float32).tiny)

    def f(*idx: Any) -> Any:
        if symmetric:
            amax = tir.max(tir.abs(lo[idx]), tir.abs(hi[idx]))
            s = tir.if_then_else(amax > 0, amax / tir.const(float(qmax), "float32"), tir.const(1.0, "float32"))
        else:
            w = hi[idx] - lo[idx]
            s = tir.if_then_else(w > 0, w / tir.const(float(qmax - qmin), "float32"), tir.const(1.0, "float32"))
        return tir.max(s, tir.const(tiny, "float32"))

    return te.compute(lo.shape, f, name="qscale")


def dyn_zp_te(lo: Any, scale: Any, qmin: int, qmax: int) -> Any:
    """Asymmetric zero point ``clip(qmin - rint(lo / scale), qmin, qmax)`` as int32."""
    from tvm import te
    from tvm import tirx as tir

    def f(*idx: Any) -> Any:
        z = tir.const(float(qmin), "float32") - tir.nearbyint(lo[idx] / scale[idx])
        z = tir.max(tir.min(z, tir.const(float(qmax), "float32")), tir.const(float(qmin), "float32"))
        return z.astype("int32")

    return te.compute(lo.shape, f, name="qzp")


def qmatmul_int_te(xq: Any, sx: Any, zx: Any | None, xlay: QLayout, wq: Any, sw: Any, zw: Any | None,
                   wlay: QLayout, n: int, k: int, bias: Any | None, *, w_kn: bool = False) -> Any:
    """The integer path of ``qmatmul``: ``x [..., K]`` codes, ``w [N, K]`` codes -> f32 ``[..., N]``.

    ``w_kn``: the (8-bit) weight codes come transposed, ``[K, N]``, so the output feature is the innermost,
    contiguous loop (what the generic CPU schedule vectorizes). The accumulator is ``[..., groups, N]``.
    """
    from tvm import te
    from tvm import tirx as tir

    lead = tuple(xq.shape[:-1])
    ngroups = -(-k // wlay.group) if wlay.group is not None else 1
    gsize = wlay.group if wlay.group is not None else k

    def xrow(idx: Sequence[Any]) -> tuple[Any, ...]:
        # x's parameters are constant along K: index them at k = 0.
        return param_index(xlay, tuple(idx) + (0,))

    def acc_f(*idx: Any) -> Any:
        *rows, g, j = idx
        r = te.reduce_axis((0, gsize), name="k")
        kk = g * gsize + r
        xv = code_at(xq, xlay, tuple(rows) + (kk,))
        if zx is not None:
            xv = xv - _i32(zx[xrow(rows)])
        wv = _i32(wq[kk, j]) if w_kn else code_at(wq, wlay, (j, kk))
        if zw is not None:
            wv = wv - _i32(zw[param_index(wlay, (j, kk))])
        if ngroups * gsize != k:  # a short last group
            return te.sum(tir.if_then_else(kk < k, xv * wv, 0), axis=r)
        return te.sum(xv * wv, axis=r)

    acc = te.compute(lead + (ngroups, n), acc_f, name="qacc")

    def y_f(*idx: Any) -> Any:
        *rows, j = idx
        s_x = sx[xrow(rows)]

        def term(g: Any) -> Any:
            s_w = _f32(sw[param_index(wlay, (j, g * gsize))])
            return acc[tuple(rows) + (g, j)].astype("float32") * (s_x * s_w)

        if ngroups == 1:
            y = term(0)
        else:
            rg = te.reduce_axis((0, ngroups), name="g")
            return te.sum(term(rg), axis=rg)
        return y + bias[j] if bias is not None else y

    y = te.compute(lead + (n,), y_f, name="qmatmul")
    if bias is not None and ngroups > 1:
        y = te.compute(y.shape, lambda *i: y[i] + bias[i[-1]], name="qmatmul_bias")
    return y


def wmatmul_te(x: Any, wq: Any, sw: Any, zw: Any | None, wlay: QLayout, n: int, k: int, bias: Any | None,
               offset: Any | None = None) -> Any:
    """Weight-only ``qmatmul``: f32 ``x [..., K]`` times the dequantized (in-kernel) ``w [N, K]``."""
    from tvm import te

    lead = tuple(x.shape[:-1])

    def f(*idx: Any) -> Any:
        *rows, j = idx
        r = te.reduce_axis((0, k), name="k")
        return te.sum(x[tuple(rows) + (r,)].astype("float32") * _dequant_elem(wq, sw, zw, wlay, (j, r), offset), axis=r)

    y = te.compute(lead + (n,), f, name="wmatmul")
    if bias is not None:
        y = te.compute(y.shape, lambda *i: y[i] + bias[i[-1]], name="wmatmul_bias")
    return y


def qembedding_te(table: Any, scale: Any, zp: Any | None, lay: QLayout, ids: Any, dim: int,
                  out_dtype: str = "float32", offset: Any | None = None) -> Any:
    """Rows of a quantized ``[vocab, dim]`` table at ``ids``, dequantized as they are gathered."""
    from tvm import te

    def f(*idx: Any) -> Any:
        *pos, d = idx
        row = ids[tuple(pos)].astype("int64")
        v = _dequant_elem(table, scale, zp, lay, (row, d), offset)
        return v if out_dtype == "float32" else v.astype(out_dtype)

    return te.compute(tuple(ids.shape) + (dim,), f, name="qembedding")


def qembedding_tiles_te(tiles: Any, scale: Any, lay: QLayout, ids: Any, dim: int, out_dtype: str = "float32"
                        ) -> Any:
    """:func:`qembedding_te` for an int8 table stored as the w8a8 kernel's tiles ``[N / L, K / 4, L, 4]``
    (``qir.backends.tvm.kernels.qmatmul_vnni.pack_weight``; symmetric, per row or per tensor)."""
    from tvm import te

    lanes = int(tiles.shape[2])

    def f(*idx: Any) -> Any:
        *pos, d = idx
        row = ids[tuple(pos)].astype("int64")
        q = tiles[row // lanes, d // 4, row % lanes, d % 4].astype("int32")
        v = q.astype("float32") * scale[param_index(lay, (row, d))]
        return v if out_dtype == "float32" else v.astype(out_dtype)

    return te.compute(tuple(ids.shape) + (dim,), f, name="qembedding")


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack sub-byte codes ``[..., K]`` into ``uint8 [..., ceil(K / per)]``, each row padded on its own."""
    per = 8 // bits
    a = np.asarray(codes).astype(np.int64)
    pad = -a.shape[-1] % per
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), np.int64)], axis=-1)
    fields = (a & ((1 << bits) - 1)).astype(np.uint8).reshape(a.shape[:-1] + (a.shape[-1] // per, per))
    out = np.zeros(fields.shape[:-1], np.uint8)
    for i in range(per):
        out |= (fields[..., i] << (bits * i)).astype(np.uint8)
    return out

