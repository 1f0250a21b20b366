"""Kernel-level benchmark of qir's scheduled TVM CPU kernels (qir.backends.tvm.kernels), one run, ratios.

* MiniLM prefill shapes (batch 8 x seq 128 = 1024 tokens): 1024x384x384, 1024x1536x384, 1024x384x1536 and
  the issue's 128x1536x384 (M x N x K): TVM f32 GEMM and w8a8 int8 GEMM (dynamic per-token activations)
  against PyTorch FP32 ``linear`` and ONNX Runtime's ``quantize_dynamic`` of the same single MatMul
  (DynamicQuantizeLinear + MatMulInteger, what the MiniLM ORT baseline runs).
* SmolLM2 decode shapes (M=1; K=576 -> N=576/1536/49152, K=1536 -> N=576): weight-only int8 (per row) and
  int4 (groups of 32) GEMV against PyTorch FP32 GEMV, with the weight bytes streamed per call in GB/s.

All with 2 threads (``--threads``; TVM_NUM_THREADS, torch.set_num_threads, ORT intra_op_num_threads); the best (or with
``--median`` the median) of ``--repeats`` calls after a warm-up; the TVM target is the host (``-mcpu`` detected).

    nice -n 10 python bench/tvm_kernels.py [--repeats 30] [--threads 2] [--median] [--json]

On a loaded shared machine, ``--threads 1`` gives the steadier ratios (a 2-thread call waits for its
slower thread, and a descheduled one costs a whole time slice).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _threads_from_argv() -> int:
    # TVM reads TVM_NUM_THREADS when its thread pool starts, so it is set before tvm is imported.
    import sys

    argv = sys.argv[1:]
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 2


THREADS = _threads_from_argv()
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from timing import kernel_ms  # noqa: E402  (bench/: this script's folder)

from qir.backends.tvm.kernels import matmul_f32, qmatmul_i8, wmatmul  # noqa: E402
from qir.safetensors_io import pack  # noqa: E402

USE_MEDIAN = False
PREFILL = [(1024, 384, 384), (1024, 1536, 384), (1024, 384, 1536), (128, 1536, 384)]
DECODE = [(1, 576, 576), (1, 1536, 576), (1, 49152, 576), (1, 576, 1536)]


def _median_ms(repeats: int, fn: Callable[..., Any], *args: Any) -> float:
    return kernel_ms(repeats, USE_MEDIAN, fn, *args)


def _build(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Callable[..., None]:
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def _ort_dynamic_matmul(w: np.ndarray, tmp: Path) -> Callable[[np.ndarray], Any]:
    """ORT session for ``x @ w.T`` quantized by ``quantize_dynamic`` (int8 weights, dynamic u8 activations)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    f32, q8 = tmp / f"mm_{n}_{k}.onnx", tmp / f"mm_{n}_{k}.q.onnx"
    onnx.save(model, f32)
    quantize_dynamic(str(f32), str(q8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(q8), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})


