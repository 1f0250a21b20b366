"""qir's int8 GEMM kernel against ONNX Runtime's MLAS on MiniLM's w8a8 shapes, in GOP/s, one run.

For each MiniLM prefill shape (batch 8 x seq 128 = 1024 tokens; M x N x K with K, N in {384, 1152, 1536}):

* ``qir``: :func:`qir.backends.tvm.kernels.qmatmul_i8` exactly as the w8a8 MiniLM artifact calls it: int8
  per-token activations, int8 weights prepacked at compile time (``prepacked=True``), f32 scale epilogue.
* ``MLAS MatMulInteger``: ORT's ``MatMulInteger`` on pre-quantized uint8 activations and int8 weights (int32 out):
  the bare MLAS u8s8 GEMM, the fairest kernel-to-kernel figure (it has no epilogue, ours has one).
* ``MLAS DynQMatMul``: ``com.microsoft.DynamicQuantizeMatMul`` on f32 activations: what ``quantize_dynamic``'s
  model runs per MatMul (activation quantization + GEMM + scale), for reference.

Every system uses ``--threads`` threads (TVM_NUM_THREADS; ORT intra_op_num_threads); the best (``--median``: median)
of ``--repeats`` calls after two warm-up calls. Host target: ``-mcpu`` from LLVM, the int8 path it selects is printed.

    nice -n 10 python bench/tvm_gemm_mlas.py [--repeats 30] [--threads 2] [--median] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _threads_from_argv() -> int:
    # TVM reads TVM_NUM_THREADS when its thread pool starts, so it is set before tvm is imported.
    argv = sys.argv[1:]
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 2


THREADS = _threads_from_argv()
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from timing import kernel_ms  # noqa: E402  (bench/: this script's folder)

from qir.backends.tvm.kernels import qmatmul_i8  # noqa: E402
from qir.backends.tvm.kernels.cpu_features import features_of  # noqa: E402
from qir.backends.tvm.kernels.qmatmul_i8 import prepack_isa  # noqa: E402
from qir.backends.tvm.kernels.qmatmul_vnni import pack_weight  # noqa: E402

# MiniLM-L6 (hidden 384, 1536 MLP): Q/K/V fused (N=1152), output projection, MLP up, MLP down.
SHAPES = [(1024, 1152, 384), (1024, 384, 384), (1024, 1536, 384), (1024, 384, 1536)]


def _ort_session(node: Any, inputs: list[Any], inits: list[Any], out_type: int, n: int) -> Any:
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", out_type, ["m", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _mlas_matmulinteger(wq: np.ndarray) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    n, k = wq.shape
    node = helper.make_node("MatMulInteger", ["a", "wt", "za"], ["y"])
    inits = [numpy_helper.from_array(np.ascontiguousarray(wq.T), "wt"), numpy_helper.from_array(np.uint8(128), "za")]
    return _ort_session(node, [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])], inits,
                        TensorProto.INT32, n)


def _mlas_dynq(wq: np.ndarray, ws: np.ndarray) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    n, k = wq.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "wt", "ws"], ["y"], domain="com.microsoft")
    inits = [numpy_helper.from_array(np.ascontiguousarray(wq.T), "wt"), numpy_helper.from_array(ws, "ws")]
    return _ort_session(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])], inits,
                        TensorProto.FLOAT, n)


def bench(target: tvm.target.Target, repeats: int, median: bool) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for m, n, k in SHAPES:
        gop = 2.0 * m * n * k / 1e9
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        xs = (np.abs(x).max(axis=1) / 127).astype(np.float32)
        xq = np.clip(np.rint(x / xs[:, None]), -127, 127).astype(np.int8)
        ws = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        wq = np.clip(np.rint(w / ws[:, None]), -127, 127).astype(np.int8)
        isa = prepack_isa(k, target)
        y = tvm.runtime.empty((m, n), "float32")
        if isa is not None:
            wp, rs = pack_weight(wq, isa)
            fn = qmatmul_i8(m, n, k, target, prepacked=True)
            args = [tvm.runtime.tensor(a) for a in (xq, wp, rs, xs, ws)]
        else:
            fn = qmatmul_i8(m, n, k, target)
            args = [tvm.runtime.tensor(a) for a in (xq, wq, xs, ws)]
        lib = tvm.compile(tvm.IRModule({"main": fn}), target=target)["main"]
        t_qir = kernel_ms(repeats, median, lib, *args, y)
        # Exactness check of the two GEMMs against each other (int32 sums, then our f32 epilogue).
        mi = _mlas_matmulinteger(wq)
        au8 = (xq.astype(np.int16) + 128).astype(np.uint8)
        (acc,) = mi.run(None, {"a": au8})
        ref = acc.astype(np.float32) * (xs[:, None] * ws[None, :])
        err = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
        t_mi = kernel_ms(repeats, median, mi.run, None, {"a": au8})
        dq = _mlas_dynq(wq, ws)
        t_dq = kernel_ms(repeats, median, dq.run, None, {"x": x})
        rows.append({"shape": f"{m}x{n}x{k}", "qir_ms": t_qir, "mlas_matmulinteger_ms": t_mi, "mlas_dynq_ms": t_dq,
                     "qir_gops": gop / t_qir * 1e3, "mlas_matmulinteger_gops": gop / t_mi * 1e3,
                     "mlas_dynq_gops": gop / t_dq * 1e3, "qir_vs_mlas": t_qir / t_mi, "max_rel_err": err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    ap.add_argument("--median", action="store_true", help="report the median instead of the best call")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    feat = features_of(target)
    rows = bench(target, args.repeats, args.median)
    path = feat.int8_path if feat else "?"
    if args.json:
        print(json.dumps({"cpu": cpu, "int8_path": path, "threads": THREADS, "rows": rows}, indent=1))
        return
    print(f"host cpu {cpu} (int8 path {path}), {THREADS} threads, {'median' if args.median else 'best'} of "
          f"{args.repeats}")
    print("  M x N x K          qir     MLAS MMInt  MLAS DynQMM |  GOP/s qir / MMInt / DynQ | qir/MMInt (time)")
    for r in rows:
        print(f"{r['shape']:>15} {r['qir_ms']:8.3f}ms {r['mlas_matmulinteger_ms']:8.3f}ms "
              f"{r['mlas_dynq_ms']:8.3f}ms | {r['qir_gops']:6.1f} / {r['mlas_matmulinteger_gops']:6.1f} / "
              f"{r['mlas_dynq_gops']:6.1f} | {r['qir_vs_mlas']:6.2f}   (max rel err {r['max_rel_err']:.1e})")


if __name__ == "__main__":
    main()
