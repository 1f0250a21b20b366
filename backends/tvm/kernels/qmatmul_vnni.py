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

import tvm
from tvm import tirx

from qir.backends.tvm.kernels.common import Dim

MR = 4  # rows of A per tile
NT = 4  # vectors along N per tile: 16 accumulators + A broadcasts + W loads fit 32 zmm / 32 NEON registers

# isa: (int32 lanes, LLVM intrinsic, signedness the instruction wants for A)
ISAS = {
    "vnni": (16, "llvm.x86.avx512.vpdpbusd.512", "uint8"),
    "sdot": (4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8"),
}


def qmatmul_vnni(M: Dim, N: int, K: int, *, a_dtype: str, a_scale: str, a_zero_point: int,
                 bias: bool, isa: str = "vnni") -> tirx.PrimFunc:
    """The dot-product kernel with :func:`~qir.backends.tvm.kernels.qmatmul_i8`'s parameters (``K % 4 == 0``).

    ``isa="vnni"``: x86 ``vpdpbusd`` (u8 x s8, 16 lanes); ``isa="sdot"``: AArch64 ``sdot`` (s8 x s8,
    4 lanes; uint8 activations are flipped to ``A - 128`` and ``c = za - 128``).
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
    src = f'''
@T.prim_func
def main(a: T.handle, w: T.handle, a_s: T.handle, w_s: T.handle, {bias_param}y: T.handle):
    T.func_attr({{"global_symbol": "main", "tirx.noalias": True}})
{m_decl}    A = T.match_buffer(a, ({m}, {K}), "{a_dtype}")
    W = T.match_buffer(w, ({N}, {K}), "int8")
    AS = T.match_buffer(a_s, {as_shape}, "float32")
    WS = T.match_buffer(w_s, ({N},), "float32")
{bias_buf}    Y = T.match_buffer(y, ({m}, {N}), "float32")
    Wp = T.alloc_buffer(({nbp}, {kb}, {L}, 4), "int8")
    RS = T.alloc_buffer(({nbp * L},), "int32")
    for o in T.parallel({nbp}):
        for i in range({L}):
            RS[o * {L} + i] = 0
            for kk in range(4 * {kb}):
                if o * {L} + i < {N}:
                    RS[o * {L} + i] = RS[o * {L} + i] + T.Cast("int32", W[o * {L} + i, kk])
        for q in range({kb}):
            for i in range({L}):
                for j in T.vectorized(4):
                    Wp[o, q, i, j] = T.if_then_else(o * {L} + i < {N}, W[T.min(o * {L} + i, {N - 1}), q * 4 + j],
                                                    T.int8(0))
    for t in T.parallel(({m} + {mr - 1}) // {mr} * {ntb}):
        acc = T.alloc_buffer(({mr}, {NT * L}), "int32", scope="local")
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
                            A.vload([T.min(t // {ntb} * {mr} + mi, {m} - 1), q * 4], "{a_dtype}x4"),
                            dtype="int32"){xor}, {L}), dtype="int8x{4 * L}"),
                        Wp.vload([t % {ntb} * {NT} + nt, q, 0, 0], "int8x{4 * L}"),
                        dtype="int32x{L}")
        for mi in range({mr}):
            row = t // {ntb} * {mr} + mi
            if row < {m}:
                for cc in range({NT * L}):
                    n = t % {ntb} * {NT * L} + cc
                    if n < {N}:
                        Y[row, n] = T.Cast("float32", acc[mi, cc]{comp}) * (AS[{as_row}] * WS[n]){bias_add}
'''
    func = tvm.script.from_source(src)
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
