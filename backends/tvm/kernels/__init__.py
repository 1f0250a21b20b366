"""Hand-scheduled TensorIR kernels for qir's matmuls on CPU (x86 AVX-512/VNNI or AVX2, AArch64 NEON/dotprod).

The default CPU pipeline of apache-tvm schedules nothing, so a plain TE matmul runs ~100x slower than
PyTorch. These builders return a TensorIR ``PrimFunc`` that is ALREADY scheduled for the given
``tvm.target.Target`` (tiling, vectorization, parallel loops, int8 dot-product instructions), or ``None``
when there is no schedule for that target (a non-``llvm`` target such as CUDA: use DLight there); the
lowering then falls back to its own compute.

Interface (stable; the Relax lowering calls it through ``bb.add_func`` + ``call_tir``)
---------------------------------------------------------------------------------------
All buffers are row-major and compact. ``M`` (rows of the activation = tokens) may be an ``int`` or an
``int64`` ``tvm.tirx.Var`` (dynamic tokens; Relax's shape dtype -- an ``int32`` Var trips a TVM
codegen check); ``N`` (output features) and ``K`` (input features) are ``int``.
The PrimFunc's parameters are listed in call order; the LAST one is the output (destination-passing
style, as ``relax.call_tir`` expects).

``qmatmul_i8(M, N, K, target, *, a_dtype="int8", a_scale="token", a_zero_point=0, bias=False)``
    qir ``qmatmul`` on the integer path (w8a8): int8 weight quantized per output row, symmetric.
    Parameters: ``A[M, K] a_dtype``, ``W[N, K] int8``, ``a_scale[M] f32`` (``a_scale="token"``: one scale
    per row, qir's dynamic per-token quantize) or ``a_scale[1] f32`` (``"tensor"``: static per tensor),
    ``w_scale[N] f32``, ``bias[N] f32`` (only with ``bias=True``), and the output ``Y[M, N] f32``::

        acc[m, n] = sum_k (int32(A[m, k]) - a_zero_point) * int32(W[n, k])     exact, int32
        Y[m, n]   = f32(acc[m, n]) * (a_scale[m or 0] * w_scale[n])  (+ bias[n])

    exactly as ``qir/ops/quantized.py`` orders it (``sx * sw`` first, then the product). ``a_zero_point``
    is a compile-time integer: qir's static ``u8`` activation specs carry it as a literal; dynamic
    per-token int8 activations are symmetric (0). A per-tensor weight scale is passed broadcast to
    ``[N]``. The kernel re-lays the weight into dot-product tiles and adds the zero-point/sign
    compensation (``c * rowsum(W)``) itself, so callers pass qir's tensors unchanged.

``wmatmul(M, N, K, bits, group, target, *, symmetric=True, bias=False, signed=None, offset=False,
scale_dtype="float32", offset_dtype="float32")``
    qir ``qmatmul`` with float activations (weight-only, w8a16 / w4a16), dequantized inside the kernel.
    Parameters: ``X[M, K] f32``; the packed weight ``Wq``: ``bits=8``: ``[N, K]`` ``int8`` (symmetric) or
    ``uint8`` (asymmetric); ``bits=4``: ``[N, K // 2]`` ``uint8``, qir's packing
    (``qir.safetensors_io.pack``: element ``2k`` of a row in the low nibble of byte ``k``, ``2k+1`` in
    the high nibble; two's-complement ``i4`` when symmetric, ``u4`` otherwise; ``K`` must be even);
    ``scale`` f32 ``[N]`` (``group`` 0/None: one per output row) or ``[N, ceil(K / group)]``;
    ``zero_point`` int32 of the same shape as ``scale`` (only when ``symmetric=False``); ``offset`` of the
    same shape (only with ``offset=True``: GGUF's block minimum); ``bias[N] f32`` (only with ``bias=True``);
    output ``Y[M, N] f32``::

        Y[m, n] = sum_k X[m, k] * (f32(q[n, k] - zp[n, g(k)]) * scale[n, g(k)] + offset[n, g(k)])  (+ bias[n])

    ``signed`` (default ``symmetric``) reads the codes as two's complement or unsigned whatever the zero
    point (GGUF Q4_1/Q5_1: unsigned codes, no zero point, an offset); ``scale_dtype``/``offset_dtype``
    ``"float16"`` keeps GGUF's fp16 block parameters fp16 in memory (widened to f32 in registers, exact).

    A static ``M == 1`` gets the GEMV schedule (decode: parallel over N, vectorized over K);
    anything else (including a dynamic ``M``) the tiled GEMM schedule.

``matmul_f32(M, N, K, target, *, b_layout="NK", bias=False)``
    Dense float: ``A[M, K] f32``, ``B[N, K] f32`` (``b_layout="NK"``, qir ``linear``: ``A @ B.T``) or
    ``B[K, N]`` (``"KN"``, plain ``matmul``), ``bias[N] f32`` (with ``bias=True``), output ``Y[M, N] f32``.

``attention(b, hq, hkv, sq, sk, d, dv, target, *, scale, causal=False, mask=None)``
    qir ``attention`` fused (scores, mask, softmax, ``p @ v``) into one kernel:
    :mod:`qir.backends.tvm.kernels.attention`.

``quantize_rows(M, K, target, *, out_dtype, qmin, qmax, symmetric)``
    qir's dynamic per-token ``quantize`` (range, scale, zero point and codes, bit-exact) in one kernel:
    :mod:`qir.backends.tvm.kernels.quantize_rows`.

``w4a8_gemv(N, K, group, target, *, signed, zp_dtype, scale, offset=None, bias=False)``
    The w4a8 decode GEMV: 4-bit grouped weights times int8 per-token codes, one dot-product instruction per
    group of 32 (``vpdpbusd``, AVX2 ``vpmaddubsw``, ``sdot``): :mod:`qir.backends.tvm.kernels.w4a8_gemv`.

``norm_rows(M, K, target, *, kind, eps)``
    ``layer_norm`` / ``rms_norm`` over the last axis, one row per task: :mod:`qir.backends.tvm.kernels.norm_rows`.
    ``mathfn`` holds the vectorizable ``exp``/``erf``/``gelu``.

Instruction selection follows the target's ``mcpu``/``mattr`` (never the build machine's; see
:mod:`qir.backends.tvm.kernels.cpu_features`): the int8 kernel uses AVX512-VNNI ``vpdpbusd`` or AArch64
``sdot`` where the target has them, and an exact int32 vector path elsewhere (AVX2, SSE); the float
kernels use the target's vector width (AVX-512, AVX2, NEON, SSE).
"""

from __future__ import annotations

from qir.backends.tvm.kernels import mathfn, qmatmul_vnni
from qir.backends.tvm.kernels.attention import attention
from qir.backends.tvm.kernels.cpu_features import CpuFeatures, features_of
from qir.backends.tvm.kernels.matmul_f32 import matmul_f32
from qir.backends.tvm.kernels.norm_rows import norm_rows
from qir.backends.tvm.kernels.qmatmul_i8 import prepack_isa, qmatmul_i8
from qir.backends.tvm.kernels.quantize_rows import quantize_rows
from qir.backends.tvm.kernels.w4a8_gemv import w4a8_gemv
from qir.backends.tvm.kernels.wmatmul import Nested, wmatmul

__all__ = ["CpuFeatures", "Nested", "attention", "features_of", "mathfn", "matmul_f32", "norm_rows", "prepack_isa",
           "qmatmul_i8", "qmatmul_vnni", "quantize_rows", "w4a8_gemv", "wmatmul"]
