"""Dense f32 matmul (qir ``linear`` / ``matmul`` without quantization), scheduled for CPU.

GEMM (``M`` > 1 or dynamic): the weight is re-laid per call into panels ``Bp[N/nr, K, nr]`` (one
contiguous ``nr``-wide row of B per k, so the inner loop is a vector load, a broadcast of ``A[m, k]``
and an FMA), then an ``mr x nr`` register tile accumulates over the whole of K, parallel over
(row-tile, column-panel) pairs. K is not split: a split that does not divide K puts a bound check on every FMA
(SmolLM2's K = 576 with blocks of 128 ran at 5-15 GFLOP/s instead of ~200), and with the tile's loops innermost
a K block buys no reuse. The packing costs ``N*K`` copies against ``M*N*K`` FMAs.
GEMV (static ``M == 1``): memory bound; parallel over N, each output a vectorized dot product over K
(``rfactor`` into vector-wide partial sums) straight from B's rows, with no packing.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import s_tir, te, tirx

from qir.backends.tvm.kernels.common import Dim, check_dims, f32_tile, is_static_one, target_of
from qir.backends.tvm.kernels.cpu_features import CpuFeatures, features_of


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_gemm(A: te.Tensor, M: Dim, N: int, K: int, b_value: Callable[[tirx.Var, tirx.Var], tirx.PrimExpr],
                bias_t: te.Tensor | None, nr: int, mr: int = 1) -> te.Tensor:
    """TE for ``Y[m, n] = sum_k A[m, k] * b(n, k) (+ bias[n])`` through panels ``B_pack[N/nr, K, nr]``.

    ``b_value(n, k)`` is the f32 weight element (a load, or a dequantization): it is evaluated once
    per element into the panels, padded with 0 past ``N``. A dynamic ``M`` is rounded up to whole ``mr``-row
    tiles (rows past ``M`` read row ``M - 1`` and are never written): without it every FMA of the register
    tile sits under a ``row < M`` predicate and the kernel runs 6x slower.
    """
    no = _ceil_div(N, nr)

    def b_at(o: tirx.Var, k: tirx.Var, i: tirx.Var) -> tirx.PrimExpr:
        n = o * nr + i
        if no * nr == N:
            return b_value(n, k)
        return tirx.if_then_else(n < N, b_value(tirx.min(n, N - 1), k), tirx.const(0.0, "float32"))

    Bp = te.compute((no, K, nr), b_at, name="B_pack")
    k = te.reduce_axis((0, K), name="k")
    if isinstance(M, int) or mr == 1:
        C = te.compute((M, N), lambda m, n: te.sum(A[m, k] * Bp[n // nr, k, n % nr], axis=k), name="C")
    else:
        mp = (M + (mr - 1)) // mr * mr
        C = te.compute((mp, N), lambda m, n: te.sum(A[tirx.min(m, M - 1), k] * Bp[n // nr, k, n % nr], axis=k),
                       name="C")
    if bias_t is not None:
        return te.compute((M, N), lambda m, n: C[m, n] + bias_t[n], name="Y")
    # A copy epilogue all the same: it is the write-back of the register tile.
    return te.compute((M, N), lambda m, n: C[m, n], name="Y")


def gemm_compute(M: Dim, N: int, K: int, b_layout: str, bias: bool, nr: int, mr: int = 1
                 ) -> tuple[list[te.Tensor], te.Tensor]:
    """TE for ``Y = A @ B(.T) (+bias)`` through a packed B; returns (params, Y)."""
    A = te.placeholder((M, K), "float32", name="A")
    B = te.placeholder((N, K) if b_layout == "NK" else (K, N), "float32", name="B")
    bias_t = te.placeholder((N,), "float32", name="bias") if bias else None
    Y = packed_gemm(A, M, N, K, lambda n, k: B[n, k] if b_layout == "NK" else B[k, n], bias_t, nr, mr)
    return [A, B] + ([bias_t] if bias_t is not None else []), Y


def schedule_gemm(sch: s_tir.Schedule, feat: CpuFeatures, block: str, mr: int, nr: int,
                  epilogue: str, pack: str | None) -> None:
    """Register-tile the reduction ``block`` (loops m, n, k) into ``mr x nr`` accumulators.

    The accumulator lives in a ``local`` buffer (compacted to the tile, so registers), the ``epilogue``
    block (which reads ``block``'s output and writes the result) runs per tile right after it, and the
    ``pack`` block (the B panels) is parallel over panels and vectorized over the panel width.
    """
    c = sch.get_sblock(block)
    m, n, k = sch.get_loops(c)
    mo, mi = sch.split(m, [None, mr])
    no, ni = sch.split(n, [None, nr])
    sch.reorder(mo, no, k, mi, ni)
    y = sch.get_sblock(epilogue)
    sch.reverse_compute_at(y, no, preserve_unit_loops=True)
    sch.parallel(sch.fuse(mo, no))
    sch.unroll(mi)
    sch.vectorize(ni)
    sch.decompose_reduction(c, k)
    sch.vectorize(sch.split(sch.get_loops(y)[-1], [None, feat.f32_lanes])[1])
    if pack is not None:
        o, _, i = sch.get_loops(sch.get_sblock(pack))
        sch.parallel(o)
        sch.vectorize(i)


def matmul_f32(M: Dim, N: int, K: int, target: tvm.target.Target | str | dict, *, b_layout: str = "NK",
               bias: bool = False) -> tirx.PrimFunc | None:
    """Scheduled ``Y[M, N] = A[M, K] @ B.T (b_layout "NK") or A @ B ("KN") (+ bias[N])``; see the package doc."""
    check_dims("matmul_f32", M=M, N=N, K=K)
    if b_layout not in ("NK", "KN"):
        raise ValueError(f"matmul_f32: b_layout must be 'NK' or 'KN', got {b_layout!r}")
    feat = features_of(target_of(target))
    if feat is None:
        return None
    if is_static_one(M) and b_layout == "NK":
        return _gemv(N, K, bias, feat)
    tile = f32_tile(feat)
    params, Y = gemm_compute(M, N, K, b_layout, bias, tile.nr, tile.mr)
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    schedule_gemm(sch, feat, "C", tile.mr, tile.nr, "Y", "B_pack")
    return sch.mod["main"].with_attr("global_symbol", "main")


def _gemv(N: int, K: int, bias: bool, feat: CpuFeatures) -> tirx.PrimFunc:
    A = te.placeholder((1, K), "float32", name="A")
    B = te.placeholder((N, K), "float32", name="B")
    k = te.reduce_axis((0, K), name="k")
    C = te.compute((1, N), lambda m, n: te.sum(A[m, k] * B[n, k], axis=k), name="C")
    params = [A, B]
    if bias:
        bias_t = te.placeholder((N,), "float32", name="bias")
        Y = te.compute((1, N), lambda m, n: C[m, n] + bias_t[n], name="Y")
        params.append(bias_t)
    else:
        Y = C
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    schedule_gemv_rows(sch, "C", feat, **streaming_gemv(K, feat))
    if bias:
        sch.reverse_compute_at(sch.get_sblock("Y"), sch.get_loops(sch.get_sblock("C"))[0])
    return sch.mod["main"].with_attr("global_symbol", "main")


def streaming_gemv(K: int, feat: CpuFeatures) -> dict[str, int]:
    """``schedule_gemv_rows`` options for a memory-bound GEMV over rows of ``K`` elements (see there)."""
    return {"rows": 1, "vectors": 2 if K % (2 * feat.f32_lanes) == 0 else 1}


def schedule_gemv_rows(sch: s_tir.Schedule, block: str, feat: CpuFeatures, rows: int = 8, vectors: int = 1
                       ) -> None:
    """GEMV over B's rows: ``rows`` outputs at a time, each ``vectors`` vectors of partial sums.

    ``rfactor`` splits every dot product into ``lanes * vectors`` partial sums kept in registers
    (``rows x lanes * vectors``), walked contiguously along K; the horizontal sums follow per chunk of rows.
    Parallel over chunks of output columns. ``block`` has loops (m=1, n, k).

    ``rows`` trades memory order for arithmetic overlap. Several rows at a time read ``rows`` streams that jump
    a row's length apart, which the hardware prefetcher follows badly: from DRAM, SmolLM2's int8 head
    (49152 x 576) streamed at 10.4 GB/s with 8 rows, 17.6 GB/s with 1 row, 18.3 GB/s with 1 row of 2 vectors.
    A memory-bound GEMV (f32, int8) therefore takes ``rows=1, vectors=2``; an int4 GEMV spends more instructions
    per byte on unpacking and keeps several rows (8 here: 10.7 GB/s of codes against 8.1 with 1 row; the grouped
    int4 GEMV of ``wmatmul`` is a kernel of its own, ``_grouped_gemv4``).
    """
    lanes = feat.f32_lanes * vectors
    c = sch.get_sblock(block)
    loops = sch.get_loops(c)
    k, inner = loops[2], loops[3:]  # inner: an optional small reduction (int4: the two nibbles of a byte)
    _, ki = sch.split(k, [None, lanes])
    rf = sch.rfactor(ki, 2)  # partial sums in a buffer [1, N, lanes]: lanes innermost
    m, n, ko, ki, *inner = sch.get_loops(rf)
    no, ni = sch.split(n, [None, rows])
    sch.reorder(no, m, ko, ni, *inner, ki)
    for loop in inner:
        sch.unroll(loop)
    sch.parallel(no)
    sch.reverse_compute_at(c, no)
    sch.unroll(ni)
    sch.vectorize(ki)
    sch.decompose_reduction(rf, ko)
