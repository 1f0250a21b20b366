"""``layer_norm`` and ``rms_norm`` over the last axis as one CPU kernel: one parallel task per row, vectorized.

Legalized by TVM, each norm is a chain of reductions and elementwise kernels (mean, variance, normalize) that the
generic CPU rule schedules one by one: 10% of MiniLM w8a8 on ``tvm-llvm``. Here a row is read three times from
cache (sum, centered sum of squares, normalize) with per-lane partial sums, in qir's order of operations
(``qir/ops/nn.py``):

* ``layer_norm``: ``mean = sum(x) / K``; ``var = sum((x - mean)^2) / K``; ``y = (x - mean) / sqrt(var + eps) * w + b``;
* ``rms_norm``: ``ms = sum(x^2) / K``; ``y = x * (1 / sqrt(ms + eps)) * w``.

Float results differ from numpy's only by the summation order (relative 1e-7). Parameters: ``X [M, K] f32``,
``W [K] f32``, ``B [K] f32`` (``layer_norm`` only), output ``Y [M, K] f32``.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from qir.backends.tvm.kernels.common import Dim, check_dims, target_of
from qir.backends.tvm.kernels.cpu_features import features_of

__all__ = ["norm_rows"]


def norm_rows(M: Dim, K: int, target: tvm.target.Target | str | dict, *, kind: str, eps: float
              ) -> tirx.PrimFunc | None:
    """The scheduled norm (``kind`` ``"layer"`` or ``"rms"``), or ``None`` for a non-``llvm`` target or a row
    shorter than one vector."""
    check_dims("norm_rows", M=M, K=K)
    if kind not in ("layer", "rms"):
        raise ValueError(f"norm_rows: kind must be 'layer' or 'rms', got {kind!r}")
    feat = features_of(target_of(target))
    if feat is None:
        return None
    L = feat.f32_lanes  # noqa: N806
    if K < L:
        return None
    m = "m" if not isinstance(M, int) else str(M)
    m_decl = "    m = T.int64()\n" if not isinstance(M, int) else ""
    kv = K // L * L
    layer = kind == "layer"
    b_param = "b: T.handle, " if layer else ""
    b_buf = f'    B = T.match_buffer(b, ({K},), "float32")\n' if layer else ""

    def body(i: str) -> str:
        if layer:
            return f"(X[row, {i}] - mu[0]) / den[0] * W[{i}] + B[{i}]"
        return f"X[row, {i}] * den[0] * W[{i}]"

    if layer:
        stats = f'''
        for c in T.vectorized({L}):
            pv[c] = T.float32(0)
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                pv[c] = pv[c] + X[row, ko * {L} + c]
        acc[0] = T.float32(0)
        for c in range({L}):
            acc[0] = acc[0] + pv[c]
        for kt in range({kv}, {K}):
            acc[0] = acc[0] + X[row, kt]
        mu[0] = acc[0] / T.float32({float(K)!r})
        for c in T.vectorized({L}):
            pv[c] = T.float32(0)
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                pv[c] = pv[c] + (X[row, ko * {L} + c] - mu[0]) * (X[row, ko * {L} + c] - mu[0])
        acc[0] = T.float32(0)
        for c in range({L}):
            acc[0] = acc[0] + pv[c]
        for kt in range({kv}, {K}):
            acc[0] = acc[0] + (X[row, kt] - mu[0]) * (X[row, kt] - mu[0])
        den[0] = T.sqrt(acc[0] / T.float32({float(K)!r}) + T.float32({eps!r}))'''
    else:
        stats = f'''
        for c in T.vectorized({L}):
            pv[c] = T.float32(0)
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                pv[c] = pv[c] + X[row, ko * {L} + c] * X[row, ko * {L} + c]
        acc[0] = T.float32(0)
        for c in range({L}):
            acc[0] = acc[0] + pv[c]
        for kt in range({kv}, {K}):
            acc[0] = acc[0] + X[row, kt] * X[row, kt]
        den[0] = T.float32(1) / T.sqrt(acc[0] / T.float32({float(K)!r}) + T.float32({eps!r}))'''
    src = f'''
@T.prim_func
def main(x: T.handle, w: T.handle, {b_param}y: T.handle):
    T.func_attr({{"global_symbol": "main", "tirx.noalias": True}})
{m_decl}    X = T.match_buffer(x, ({m}, {K}), "float32")
    W = T.match_buffer(w, ({K},), "float32")
{b_buf}    Y = T.match_buffer(y, ({m}, {K}), "float32")
    for row in T.parallel({m}):
        pv = T.alloc_buffer(({L},), "float32")
        acc = T.alloc_buffer((1,), "float32")
        mu = T.alloc_buffer((1,), "float32")
        den = T.alloc_buffer((1,), "float32"){stats}
        for ko in range({K // L}):
            for c in T.vectorized({L}):
                Y[row, ko * {L} + c] = {body(f"ko * {L} + c")}
        for kk in range({kv}, {K}):
            Y[row, kk] = {body("kk")}
'''
    func = tvm.script.from_source(src, extra_vars={"T": T})
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
