"""The w4a8 decode GEMV: grouped 4-bit weights times int8 per-token activations, as integer dot products.

``y[n] = sx * sum_g s[n, g] * (sum_{k in g} xq[k] * u[n, k] - z[n, g] * sum_{k in g} xq[k])`` (+ bias), the
value qir's integer ``qmatmul`` path gives (``qir.ops.quantized._integer_path``) up to the order of the float
sums over groups: ``xq`` the activation codes (symmetric int8, one scale ``sx`` per token), ``u`` the weight's
unsigned nibbles (a signed ``i4`` code's nibble with its sign bit flipped, zero point 8), ``z`` the zero point.

Why: the w4a16 GEMV converts every nibble to f32 and spends two vector FMAs per 32 weights and row on it, and
stays compute bound (~30 Gweights/s on 2 Zen 4 cores). Here a group of 32 weights is ONE dot-product instruction
on the packed bytes: the 16 bytes of a group are split into their low nibbles (even ``k``) and high nibbles (odd
``k``), 32 unsigned bytes, against the group's 32 activation codes rearranged once per call to the same order
(16 even, then 16 odd). Per ISA:

* ``vnni`` (AVX512-VNNI + VL): ``vpdpbusd`` on 256 bits (u8 x s8, 8 int32 lanes += four products each);
* ``avx2``: ``vpmaddubsw`` (u8 x s8 -> pairs summed into int16: at most ``2 * 15 * 128``, never saturates, which
  is why 4-bit weights have an AVX2 path and the w8a8 kernel does not) then ``vpmaddwd`` with ones;
* ``sdot`` (AArch64 +dotprod): two ``sdot`` on 16 bytes (nibbles 0..15 are valid signed bytes).

Each group's int32 lanes are converted to f32 and multiplied by the group's scale (one broadcast FMA); the zero
point and minimum terms are one dot product of length ``G`` per row against the group sums of ``xq`` (computed
once per call). ``rows`` output rows share each activation load, and decode their block parameters once. Needs
``group % 32 == 0`` and ``K % group == 0``.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from qir.backends.tvm.kernels.common import target_of
from qir.backends.tvm.kernels.cpu_features import features_of

__all__ = ["w4a8_gemv", "w4a8_isa"]

ROWS = 4  # output rows per task (they share the activation loads), 16-byte group path
PREFETCH_ROWS = 8  # the 64-byte path prefetches the row this many rows ahead (see w4a8_gemv)


def w4a8_isa(target: tvm.target.Target | str | dict) -> str | None:
    """The dot-product path for ``target``: ``"vnni"``, ``"avx2"``, ``"sdot"``, or ``None`` (no kernel)."""
    feat = features_of(target_of(target))
    if feat is None:
        return None
    if feat.int8_path != "generic":  # the int8 kernels' dot-product ISA (vnni, sdot)
        return feat.int8_path
    return "avx2" if feat.avx2 else None  # exact for 4-bit weights (see the module docstring)


def _dot(isa: str, acc: str, w: str, x: str) -> tuple[str, int]:
    """TVMScript of ``acc += dot(w, x)`` over 32 bytes (``w`` u8x32, ``x`` int8x32), and the int32 lanes."""
    if isa == "vnni":
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), {acc}, '
                f'T.reinterpret({w}, dtype="int8x32"), {x}, dtype="int32x8")'), 8
    if isa == "avx2":
        pairs = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), '
                 f'T.reinterpret({w}, dtype="int8x32"), {x}, dtype="int16x16")')
        quads = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), {pairs}, '
                 f'T.broadcast(T.int16(1), 16), dtype="int32x8")')
        return f"{acc} + {quads}", 8
    if isa == "sdot":
        lo = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), {acc}, '
              f'T.reinterpret(T.Shuffle([{w}], {list(range(16))}), dtype="int8x16"), '
              f'T.Shuffle([{x}], {list(range(16))}), dtype="int32x4")')
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), {lo}, '
                f'T.reinterpret(T.Shuffle([{w}], {list(range(16, 32))}), dtype="int8x16"), '
                f'T.Shuffle([{x}], {list(range(16, 32))}), dtype="int32x4")'), 4
    raise ValueError(f"w4a8_gemv: unknown ISA {isa!r}")


def _dot2(isa: str, lo: str, xe: str, hi: str, xo: str) -> str:
    """TVMScript of ``dot(lo, xe) + dot(hi, xo)`` as int32x8, each operand 32 bytes (x86 paths only)."""
    if isa == "vnni":
        first = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), '
                 f'T.broadcast(T.int32(0), 8), T.reinterpret({lo}, dtype="int8x32"), {xe}, dtype="int32x8")')
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), {first}, '
                f'T.reinterpret({hi}, dtype="int8x32"), {xo}, dtype="int32x8")')
    if isa == "avx2":  # the two int16 pair sums added first: 2 * 2 * 15 * 128 < 2^15, still exact
        def pairs(w: str, x: str) -> str:
            return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), '
                    f'T.reinterpret({w}, dtype="int8x32"), {x}, dtype="int16x16")')
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), '
                f'{pairs(lo, xe)} + {pairs(hi, xo)}, T.broadcast(T.int16(1), 16), dtype="int32x8")')
    raise ValueError(f"w4a8_gemv: no paired dot product for {isa!r}")


def _quantize_token(K: int, qmin: int, qmax: int) -> str:
    """TVMScript filling ``XQ [1, K]`` and ``XS [1]`` from ``X [1, K]`` as qir's symmetric per-token ``quantize``."""
    from qir.backends.tvm.kernels.quantize_rows import symmetric_scale

    code = f'T.Cast("int8", T.max(T.min(nan0(rint(X[0, k] / XS[0])), T.float32({qmax})), T.float32({qmin})))'
    return f"""\
    lo = T.alloc_buffer((1,), "float32")
    hi = T.alloc_buffer((1,), "float32")
    lo[0] = T.float32(0)
    hi[0] = T.float32(0)
    for k in range({K}):
        lo[0] = T.min(lo[0], X[0, k])
        hi[0] = T.max(hi[0], X[0, k])
    XS[0] = {symmetric_scale("lo[0]", "hi[0]", f"T.float32({qmax})")}
    for k in range({K}):
        XQ[0, k] = {code}"""


