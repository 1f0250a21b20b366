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
NT = 4  # 16-lane vectors along N per tile: 16 accumulators + A broadcasts + W loads fit 32 zmm


def qmatmul_vnni(M: Dim, N: int, K: int, *, a_dtype: str, a_scale: str, a_zero_point: int,
                 bias: bool) -> tirx.PrimFunc:
    """The VNNI kernel with :func:`~qir.backends.tvm.kernels.qmatmul_i8`'s parameters (``K % 4 == 0``)."""
    if K % 4:
        raise ValueError(f"qmatmul_vnni needs K % 4 == 0, got {K}")
    dyn = not isinstance(M, int)
    m = "m" if dyn else str(M)
    mr = MR if dyn or M >= MR else M
    nb = -(-N // 16)
    nbp = -(-nb // NT) * NT
    ntb = nbp // NT
    kb = K // 4
    shift = 128 if a_dtype == "int8" else 0
    c = shift + int(a_zero_point)
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
    Wp = T.alloc_buffer(({nbp}, {kb}, 16, 4), "int8")
    RS = T.alloc_buffer(({nbp * 16},), "int32")
    for o in T.parallel({nbp}):
        for i in range(16):
            RS[o * 16 + i] = 0
            for kk in range(4 * {kb}):
                if o * 16 + i < {N}:
                    RS[o * 16 + i] = RS[o * 16 + i] + T.Cast("int32", W[o * 16 + i, kk])
        for q in range({kb}):
            for i in range(16):
                for j in T.vectorized(4):
                    Wp[o, q, i, j] = T.if_then_else(o * 16 + i < {N}, W[T.min(o * 16 + i, {N - 1}), q * 4 + j],
                                                    T.int8(0))
    for t in T.parallel(({m} + {mr - 1}) // {mr} * {ntb}):
        acc = T.alloc_buffer(({mr}, {NT * 16}), "int32", scope="local")
        for mi in T.unroll({mr}):
            for cc in T.vectorized({NT * 16}):
                acc[mi, cc] = 0
        for q in range({kb}):
            for mi in T.unroll({mr}):
                for nt in T.unroll({NT}):
                    acc[mi, T.ramp(nt * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                        acc.vload([mi, nt * 16], "int32x16"),
                        T.reinterpret(T.broadcast(T.reinterpret(
                            A.vload([T.min(t // {ntb} * {mr} + mi, {m} - 1), q * 4], "{a_dtype}x4"),
                            dtype="int32"){xor}, 16), dtype="int8x64"),
                        Wp.vload([t % {ntb} * {NT} + nt, q, 0, 0], "int8x64"),
                        dtype="int32x16")
        for mi in range({mr}):
            row = t // {ntb} * {mr} + mi
            if row < {m}:
                for cc in range({NT * 16}):
                    n = t % {ntb} * {NT * 16} + cc
                    if n < {N}:
                        Y[row, n] = T.Cast("float32", acc[mi, cc]{comp}) * (AS[{as_row}] * WS[n]){bias_add}
'''
    func = tvm.script.from_source(src)
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
