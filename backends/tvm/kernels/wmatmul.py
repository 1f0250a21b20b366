"""Weight-only quantized matmul (qir ``qmatmul`` with float activations: w8a16, w4a16), for CPU.

The weight stays packed in memory (int8, or two int4 per byte in qir's layout) and is dequantized
inside the kernel, ``f32(q - zp) * scale[n, k // group]``:

* GEMV (static ``M == 1``, decode): memory bound, so the packed bytes are read exactly once,
  straight from their row-major rows and dequantized in registers; parallel over output columns,
  each dot product ``lanes``-wide over K (see :func:`~qir.backends.tvm.kernels.matmul_f32.schedule_gemv_rows`).
* GEMM (prefill, or dynamic ``M``): compute bound, so the weight is dequantized ONCE per call into
  f32 panels and the f32 register-tiled GEMM runs on them (``N*K`` dequantizations against
  ``M*N*K`` FMAs).

int4 nibbles: element ``2j`` of a row in the low nibble of byte ``j``, ``2j+1`` in the high nibble
(``qir.safetensors_io.pack``); signed (symmetric ``i4``) values are two's complement in the nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from qir.backends.tvm.kernels.common import Dim, check_dims, f32_tile, is_static_one, target_of
from qir.backends.tvm.kernels.cpu_features import features_of
from qir.backends.tvm.kernels.matmul_f32 import packed_gemm, schedule_gemm, schedule_gemv_rows, streaming_gemv


@dataclass(frozen=True)
class Nested:
    """A two-level block parameter: its ``[N, G]`` codes laid out as ``lay`` (``qops.QLayout``: axis, group, bits,
    signedness, zero point), with a ``scale_dtype`` scale, an optional zero point and an optional ``offset_dtype``
    offset in that layout (``compress-scales``: per row, axis 0; K-quants: per super-block, axis 1)."""

    lay: object
    scale_dtype: str = "float16"
    offset_dtype: str | None = None


def _param_placeholders(name: str, dt: str | Nested, N: int, G: int | None) -> tuple[list[te.Tensor], object]:
    """Placeholders of one block parameter (plain or :class:`Nested`) and what indexing it with ``(n[, g])`` reads."""
    from qir.backends.tvm.qops import NestedParam

    sshape = (N,) if G is None else (N, G)
    if not isinstance(dt, Nested):
        t = te.placeholder(sshape, dt, name=name)
        return [t], t
    lay = dt.lay
    per = 8 // lay.bits  # type: ignore[attr-defined]
    cshape = sshape[:-1] + (-(-sshape[-1] // per),)
    cdt = "uint8" if per > 1 or not lay.signed else "int8"  # type: ignore[attr-defined]
    codes = te.placeholder(cshape, cdt, name=f"{name}_codes")
    ax, g2 = lay.axis, lay.group  # type: ignore[attr-defined]
    pshape = (1,) if ax is None else (sshape[ax],) if g2 is None else tuple(
        -(-d // g2) if i == ax else d for i, d in enumerate(sshape))
    s2 = te.placeholder(pshape, dt.scale_dtype, name=f"{name}_scale")
    ts = [codes, s2]
    zp2 = off2 = None
    if lay.has_zp:  # type: ignore[attr-defined]
        zp2 = te.placeholder(pshape, "int32", name=f"{name}_zp")
        ts.append(zp2)
    if dt.offset_dtype is not None:
        off2 = te.placeholder(pshape, dt.offset_dtype, name=f"{name}_offset")
        ts.append(off2)
    return ts, NestedParam(codes, s2, zp2, off2, lay)  # type: ignore[arg-type]


def wmatmul(M: Dim, N: int, K: int, bits: int, group: int | None, target: tvm.target.Target | str | dict, *,
            symmetric: bool = True, bias: bool = False, signed: bool | None = None, offset: bool = False,
            scale_dtype: str | Nested = "float32", offset_dtype: str | Nested = "float32") -> tirx.PrimFunc | None:
    """Scheduled weight-only ``qmatmul``; parameters and formula in :mod:`qir.backends.tvm.kernels`.

    ``signed`` (default: ``symmetric``) says how the codes read (two's complement or unsigned) independently of
    the zero point, so unsigned codes without a zero point (GGUF Q4_1/Q5_1: ``x = d*q + m``) fit too.
    ``offset``: an ``offset`` tensor in the scale's layout is added after scaling (``f32(q - zp)*scale + offset``,
    the GGUF minimum), inside the dequantization, so GEMV and GEMM pay one add per weight element (GEMM only
    once per call, when it dequantizes into its panels). ``scale_dtype``/``offset_dtype``: ``"float32"`` or
    ``"float16"`` (GGUF's own fp16 block parameters, kept fp16 in memory and widened in registers: exact), or a
    :class:`Nested` two-level parameter (its codes and their own parameters are passed instead of the parameter,
    in that order, and dequantized in registers: ``compress-scales`` keeps its 8 bits per block at run time).
    """
    check_dims("wmatmul", M=M, N=N, K=K)
    if bits not in (4, 8):
        raise ValueError(f"wmatmul: bits must be 4 or 8, got {bits}")
    if bits == 4 and K % 2:
        raise ValueError(f"wmatmul: int4 weights need an even K (two per byte per row), got K={K}")
    if group is not None and group <= 0:
        group = None
    if signed is None:
        signed = symmetric
    for what, dt in (("scale_dtype", scale_dtype), ("offset_dtype", offset_dtype)):
        if not isinstance(dt, Nested) and dt not in ("float32", "float16"):
            raise ValueError(f"wmatmul: {what} must be 'float32' or 'float16', got {dt!r}")
    feat = features_of(target_of(target))
    if feat is None:
        return None

    X = te.placeholder((M, K), "float32", name="X")
    if bits == 8:
        Wq = te.placeholder((N, K), "int8" if signed else "uint8", name="Wq")
    else:
        Wq = te.placeholder((N, K // 2), "uint8", name="Wq")
    G = None if group is None else -(-K // group)
    sshape = (N,) if G is None else (N, G)
    scale_ts, scale = _param_placeholders("scale", scale_dtype, N, G)
    params = [X, Wq, *scale_ts]
    zp = None
    if not symmetric:
        zp = te.placeholder(sshape, "int32", name="zero_point")
        params.append(zp)
    off = None
    if offset:
        off_ts, off = _param_placeholders("offset", offset_dtype, N, G)
        params += off_ts
    bias_t = None
    if bias:
        bias_t = te.placeholder((N,), "float32", name="bias")
        params.append(bias_t)

    def code(n: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        if bits == 8:
            return Wq[n, k].astype("int32")
        byte = Wq[n, k // 2].astype("int32")
        nib = tirx.bitwise_and(tirx.shift_right(byte, (k % 2) * 4), 15)
        return (tirx.bitwise_xor(nib, 8) - 8) if signed else nib

    from qir.backends.tvm.qops import _f32 as f32

    def deq(n: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        idx = (n,) if group is None else (n, k // group)
        q = code(n, k) - zp[idx] if zp is not None else code(n, k)
        v = q.astype("float32") * f32(scale[idx])  # type: ignore[index]
        return v + f32(off[idx]) if off is not None else v  # type: ignore[index]

    if is_static_one(M):
        lanes = feat.f32_lanes
        if bits == 4 and group is not None and K % group == 0 and (group // 2) % lanes == 0:
            return _grouped_gemv4(params, X, Wq, scale, zp, off, bias_t, N, K, group, signed, lanes)
        if bits == 4:
            # Each vector lane owns one byte, so the nibble shifts are constants (a lane-varying ``(k % 2) * 4``
            # shift does not vectorize well). X is de-interleaved first (even and odd elements as two rows, K
            # floats: nothing next to the weight) so a vector of lanes reads consecutive floats, not every other.
            Xd = te.compute((2, K // 2), lambda j, kb: X[0, kb * 2 + j], name="X_deint")
            j = te.reduce_axis((0, 2), name="j")
            kb = te.reduce_axis((0, K // 2), name="kb")
            C = te.compute((1, N), lambda m, n: te.sum(Xd[j, kb] * deq(n, kb * 2 + j), axis=[kb, j]), name="C")
        else:
            kr = te.reduce_axis((0, K), name="k")
            C = te.compute((1, N), lambda m, n: te.sum(X[m, kr] * deq(n, kr), axis=kr), name="C")
        Y = C if bias_t is None else te.compute((1, N), lambda m, n: C[m, n] + bias_t[n], name="Y")
        sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
        schedule_gemv_rows(sch, "C", feat, **(streaming_gemv(K, feat) if bits == 8 else {}))
        if bias_t is not None:
            sch.reverse_compute_at(sch.get_sblock("Y"), sch.get_loops(sch.get_sblock("C"))[0])
        return sch.mod["main"].with_attr("global_symbol", "main")

    tile = f32_tile(feat)
    Y = packed_gemm(X, M, N, K, deq, bias_t, tile.nr, tile.mr)
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    schedule_gemm(sch, feat, "C", tile.mr, tile.nr, "Y", "B_pack")
    return sch.mod["main"].with_attr("global_symbol", "main")


def _grouped_gemv4(params: list[te.Tensor], X: te.Tensor, Wq: te.Tensor, scale: object, zp: te.Tensor | None,
                   off: object | None, bias_t: te.Tensor | None, N: int, K: int, group: int, signed: bool,
                   lanes: int, rows: int = 4) -> tirx.PrimFunc:
    """The grouped 4-bit GEMV (decode), with the block parameters factored out of the per-weight work.

    Every weight of group ``g`` is ``s_g * (u - c_g) + o_g``: ``u`` the unsigned nibble (a signed code's nibble
    with its sign bit flipped, so ``c_g = 8``), ``c_g`` the zero point, ``o_g`` the offset (GGUF minimum). So

        ``y = sum_g s_g * P_g + sum_g (o_g - s_g * c_g) * sum_{k in g} x_k``,  ``P_g = sum_{k in g} x_k * u_k``

    and the inner loop per weight is unpack, convert, FMA: the scale is one FMA per group and row on a vector of
    partial sums (``P``, ``lanes`` wide, in registers), the offset and zero point a dot product of length ``G``
    per row against the group sums of ``x`` (computed once per call). Dequantizing each weight first
    (``f32(q) * s + o``, then the FMA with ``x``) spent three vector ops more per weight vector and a scalar
    decode of each block parameter per group and row: 23 Gweights/s against 32 now (SmolLM2 1536 x 576, w4a16
    preset, 2 threads, rotating copies of the weight). ``rows`` outputs per task share each activation load.
    """
    from qir.backends.tvm.qops import _f32 as f32

    bg, G = group // 2, K // group  # bytes per group, groups per row
    # Even and odd elements as two rows, so a vector of lanes (one byte each) reads consecutive floats.
    Xd = te.compute((2, K // 2), lambda j, kb: X[0, kb * 2 + j], name="X_deint")
    gx = te.reduce_axis((0, group), name="gx")
    XS = te.compute((G,), lambda g: te.sum(X[0, g * group + gx], axis=gx), name="X_gsum")
    t = te.reduce_axis((0, bg // lanes), name="t")
    j = te.reduce_axis((0, 2), name="j")

    def unsigned_nibble(n: tirx.Var, kb: tirx.PrimExpr, jj: tirx.Var) -> tirx.PrimExpr:
        nib = tirx.bitwise_and(tirx.shift_right(Wq[n, kb].astype("int32"), jj * 4), 15)
        return tirx.bitwise_xor(nib, 8) if signed else nib

    def partial(n: tirx.Var, g: tirx.Var, lane: tirx.Var) -> tirx.PrimExpr:
        kb = g * bg + t * lanes + lane
        return te.sum(Xd[j, kb] * unsigned_nibble(n, kb, j).astype("float32"), axis=[t, j])

    P = te.compute((N, G, lanes), partial, name="P")
    g = te.reduce_axis((0, G), name="g")
    # The group scales of a chunk of rows, decoded once into a small buffer (vectorized over the groups).
    S = te.compute((N, G), lambda n, gg: f32(scale[n, gg]), name="S_dec")  # type: ignore[index]
    Cv = te.compute((N, lanes), lambda n, lane: te.sum(S[n, g] * P[n, g, lane], axis=g), name="Cv")

    def const_term(n: tirx.Var, gg: tirx.Var) -> tirx.PrimExpr | None:
        c = None
        if zp is not None:
            c = -(f32(scale[n, gg]) * zp[n, gg].astype("float32"))  # type: ignore[index]
        elif signed:
            c = -(f32(scale[n, gg]) * 8.0)  # type: ignore[index]
        if off is not None:
            c = f32(off[n, gg]) if c is None else c + f32(off[n, gg])  # type: ignore[index]
        return c

    g2 = te.reduce_axis((0, G), name="g2")
    Off = None
    if const_term(tirx.Var("n", "int32"), tirx.Var("g", "int32")) is not None:
        Od = te.compute((N, G), const_term, name="O_dec")
        Off = te.compute((N,), lambda n: te.sum(Od[n, g2] * XS[g2], axis=g2), name="Off")
    lr = te.reduce_axis((0, lanes), name="lr")

    def horizontal(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        # ``Off`` joins the horizontal sum (on lane 0); read first, so ``X_gsum`` comes before the parallel loop.
        if Off is None:
            return te.sum(Cv[n, lr], axis=lr)
        return te.sum(tirx.Select(lr == 0, Off[n], tirx.const(0.0, "float32")) + Cv[n, lr], axis=lr)

    C = te.compute((1, N), horizontal, name="C")
    Y = C if bias_t is None else te.compute((1, N), lambda m, n: C[m, n] + bias_t[n], name="Y")
    # Scheduled from the output inwards (``compute_at`` needs a block's consumers under the loop; the other way
    # round, ``Off`` and ``C`` would each need the other placed first): parallel over chunks of ``rows`` outputs.
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    out_loops = sch.get_loops(sch.get_sblock(Y.op.name))
    no, _ = sch.split(out_loops[1], [None, rows])
    sch.parallel(no)
    if Y is not C:
        sch.compute_at(sch.get_sblock("C"), no)
    if Off is not None:
        sch.compute_at(sch.get_sblock("Off"), no)
        od = sch.get_sblock("O_dec")
        if G % lanes == 0:  # a whole number of vectors; otherwise the odd tail costs more than it saves
            sch.compute_at(od, no)
            sch.vectorize(sch.get_loops(od)[-1])
        else:
            sch.compute_inline(od)
    cv = sch.get_sblock("Cv")
    sch.compute_at(cv, no)
    sd = sch.get_sblock("S_dec")
    sch.compute_at(sd, no)
    sch.vectorize(sch.get_loops(sd)[-1])
    ni, lane, gl = sch.get_loops(cv)[-3:]
    sch.reorder(gl, ni, lane)
    sch.unroll(ni)
    sch.vectorize(lane)
    p = sch.get_sblock("P")
    sch.compute_at(p, ni)
    # Below ``ni``: the lane loop, then the reduction loops (``t`` vanishes when a group is one vector of bytes).
    pl, *red = sch.get_loops(p)[4:]  # (m, no, g, ni) come first
    sch.reorder(*red, pl)
    for r in red:
        sch.unroll(r)
    sch.vectorize(pl)
    sch.decompose_reduction(p, red[0])
    sch.decompose_reduction(cv, gl)
    return sch.mod["main"].with_attr("global_symbol", "main")