def _block_param(name: str, form: str | tuple[str, str, str], N: int, G: int) -> tuple[str, str, str]:
    """(handles, buffers, value at ``[n, g]``) of a per-group parameter: ``"float32"``/``"float16"`` ``[N, G]``, or
    two-level (``compress-scales``) ``(codes_dtype, row_scale_dtype, row_base_dtype)``: codes ``[N, G]`` and a
    scale and a base per row, the value ``f32(code) * row_scale + row_base``."""
    u = name.upper()
    if isinstance(form, tuple):
        cdt, rdt, bdt = form
        return (f"{name}_codes: T.handle, {name}_rs: T.handle, {name}_rb: T.handle, ",
                f'    {u}C = T.match_buffer({name}_codes, ({N}, {G}), "{cdt}")\n'
                f'    {u}R = T.match_buffer({name}_rs, ({N},), "{rdt}")\n'
                f'    {u}B = T.match_buffer({name}_rb, ({N},), "{bdt}")\n',
                f'(T.Cast("float32", T.Cast("int32", {u}C[n, g])) * T.Cast("float32", {u}R[n])'
                f' + T.Cast("float32", {u}B[n]))')
    return (f"{name}: T.handle, ", f'    {u} = T.match_buffer({name}, ({N}, {G}), "{form}")\n',
            f'T.Cast("float32", {u}[n, g])')


