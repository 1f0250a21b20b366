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

import tvm
from tvm import s_tir, te, tirx

from qir.backends.tvm.kernels.common import Dim, check_dims, f32_tile, is_static_one, target_of
from qir.backends.tvm.kernels.cpu_features import features_of
from qir.backends.tvm.kernels.matmul_f32 import packed_gemm, schedule_gemm, schedule_gemv_rows


def wmatmul(M: Dim, N: int, K: int, bits: int, group: int | None, target: tvm.target.Target | str | dict, *,
            symmetric: bool = True, bias: bool = False) -> tirx.PrimFunc | None:
    """Scheduled weight-only ``qmatmul``; parameters and formula in :mod:`qir.backends.tvm.kernels`."""
    check_dims("wmatmul", M=M, N=N, K=K)
    if bits not in (4, 8):
        raise ValueError(f"wmatmul: bits must be 4 or 8, got {bits}")
    if bits == 4 and K % 2:
        raise ValueError(f"wmatmul: int4 weights need an even K (two per byte per row), got K={K}")
    if group is not None and group <= 0:
        group = None
    feat = features_of(target_of(target))
    if feat is None:
        return None

    X = te.placeholder((M, K), "float32", name="X")
    if bits == 8:
        Wq = te.placeholder((N, K), "int8" if symmetric else "uint8", name="Wq")
    else:
        Wq = te.placeholder((N, K // 2), "uint8", name="Wq")
    sshape = (N,) if group is None else (N, -(-K // group))
    scale = te.placeholder(sshape, "float32", name="scale")
    params = [X, Wq, scale]
    zp = None
    if not symmetric:
        zp = te.placeholder(sshape, "int32", name="zero_point")
        params.append(zp)
    bias_t = None
    if bias:
        bias_t = te.placeholder((N,), "float32", name="bias")
        params.append(bias_t)

    def code(n: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        if bits == 8:
            return Wq[n, k].astype("int32")
        byte = Wq[n, k // 2].astype("int32")
        nib = tirx.bitwise_and(tirx.shift_right(byte, (k % 2) * 4), 15)
        return (tirx.bitwise_xor(nib, 8) - 8) if symmetric else nib

    def deq(n: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        idx = (n,) if group is None else (n, k // group)
        q = code(n, k) - zp[idx] if zp is not None else code(n, k)
        return q.astype("float32") * scale[idx]

    if is_static_one(M):
        if bits == 4:
            # Reduce over (byte, nibble) so each vector lane owns one byte and the shifts are constants
            # (a lane-varying ``(k % 2) * 4`` shift does not vectorize well).
            kb = te.reduce_axis((0, K // 2), name="kb")
            j = te.reduce_axis((0, 2), name="j")
            C = te.compute((1, N), lambda m, n: te.sum(X[m, kb * 2 + j] * deq(n, kb * 2 + j), axis=[kb, j]),
                           name="C")
        else:
            kr = te.reduce_axis((0, K), name="k")
            C = te.compute((1, N), lambda m, n: te.sum(X[m, kr] * deq(n, kr), axis=kr), name="C")
        if bias_t is not None:
            Y = te.compute((1, N), lambda m, n: C[m, n] + bias_t[n], name="Y")
        else:
            Y = C
        sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
        schedule_gemv_rows(sch, "C", feat)
        if bias_t is not None:
            sch.reverse_compute_at(sch.get_sblock("Y"), sch.get_loops(sch.get_sblock("C"))[0])
        return sch.mod["main"].with_attr("global_symbol", "main")

    tile = f32_tile(feat)
    Y = packed_gemm(X, M, N, K, deq, bias_t, tile.nr, tile.mr)
    sch = s_tir.Schedule(te.create_prim_func([*params, Y]))
    schedule_gemm(sch, feat, "C", tile.mr, tile.nr, min(tile.kc, K), "Y", "B_pack")
    return sch.mod["main"].with_attr("global_symbol", "main")
