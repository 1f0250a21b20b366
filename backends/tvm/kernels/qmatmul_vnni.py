"""The w8a8 matmul on AVX512-VNNI ``vpdpbusd``, as a TVMScript micro-kernel (no ``tensorize``).

``tensorize`` is unusable with the installed apache-tvm-ffi (it segfaults in the JSON serializer, see
docs/notes/tvm-metaschedule.md), so this kernel is written out directly: for every 4-deep slice of K,
one 4-byte load of a row of A broadcast to 16 lanes and one 64-byte load of a weight tile
``Wp[n/16, k/4, 16, 4]`` feed one ``vpdpbusd`` (16 int32 lanes += four u8 x s8 products each). An
``MR x (NT*16)`` tile of accumulators stays in registers; tiles are parallel.

``vpdpbusd`` multiplies UNSIGNED activation bytes: int8 activations are flipped to ``A + 128`` by an
XOR of the sign bits, and the kernel subtracts ``c * rowsum(W)`` (``c = 128 + za`` for int8, ``za``
for uint8) before the f32 epilogue. Products and sums are exact in int32. Needs ``K % 4 == 0``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx

from qir.backends.tvm.kernels.common import Dim

MR = 4  # rows of A per tile
W_STATIONARY = True  # tile order: see qmatmul_vnni
NT = 4  # vectors along N per tile: 16 accumulators + A broadcasts + W loads fit 32 zmm / 32 NEON registers

# isa: (int32 lanes, LLVM intrinsic, signedness the instruction wants for A)
ISAS = {
    "vnni": (16, "llvm.x86.avx512.vpdpbusd.512", "uint8"),
    "sdot": (4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8"),
}

# The per-call packing (when the weight is not prepacked): row sums and [N/L, K/4, L, 4] tiles.
_PACK = """    Wp = T.alloc_buffer(({nbp}, {kb}, {L}, 4), "int8")
    RS = T.alloc_buffer(({nbpl},), "int32")
    for o in T.parallel({nbp}):
        for i in range({L}):
            RS[o * {L} + i] = 0
            for kk in range(4 * {kb}):
                if o * {L} + i < {N}:
                    RS[o * {L} + i] = RS[o * {L} + i] + T.Cast("int32", W[o * {L} + i, kk])
        for q in range({kb}):
            for i in range({L}):
                for j in T.vectorized(4):
                    Wp[o, q, i, j] = T.if_then_else(o * {L} + i < {N}, W[T.min(o * {L} + i, {N1}), q * 4 + j],
                                                    T.int8(0))