def bench_prefill(target: tvm.target.Target, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for m, n, k in PREFILL:
        flops = 2.0 * m * n * k
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        t_torch = _median_ms(repeats, torch.nn.functional.linear, xt, wt)
        f32 = _build(matmul_f32(m, n, k, target), target)
        ta, tb, ty = tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.empty((m, n), "float32")
        t_f32 = _median_ms(repeats, f32, ta, tb, ty)
        # int8 operands as qir's w8a8 (dynamic per-token) hands them to the kernel.
        xs = (np.abs(x).max(axis=1) / 127).astype(np.float32)
        xq = np.clip(np.rint(x / xs[:, None]), -127, 127).astype(np.int8)
        ws = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        wq = np.clip(np.rint(w / ws[:, None]), -127, 127).astype(np.int8)
        q8 = _build(qmatmul_i8(m, n, k, target), target)
        qa = [tvm.runtime.tensor(a) for a in (xq, wq, xs, ws)]
        t_i8 = _median_ms(repeats, q8, *qa, ty)
        ort_run = _ort_dynamic_matmul(w, tmp)
        t_ort = _median_ms(repeats, ort_run, x)
        rows.append({"shape": f"{m}x{n}x{k}", "torch_f32_ms": t_torch, "tvm_f32_ms": t_f32, "tvm_i8_ms": t_i8,
                     "ort_qdyn_ms": t_ort, "torch_gflops": flops / t_torch / 1e6, "tvm_f32_gflops": flops / t_f32 / 1e6,
                     "tvm_i8_gops": flops / t_i8 / 1e6})
    return rows


def bench_decode(target: tvm.target.Target, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for m, n, k in DECODE:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        t_torch = _median_ms(repeats, torch.nn.functional.linear, xt, wt)
        ty = tvm.runtime.empty((m, n), "float32")
        tx = tvm.runtime.tensor(x)
        w8 = rng.integers(-127, 128, (n, k)).astype(np.int8)
        s8 = rng.random(n).astype(np.float32)
        g8 = _build(wmatmul(m, n, k, 8, None, target), target)
        a8 = [tvm.runtime.tensor(a) for a in (w8, s8)]
        t_w8 = _median_ms(repeats, g8, tx, *a8, ty)
        w4 = pack(rng.integers(-8, 8, (n, k)), "i4").reshape(n, k // 2)
        s4 = rng.random((n, k // 32)).astype(np.float32)
        g4 = _build(wmatmul(m, n, k, 4, 32, target), target)
        a4 = [tvm.runtime.tensor(a) for a in (w4, s4)]
        t_w4 = _median_ms(repeats, g4, tx, *a4, ty)
        rows.append({"shape": f"{m}x{n}x{k}", "torch_f32_ms": t_torch, "tvm_w8_ms": t_w8, "tvm_w4_ms": t_w4,
                     "torch_gbs": n * k * 4 / t_torch / 1e6, "tvm_w8_gbs": (n * k + n * 4) / t_w8 / 1e6,
                     "tvm_w4_gbs": (n * k // 2 + s4.nbytes) / t_w4 / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    ap.add_argument("--median", action="store_true", help="report the median instead of the best call")
    args = ap.parse_args()
    global USE_MEDIAN
    USE_MEDIAN = args.median
    torch.set_num_threads(THREADS)
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    with tempfile.TemporaryDirectory() as tmp:
        pre = bench_prefill(target, args.repeats, Path(tmp))
    dec = bench_decode(target, args.repeats)
    if args.json:
        print(json.dumps({"cpu": cpu, "threads": THREADS, "prefill": pre, "decode": dec}, indent=1))
        return
    print(f"host cpu {cpu}, {THREADS} threads, {'median' if USE_MEDIAN else 'best'} of {args.repeats}")
    print("\nprefill (M x N x K)   torch f32    tvm f32     tvm i8   ORT qdyn | GFLOP/s torch / tvm f32 / tvm i8 "
          "| tvm-f32/torch  tvm-i8/torch  tvm-i8/ORT (time ratios, < 1 is faster)")
    for r in pre:
        print(f"{r['shape']:>18} {r['torch_f32_ms']:9.3f}ms {r['tvm_f32_ms']:9.3f}ms {r['tvm_i8_ms']:9.3f}ms "
              f"{r['ort_qdyn_ms']:9.3f}ms | {r['torch_gflops']:6.1f} / {r['tvm_f32_gflops']:6.1f} / "
              f"{r['tvm_i8_gops']:6.1f} | {r['tvm_f32_ms'] / r['torch_f32_ms']:12.2f} "
              f"{r['tvm_i8_ms'] / r['torch_f32_ms']:13.2f} {r['tvm_i8_ms'] / r['ort_qdyn_ms']:11.2f}")
    print("\ndecode GEMV (M x N x K)  torch f32   tvm w8   tvm w4(g32) | GB/s torch / w8 / w4 "
          "| w8/torch  w4/torch (time ratios)")
    for r in dec:
        print(f"{r['shape']:>18} {r['torch_f32_ms']:9.3f}ms {r['tvm_w8_ms']:8.3f}ms {r['tvm_w4_ms']:8.3f}ms | "
              f"{r['torch_gbs']:5.1f} / {r['tvm_w8_gbs']:5.1f} / {r['tvm_w4_gbs']:5.1f} | "
              f"{r['tvm_w8_ms'] / r['torch_f32_ms']:8.2f} {r['tvm_w4_ms'] / r['torch_f32_ms']:9.2f}")


if __name__ == "__main__":
    main()
