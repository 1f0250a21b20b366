"""w8a8 integer matmul with the scale epilogue fused (qir ``qmatmul`` on the integer path), for CPU.

On AVX512-VNNI targets and AArch64 ``+dotprod`` (and ``K % 4 == 0``) the work goes to the
``vpdpbusd`` / ``sdot`` micro-kernel of :mod:`qir.backends.tvm.kernels.qmatmul_vnni`. Everywhere else
(AVX2-only x86 such as Zen 3, SSE, ARM without dotprod)
``acc = sum_k (A - za) * W`` runs in int32 vector arithmetic (sign-extend the bytes, multiply, add):
exact for every K qir accepts. The weight is re-laid per call into panels ``[N/nl, K/4, 4, nl]`` so
that for each k one vector load gives ``nl`` consecutive output columns; an ``mr x (nt*nl)`` register
tile accumulates, parallel over tiles; then ``Y = f32(acc) * (a_scale * w_scale) (+ bias)`` in f32
as the reference orders it (LLVM may contract ``* scale + bias`` into one FMA: last-bit differences).

Why not ``Schedule.tensorize`` with TVM's registered intrinsics: it segfaults with apache-tvm-ffi
0.1.15 (docs/notes/tvm-metaschedule.md). Why no AVX2 dot-product path: ``vpmaddubsw`` (the usual
AVX2 route) is not exact, its int16 pair sums saturate; a ``vpmaddwd`` path (int16 x int16, exact)
is the next step for Zen 3-class CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from qir.backends.tvm.kernels.common import Dim, check_dims, target_of
from qir.backends.tvm.kernels.cpu_features import CpuFeatures, features_of
from qir.backends.tvm.kernels.qmatmul_vnni import qmatmul_vnni


@dataclass(frozen=True)
class _Int8Plan:
    """Register tile of the int8 GEMM on one target."""

    nl: int  # int32 lanes of one vector: output columns per panel
    kl: int  # reduction steps unrolled per panel row (4)
    mr: int  # rows of A per register tile
    nt: int  # vectors along N per register tile


def _plan(feat: CpuFeatures) -> _Int8Plan:
    lanes = 16 if feat.avx512 else 8 if feat.avx2 else 4
    return _Int8Plan(lanes, 4, mr=4, nt=2)


def _ceil_to(a: int, b: int) -> int:
    return -(-a // b) * b


def prepack_isa(K: int, target: tvm.target.Target | str | dict) -> str | None:
    """The dot-product ISA (``"vnni"``/``"sdot"``) whose kernel takes a weight prepacked by
    :func:`~qir.backends.tvm.kernels.qmatmul_vnni.pack_weight`, or ``None`` (that target packs per call)."""
    feat = features_of(target_of(target))
    if feat is None or feat.int8_path not in ("vnni", "sdot") or K % 4:
        return None
    return feat.int8_path


def qmatmul_i8(M: Dim, N: int, K: int, target: tvm.target.Target | str | dict, *, a_dtype: str = "int8",
               a_scale: str = "token", a_zero_point: int = 0, bias: bool = False,
               prepacked: bool = False) -> tirx.PrimFunc | None:
    """Scheduled w8a8 ``qmatmul``; parameters and formula in :mod:`qir.backends.tvm.kernels`. ``prepacked``
    (only where :func:`prepack_isa` names an ISA): the weight comes as ``pack_weight``'s ``Wp, RS``."""
    check_dims("qmatmul_i8", M=M, N=N, K=K)
    if a_dtype not in ("int8", "uint8"):
        raise ValueError(f"qmatmul_i8: a_dtype must be 'int8' or 'uint8', got {a_dtype!r}")
    if a_scale not in ("token", "tensor"):
        raise ValueError(f"qmatmul_i8: a_scale must be 'token' (one per row) or 'tensor', got {a_scale!r}")
    feat = features_of(target_of(target))
    if feat is None:
        return None
    if feat.int8_path in ("vnni", "sdot") and K % 4 == 0:
        return qmatmul_vnni(M, N, K, a_dtype=a_dtype, a_scale=a_scale, a_zero_point=a_zero_point, bias=bias,
                            isa=feat.int8_path, prepacked=prepacked)
    if prepacked:
        raise ValueError("qmatmul_i8: prepacked weights need a vnni/sdot target and K % 4 == 0 (see prepack_isa)")
    plan = _plan(feat)
    za = int(a_zero_point)

    A = te.placeholder((M, K), a_dtype, name="A")
    W = te.placeholder((N, K), "int8", name="W")
    a_s = te.placeholder((M,) if a_scale == "token" else (1,), "float32", name="a_scale")
    w_s = te.placeholder((N,), "float32", name="w_scale")
    params = [A, W, a_s, w_s]
    bias_t = None
    if bias:
        bias_t = te.placeholder((N,), "float32", name="bias")
        params.append(bias_t)

    kp = _ceil_to(K, plan.kl)
    np_ = _ceil_to(N, plan.nl)
    # The zero point is subtracted as the activation is read (int32 arithmetic: exact, no compensation).
    Ap = te.compute((M, kp), lambda m, k: tirx.if_then_else(
        k < K, A[m, tirx.min(k, K - 1)].astype("int32") - za, tirx.const(0, "int32")), name="A_prep")

    def w_tile(o: tirx.Var, kk: tirx.Var, i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        n, k = o * plan.nl + i, kk * plan.kl + j
        val = W[n, k]
        if np_ != N or kp != K:
            val = tirx.if_then_else(tirx.all(n < N, k < K), val, tirx.const(0, "int8"))
        return val

    # n-lanes contiguous for each k, so the vector loop over n is one load (+ sign extension).
    Wp = te.compute((np_ // plan.nl, kp // plan.kl, plan.kl, plan.nl),
                    lambda o, kk, j, i: w_tile(o, kk, i, j), name="W_pack")
    k = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (M, np_),
        lambda m, n: te.sum(Ap[m, k] * Wp[n // plan.nl, k // plan.kl, k % plan.kl, n % plan.nl].astype("int32"),
                            axis=k),
        name="acc")

    def epilogue(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        total = acc[m, n]
        scale = (a_s[m] if a_scale == "token" else a_s[0]) * w_s[n]
        y = total.astype("float32") * scale
        return y + bias_t[n] if bias_t is not None else y

    Y = te.compute((M, N), epilogue, name="Y")
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    _schedule(sch, plan, feat)
    return sch.mod["main"].with_attr("global_symbol", "main")


def _schedule(sch: s_tir.Schedule, plan: _Int8Plan, feat: CpuFeatures) -> None:
    blk = sch.get_sblock("acc")
    m, n, k = sch.get_loops(blk)
    mo, mi = sch.split(m, [None, plan.mr])
    no, ni = sch.split(n, [None, plan.nl])
    noo, noi = sch.split(no, [None, plan.nt])
    ko, ki = sch.split(k, [None, plan.kl])
    sch.reorder(mo, noo, ko, mi, noi, ki, ni)
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, noo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(mo, noo))
    sch.unroll(mi)
    sch.unroll(noi)
    sch.unroll(ki)
    sch.vectorize(ni)
    sch.decompose_reduction(blk, ko)
    yl = sch.get_loops(y)
    sch.vectorize(sch.split(yl[-1], [None, feat.f32_lanes])[1])
    sch.compute_inline(sch.get_sblock("A_prep"))  # the zero-point subtraction happens in the loads
    o, _, _, i = sch.get_loops(sch.get_sblock("W_pack"))
    sch.parallel(o)
    sch.vectorize(i)