"""


def pack_weight(w: np.ndarray, isa: str) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's weight tiles and row sums, computed once (at compile time) instead of in every call.

    ``w [N, K] int8`` -> ``Wp [nbp, K / 4, lanes, 4] int8`` (``Wp[o, q, i, j] = w[o * lanes + i, 4 q + j]``,
    zero past ``N``; ``nbp`` a multiple of ``NT``) and ``RS [nbp * lanes] int32`` (the rows' sums, for the
    activation zero-point / sign compensation). Exactly what the kernel's own packing loop writes.
    """
    lanes = ISAS[isa][0]
    n, k = w.shape
    if k % 4:
        raise ValueError(f"pack_weight needs K % 4 == 0, got {k}")
    nb = -(-n // lanes)
    nbp = -(-nb // NT) * NT
    full = np.zeros((nbp * lanes, k), np.int8)
    full[:n] = w
    wp = np.ascontiguousarray(full.reshape(nbp, lanes, k // 4, 4).transpose(0, 2, 1, 3))
    rs = full.astype(np.int32).sum(axis=1, dtype=np.int32)
    return wp, rs


def qmatmul_vnni(M: Dim, N: int, K: int, *, a_dtype: str, a_scale: str, a_zero_point: int,
                 bias: bool, isa: str = "vnni", prepacked: bool = False) -> tirx.PrimFunc:
    """The dot-product kernel with :func:`~qir.backends.tvm.kernels.qmatmul_i8`'s parameters (``K % 4 == 0``).

    ``isa="vnni"``: x86 ``vpdpbusd`` (u8 x s8, 16 lanes); ``isa="sdot"``: AArch64 ``sdot`` (s8 x s8,
    4 lanes; uint8 activations are flipped to ``A - 128`` and ``c = za - 128``). ``prepacked``: the weight
    parameter is replaced by :func:`pack_weight`'s two arrays (``Wp``, ``RS``, in that order) and the
    per-call packing loop is left out.
    """
    if K % 4:
        raise ValueError(f"qmatmul_vnni needs K % 4 == 0, got {K}")
    lanes, intrin, want = ISAS[isa]
    dyn = not isinstance(M, int)
    m = "m" if dyn else str(M)
    mr = MR if dyn or M >= MR else M
    nb = -(-N // lanes)
    nbp = -(-nb // NT) * NT
    ntb = nbp // NT
    kb = K // 4
    nrb = f"(({m} + {mr - 1}) // {mr})"
    if W_STATIONARY:
        # Consecutive tiles (one thread's run of t) walk down the rows under ONE weight panel, so the panel
        # (64 columns x K bytes: 24 KB at K=384) stays in L1 and only the small A blocks stream from L2.
        rb, cb = f"t % {nrb}", f"t // {nrb}"
    else:
        rb, cb = f"t // {ntb}", f"t % {ntb}"
    shift = 0 if a_dtype == want else 128 if want == "uint8" else -128  # A' - A
    c = shift + int(a_zero_point)
    L = lanes  # noqa: N806 (short, for the template)
    xor = " ^ T.int32(-2139062144)" if shift else ""  # 0x80808080: flip each byte's sign bit
    as_shape = f"({m},)" if a_scale == "token" else "(1,)"
    as_row = "row" if a_scale == "token" else "0"
    bias_param = "bias: T.handle, " if bias else ""
    bias_buf = f'    B = T.match_buffer(bias, ({N},), "float32")\n' if bias else ""
    bias_add = " + B[n]" if bias else ""
    comp = f" - {c} * RS[n]" if c else ""
    m_decl = '    m = T.int64()\n' if dyn else ""
    if prepacked:
        w_params = "wp: T.handle, rs: T.handle"
        w_bufs = (f'    Wp = T.match_buffer(wp, ({nbp}, {kb}, {L}, 4), "int8")\n'
                  f'    RS = T.match_buffer(rs, ({nbp * L},), "int32")\n')
        pack = ""
    else:
        w_params = "w: T.handle"
        w_bufs = f'    W = T.match_buffer(w, ({N}, {K}), "int8")\n'
        pack = _PACK.format(nbp=nbp, nbpl=nbp * L, L=L, kb=kb, N=N, N1=N - 1)
    if N % (NT * L) == 0:
        # Whole tiles only: the epilogue is vectorized (no per-column bound check).
        nn = f"{cb} * {NT * L} + cc"
        comp_v, bias_v = comp.replace("[n]", f"[{nn}]"), bias_add.replace("[n]", f"[{nn}]")
        epilogue = (f"                for cc in T.vectorized({NT * L}):\n"
                    f"                    Y[row, {nn}] = T.Cast(\"float32\", acc[mi, cc]{comp_v})"
                    f" * (AS[{as_row}] * WS[{nn}]){bias_v}\n")
    else:
        epilogue = (f"                for cc in range({NT * L}):\n"
                    f"                    n: T.let = {cb} * {NT * L} + cc\n"
                    f"                    if n < {N}:\n"
                    f"                        Y[row, n] = T.Cast(\"float32\", acc[mi, cc]{comp})"
                    f" * (AS[{as_row}] * WS[n]){bias_add}\n")
    src = f'''
@T.prim_func
def main(a: T.handle, {w_params}, a_s: T.handle, w_s: T.handle, {bias_param}y: T.handle):
    T.func_attr({{"global_symbol": "main", "tirx.noalias": True}})
{m_decl}    A = T.match_buffer(a, ({m}, {K}), "{a_dtype}")
{w_bufs}    AS = T.match_buffer(a_s, {as_shape}, "float32")
    WS = T.match_buffer(w_s, ({N},), "float32")
{bias_buf}    Y = T.match_buffer(y, ({m}, {N}), "float32")
{pack}
    for t in T.parallel({nrb} * {ntb}):
        acc = T.alloc_buffer(({mr}, {NT * L}), "int32")
        for mi in T.unroll({mr}):
            for cc in T.vectorized({NT * L}):
                acc[mi, cc] = 0
        for q in range({kb}):
            for mi in T.unroll({mr}):
                for nt in T.unroll({NT}):
                    acc[mi, T.ramp(nt * {L}, 1, {L})] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("{intrin}"),
                        acc.vload([mi, nt * {L}], "int32x{L}"),
                        T.reinterpret(T.broadcast(T.reinterpret(
                            A.vload([T.min({rb} * {mr} + mi, {m} - 1), q * 4], "{a_dtype}x4"),
                            dtype="int32"){xor}, {L}), dtype="int8x{4 * L}"),
                        Wp.vload([{cb} * {NT} + nt, q, 0, 0], "int8x{4 * L}"),
                        dtype="int32x{L}")
        for mi in range({mr}):
            row: T.let = {rb} * {mr} + mi
            if row < {m}:
{epilogue}'''
    func = tvm.script.from_source(src)
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