def w4a8_gemv(N: int, K: int, group: int, target: tvm.target.Target | str | dict, *, signed: bool,
              zp_dtype: str | None, scale: str | tuple[str, str, str], offset: str | tuple[str, str, str] | None = None,
              bias: bool = False, rows: int | None = None, float_x: bool = False,
              quantize_x: tuple[int, int] | None = None) -> tirx.PrimFunc | None:
    """The scheduled kernel, or ``None`` where there is none (no dot-product ISA, ``group % 32``, ``K % group``).

    Parameters in call order: ``xq [1, K] int8``, ``sx [1] f32``, ``w [N, K/2] uint8`` (two nibbles per byte, even
    ``k`` low), the scale, ``zp [N, G] zp_dtype`` when ``zp_dtype``, the offset (a float minimum per group: ``w =
    scale * q + offset``) when ``offset``, ``bias [N] f32`` when ``bias``, and ``y [1, N] f32``. ``scale`` and
    ``offset`` take the forms of :func:`_block_param`. The offset adds ``offset * sum_{k in g} xq[k]`` per group
    before the activation scale, like the zero point's term.

    ``float_x``: the w4a16 decode GEMV on the same dot products. The first parameter is the token itself (``x [1, K]
    f32``, no ``sx``), which the kernel splits, per chunk of 32, into two int8 parts against the chunk's scale ``a =
    max|x| / 127``: ``x = a * (h + l / 254)`` with ``h = round(x / a)`` and ``l = round((x / a - h) * 254)``, both
    in [-127, 127], so ``x`` is carried to within ``a / 508`` (1.6e-5 of the chunk's largest magnitude: finer than
    an f16 activation for all but the chunk's smallest values) and each 64 weights cost four dot products instead of
    a float conversion and FMA per weight. Zero points and minimums use the exact float sums of ``x``. Only on x86
    (``vnni``/``avx2``) with ``group == 32`` and ``K % 64 == 0``; ``None`` elsewhere.

    ``quantize_x = (qmin, qmax)``: the first parameter is the float token (``x [1, K] f32``, no ``sx``), quantized
    here, before the parallel loop, exactly as qir's dynamic symmetric per-token ``quantize`` (and the
    ``quantize_rows`` kernel) does it: ``s = max(|min(x, 0)|, |max(x, 0)|) / qmax`` (1 for an all-zero token, at
    least the smallest normal f32), codes ``clip(rint(x / s), qmin, qmax)`` with NaN -> 0, a division, round half
    to even. One kernel launch per projection instead of two.
    """
    isa = w4a8_isa(target)
    if isa is None or group % 32 or K % group or N < 1:
        return None
    if signed and zp_dtype:  # zero points go with unsigned codes (qir's asymmetric specs); the sign flip assumes 8
        return None
    if float_x and not (isa in ("vnni", "avx2") and group == 32 and K % 64 == 0):
        return None
    if float_x and quantize_x is not None:
        raise ValueError("w4a8_gemv: float_x and quantize_x are two different inputs; give one")
    G, chunks = K // group, group // 32
    # x86, K a multiple of 64: 64 weights (32 bytes) per step, their low nibbles (even k) and high nibbles (odd k)
    # each one 32-byte dot product against the codes arranged to match, so no shuffle joins the two halves; int32
    # lanes 0-3 then belong to the first 32 weights, 4-7 to the next. Per 64 weights and row: one load, shift and
    # masks, two dot products, one convert and one FMA (the scale of each half in its lanes), about half the
    # instructions of one group at a time. Arm keeps 16-byte groups (its dot product is 128 bits wide anyway).
    #
    # Rows per task: each row is one more stream of weight bytes, and from DRAM several streams a row apart stream
    # worse than one (the hardware prefetcher; with software prefetching PREFETCH_ROWS ahead): SmolLM2's GEMVs with
    # weights out of cache (200 copies, 2 threads) took 15.6 / 27.2 us (1536 x 576 / 576 x 1536) with 2 rows, 18.8 /
    # 29.4 with 4, 22.5 / 17.6 with 1. So 2 rows for short rows, 1 for long ones.
    paired = isa in ("vnni", "avx2") and K % 64 == 0 and (group == 32 or group % 64 == 0)
    if rows is None:
        rows = (2 if K <= 1024 else 1) if paired else ROWS
    s_params, s_bufs, s_at = _block_param("s", scale, N, G)
    o_params, o_bufs, o_at = _block_param("o", offset, N, G) if offset is not None else ("", "", None)
    z_param = "z: T.handle, " if zp_dtype else ""
    z_buf = f'    Z = T.match_buffer(z, ({N}, {G}), "{zp_dtype}")\n' if zp_dtype else ""
    zero = ('T.Cast("float32", T.Cast("int32", Z[n, g]))' if zp_dtype else
            ("T.float32(8)" if signed else None))
    # The per-group term against the group sums of xq: offset - scale * zero point.
    const = None if zero is None else f"-(SD[rr, g] * {zero})"
    if o_at is not None:
        const = o_at if const is None else f"{o_at} {const}"
    b_param = "b: T.handle, " if bias else ""
    b_buf = f'    B = T.match_buffer(b, ({N},), "float32")\n' if bias else ""
    b_add = " + B[n]" if bias else ""
    flip = " ^ T.broadcast(T.uint8(136), 16)" if signed else ""  # 0x88: both nibbles' sign bits
    dot, L = _dot(isa, "iacc[rr, T.ramp(0, 1, {L})]", "wv", "xv")
    dot = dot.replace("{L}", str(L))
    ntask = -(-N // rows)
    const_dec = zero_term = ""
    if const is not None:
        const_dec = f"                CD[rr, g] = {const}\n"
        # Vectorized into the row's partial sums (as one scalar chain of G dependent FMAs it cost as much as the
        # dot products of a 1536-wide row); the last G % L groups one at a time.
        zero_term = f"""\
        for rr in T.unroll({rows}):
            for go in range({G // L}):
                for c in T.vectorized({L}):
                    facc[rr, c] = facc[rr, c] + CD[rr, go * {L} + c] * XG[go * {L} + c]
            for g in range({G // L * L}, {G}):
                zacc[rr] = zacc[rr] + CD[rr, g] * XG[g]
"""
    body = []
    if paired:
        flip32 = " ^ T.broadcast(T.uint8(136), 32)" if signed else ""
        scale_v = ("T.Shuffle([T.broadcast(SD[rr, p * 2], 4), T.broadcast(SD[rr, p * 2 + 1], 4)], "
                   "[0, 1, 2, 3, 4, 5, 6, 7])" if group == 32
                   else f"T.broadcast(SD[rr, p * 64 // {group}], 8)")
        if float_x:  # the high part's dot times 254 plus the low part's: |ib| <= 255 * 8 * 15 * 127, far from 2^31
            split_dot = f"""\
                ye: T.let = XL.vload([p * 64], "int8x32")
                yo: T.let = XL.vload([p * 64 + 32], "int8x32")
                ib: T.let = ({_dot2(isa, "lo", "xe", "hi", "xo")}) * T.broadcast(T.int32(254), 8) + (
                    {_dot2(isa, "lo", "ye", "hi", "yo")})
"""
        else:
            split_dot = f"""\
                ib: T.let = {_dot2(isa, "lo", "xe", "hi", "xo")}
"""
        steps = f"""\
        for p in range({K // 64}):
            for rr in T.unroll({rows}):
                n: T.let = T.min(t * {rows} + rr, {N - 1})
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                              T.address_of(W[T.min(n + {PREFETCH_ROWS}, {N - 1}), p * 32]),
                                              T.int32(0), T.int32(3), T.int32(1)))
                wb: T.let = W.vload([n, p * 32], "uint8x32"){flip32}
                lo: T.let = wb & T.broadcast(T.uint8(15), 32)
                hi: T.let = T.shift_right(wb, T.broadcast(T.uint8(4), 32))
                xe: T.let = XP.vload([p * 64], "int8x32")
                xo: T.let = XP.vload([p * 64 + 32], "int8x32")
{split_dot}                facc[rr, T.ramp(0, 1, 8)] = facc[rr, T.ramp(0, 1, 8)] + T.Cast("float32x8", ib) * {scale_v}
"""
        arrange = f"""\
    for c in range({K // 64}):
        for i in range(32):
            XP[c * 64 + i] = XQ[0, c * 64 + 2 * i]
            XP[c * 64 + 32 + i] = XQ[0, c * 64 + 2 * i + 1]"""
        if float_x:
            arrange = f"""\
    for j in range({K // 32}):
        m = T.alloc_buffer((1,), "float32")
        m[0] = T.float32(0)
        for i in range(32):
            m[0] = T.max(m[0], T.fabs(X[0, j * 32 + i]))
        A[j] = T.Select(m[0] > T.float32(0), m[0] / T.float32(127), T.float32(1))
    for c in range({K // 64}):
        for i in range(32):
            for odd in range(2):
                v: T.let = X[0, c * 64 + 2 * i + odd] / A[c * 2 + i // 16]
                hv: T.let = T.max(T.min(T.round(v), T.float32(127)), T.float32(-127))
                XP[c * 64 + odd * 32 + i] = T.Cast("int8", hv)
                XL[c * 64 + odd * 32 + i] = T.Cast("int8", T.round((v - hv) * T.float32(254)))"""
    else:
        for c in range(chunks):
            body.append(f"""\
            for rr in T.unroll({rows}):
                n: T.let = T.min(t * {rows} + rr, {N - 1})
                wb: T.let = W.vload([n, g * {group // 2} + {c * 16}], "uint8x16"){flip}
                lo: T.let = wb & T.broadcast(T.uint8(15), 16)
                hi: T.let = T.shift_right(wb, T.broadcast(T.uint8(4), 16))
                wv: T.let = T.Shuffle([lo, hi], {list(range(32))})
                xv: T.let = XP.vload([g * {group} + {c * 32}], "int8x32")
                iacc[rr, T.ramp(0, 1, {L})] = {dot}
""")
        steps = f"""\
        for g in range({G}):
            for rr in T.unroll({rows}):
                for c in T.vectorized({L}):
                    iacc[rr, c] = 0
{"".join(body)}            for rr in T.unroll({rows}):
                for c in T.vectorized({L}):
                    facc[rr, c] = facc[rr, c] + T.Cast("float32", iacc[rr, c]) * SD[rr, g]
"""
        arrange = f"""\
    for c in range({K // 32}):
        for i in range(16):
            XP[c * 32 + i] = XQ[0, c * 32 + 2 * i]
            XP[c * 32 + 16 + i] = XQ[0, c * 32 + 2 * i + 1]"""
    if float_x:  # in the accumulators' unit, 1/254
        group_sums = f"""\
    for g in range({G}):
        fs = T.alloc_buffer((1,), "float32")
        fs[0] = T.float32(0)
        for i in range({group}):
            fs[0] = fs[0] + X[0, g * {group} + i]
        XG[g] = fs[0] * T.float32(254)"""
        x_params = "x: T.handle, "
        x_bufs = (f'    X = T.match_buffer(x, (1, {K}), "float32")\n'
                  f'    A = T.alloc_buffer(({K // 32},), "float32")\n    XL = T.alloc_buffer(({K},), "int8")\n')
        fold_a = f"""\
            for g in T.vectorized({G}):
                SD[rr, g] = SD[rr, g] * A[g]
"""
        out_scale = f"T.float32({1 / 254!r})"
    else:
        group_sums = f"""\
    for g in range({G}):
        gs = T.alloc_buffer((1,), "int32")
        gs[0] = 0
        for i in range({group}):
            gs[0] = gs[0] + T.Cast("int32", XQ[0, g * {group} + i])
        XG[g] = T.Cast("float32", gs[0])"""
        x_params = "xq: T.handle, xs: T.handle, "
        x_bufs = f'    XQ = T.match_buffer(xq, (1, {K}), "int8")\n    XS = T.match_buffer(xs, (1,), "float32")\n'
        fold_a = ""
        out_scale = "XS[0]"
        if quantize_x is not None:
            x_params = "x: T.handle, "
            x_bufs = (f'    X = T.match_buffer(x, (1, {K}), "float32")\n'
                      f'    XQ = T.alloc_buffer((1, {K}), "int8")\n    XS = T.alloc_buffer((1,), "float32")\n')
            arrange = _quantize_token(K, *quantize_x) + "\n" + arrange
    src = f'''
@T.prim_func
def main({x_params}w: T.handle, {s_params}{z_param}{o_params}{b_param}y: T.handle):
    T.func_attr({{"global_symbol": "main", "tirx.noalias": True}})
{x_bufs}    W = T.match_buffer(w, ({N}, {K // 2}), "uint8")
{s_bufs}{z_buf}{o_bufs}{b_buf}    Y = T.match_buffer(y, (1, {N}), "float32")
    XP = T.alloc_buffer(({K},), "int8")
    XG = T.alloc_buffer(({G},), "float32")
    # The activation codes in the weights' nibble order (per 32 or 64: the even k, then the odd), and their
    # sums per group (the zero point's term).
{arrange}
{group_sums}
    for t in T.parallel({ntask}):
        facc = T.alloc_buffer(({rows}, {L}), "float32")
        zacc = T.alloc_buffer(({rows},), "float32")
        iacc = T.alloc_buffer(({rows}, {L}), "int32")
        # The rows' block parameters decoded once, vectorized over the groups (decoding a two-level scale and
        # offset per group inside the loop cost more scalar work than the dot products themselves).
        SD = T.alloc_buffer(({rows}, {G}), "float32")
        CD = T.alloc_buffer(({rows}, {G}), "float32")
        for rr in T.unroll({rows}):
            zacc[rr] = T.float32(0)
            for c in T.vectorized({L}):
                facc[rr, c] = T.float32(0)
            n: T.let = T.min(t * {rows} + rr, {N - 1})
            for g in T.vectorized({G}):
                SD[rr, g] = {s_at}
{const_dec}{fold_a}{steps}{zero_term}        for rr in range({rows}):
            n: T.let = t * {rows} + rr
            if n < {N}:
                tot = T.alloc_buffer((1,), "float32")
                tot[0] = T.float32(0)
                for c in range({L}):
                    tot[0] = tot[0] + facc[rr, c]
                Y[0, n] = {out_scale} * (tot[0] + zacc[rr]){b_add}
'''
    from qir.backends.tvm.kernels.quantize_rows import nan0, rint

    func = tvm.script.from_source(src, extra_vars={"T": T, "nan0": nan0, "rint": rint})
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func
