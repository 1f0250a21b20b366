"""Dynamic per-token quantization (qir ``quantize`` with ``q(axis=-1, group=K, dynamic)``) as one CPU kernel.

Generic lowering: ``min`` and ``max`` over each row, the scale (and zero point), then the codes: four passes over
the activations and four kernels. Here each row (parallel) is read once for its range (vectorized ``min``/``max``
into per-lane partials) and once for its codes, and the scale is computed in between, exactly as
:func:`qir.backends.tvm.qops.dyn_scale_te` / :func:`~qir.backends.tvm.qops.quantize_te` (and so the interpreter)
compute it: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``; symmetric ``s = max(|lo|, |hi|) / qmax`` (1 when
zero), asymmetric ``s = (hi - lo) / (qmax - qmin)`` and ``zp = clip(qmin - rint(lo / s), qmin, qmax)``; ``s`` at
least the smallest normal f32; codes ``clip(rint(x / s) + zp, qmin, qmax)`` with NaN -> 0 (a division, never a
multiplication by ``1 / s``: the codes are bit-exact).

Parameters: ``X [M, K] f32``, ``QR [2] f32`` = ``[qmin, qmax]``; outputs (destination-passing, in this order)
the codes ``C [M, K]`` (``int8`` or ``uint8``), the scales ``S [M] f32`` and, when asymmetric, the zero points
``Z [M] int32``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from qir.backends.tvm.kernels.common import Dim, check_dims, target_of
from qir.backends.tvm.kernels.cpu_features import features_of

__all__ = ["nan0", "quantize_rows", "rint", "symmetric_scale"]


def rint(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """Round half to even, vectorizable: from floor (exact: ``v - floor(v)`` is exact in f32). TVM's vectorizer
    scalarizes ``nearbyint`` (not marked vectorizable) and LLVM then vectorizes that scalar loop with gathers (5x
    slower); the ``(v + 1.5 * 2^23) - 1.5 * 2^23`` trick is folded away by TVM's simplifier."""
    half, one, two = (tirx.const(c, "float32") for c in (0.5, 1.0, 2.0))
    r = tirx.floor(v)
    d = v - r
    odd = r - two * tirx.floor(r * half) != tirx.const(0.0, "float32")
    return tirx.Select(tirx.Or(d > half, tirx.And(d == half, odd)), r + one, r)


def nan0(q: tirx.PrimExpr) -> tirx.PrimExpr:
    """``q``, or 0 where it is NaN (qir's quantize maps NaN to code 0)."""
    return tirx.Select(q != q, tirx.const(0.0, "float32"), q)


def symmetric_scale(lo: str, hi: str, qmax: str) -> str:
    """TVMScript of qir's dynamic symmetric scale from a range ``[lo, hi]`` (``lo <= 0 <= hi``): ``max(|lo|, |hi|)
    / qmax``, 1 for an all-zero range, at least the smallest normal f32 (the interpreter's ``_floor_scale``)."""
    tiny = float(np.finfo(np.float32).tiny)
    m = f"T.max(T.fabs({lo}), T.fabs({hi}))"
    return f"T.max(T.Select({m} > T.float32(0), {m} / {qmax}, T.float32(1)), T.float32({tiny!r}))"


def quantize_rows(M: Dim, K: int, target: tvm.target.Target | str | dict, *, out_dtype: str = "int8",
                  qmin: int = -128, qmax: int = 127, symmetric: bool = True) -> tirx.PrimFunc | None:
    """The scheduled kernel (see the module docstring), or ``None`` for a non-``llvm`` target."""
    check_dims("quantize_rows", M=M, K=K)
    feat = features_of(target_of(target))
    if feat is None:
        return None
    if out_dtype not in ("int8", "uint8"):
        raise ValueError(f"quantize_rows: out_dtype must be int8 or uint8, got {out_dtype!r}")
    L = feat.f32_lanes  # noqa: N806
    m = "m" if not isinstance(M, int) else str(M)
    m_decl = "    m = T.int64()\n" if not isinstance(M, int) else ""
    kv = K // L * L
    tiny = float(np.finfo(np.float32).tiny)
    # The clamp range comes in as a tensor, ``QR = [qmin, qmax]`` (f32): a second input keeps Relax's
    # RewriteDataflowReshape, which inspects every one-input call_tir as a possible reshape and requires a
    # block-structured function, away from this plain loop nest.
    if symmetric:
        scale = symmetric_scale("lo[0]", "hi[0]", "QR[1]")
    else:
        scale = (f"T.max(T.Select(hi[0] - lo[0] > T.float32(0), (hi[0] - lo[0]) / (QR[1] - QR[0]), T.float32(1)), "
                 f"T.float32({tiny!r}))")
    z_param = "" if symmetric else ", z: T.handle"
    z_buf = "" if symmetric else f'    Z = T.match_buffer(z, ({m},), "int32")\n'
    zp = "" if symmetric else " + zf[0]"
    z_body = "" if symmetric else """
        zf[0] = T.max(T.min(QR[0] - T.nearbyint(lo[0] / sc[0]), QR[1]), QR[0])
        Z[row] = T.Cast("int32", zf[0])"""

    def code(kk: str) -> str:
        # No let-bound index inside the vectorized loop: TVM 0.27's vectorizer keeps only the last lane of it.
        return f"T.Cast(\"{out_dtype}\", T.max(T.min(nan0(rint(X[row, {kk}] / sc[0]){zp}), QR[1]), QR[0]))"

    src = f'''
@T.prim_func
def main(x: T.handle, qr: T.handle, c: T.handle, s: T.handle{z_param}):
    T.func_attr({{"global_symbol": "main", "tirx.noalias": True}})
{m_decl}    X = T.match_buffer(x, ({m}, {K}), "float32")
    QR = T.match_buffer(qr, (2,), "float32")
    C = T.match_buffer(c, ({m}, {K}), "{out_dtype}")
    S = T.match_buffer(s, ({m},), "float32")
{z_buf}    for row in T.parallel({m}):
        lv = T.alloc_buffer(({L},), "float32")
        hv = T.alloc_buffer(({L},), "float32")
        lo = T.alloc_buffer((1,), "float32")
        hi = T.alloc_buffer((1,), "float32")
        sc = T.alloc_buffer((1,), "float32")
        zf = T.alloc_buffer((1,), "float32")
        for c in T.vectorized({L}):
            lv[c] = T.float32(0)
            hv[c] = T.float32(0)
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                lv[c] = T.min(lv[c], X[row, ko * {L} + c])
                hv[c] = T.max(hv[c], X[row, ko * {L} + c])
        lo[0] = T.float32(0)
        hi[0] = T.float32(0)
        for c in range({L}):
            lo[0] = T.min(lo[0], lv[c])
            hi[0] = T.max(hi[0], hv[c])
        for kt in range({kv}, {K}):
            lo[0] = T.min(lo[0], X[row, kt])
            hi[0] = T.max(hi[0], X[row, kt])
        sc[0] = {scale}
        S[row] = sc[0]{z_body}
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                C[row, ko * {L} + c] = {code(f"ko * {L} + c")}
        for kk in range({kv}, {K}):
            C[row, kk] = {code("kk")}
'''

    func = tvm.script.from_source(src, extra_vars={"T": T, "nan0": nan0, "rint": rint})
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
