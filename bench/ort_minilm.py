"""MiniLM-L6 on ONNX Runtime CPU: PyTorch FP32 eager vs ORT ``quantize_dynamic`` (the peer) vs qir ``ort-cpu``.

Batch 8 x seq 128 (the 16 built-in sentences of :mod:`qir.evaluate`, padded to 128 tokens), 2 threads. For each
system: median latency of ``--repeats`` runs after a warm-up (the systems take turns, one run each per
round, so load on the machine falls on all of them alike), the model's size on disk, and the mean / min cosine of
its sentence embeddings against PyTorch FP32. The issue's goal: qir w8a8 mean cosine >= 0.995, <= 23 MB, and
latency <= 1.0x quantize_dynamic's.

    python bench/ort_minilm.py [--repeats 10] [--out DIR] [--json] [--tvm [--tvm-te]]

``--tvm`` adds qir's ``tvm-llvm`` artifacts (float and w8a8, as ``qir compile`` builds them: with the scheduled
kernels of ``qir.backends.tvm.kernels``) to the same run, with their compile time; ``--tvm-te`` adds the same
two built with the lowering's own TE computes under the generic CPU schedule (``-te`` rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

THREADS = 2
BATCH, SEQ = 8, 128


def _time_round_robin(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median ms of each ``fn`` over ``repeats`` rounds, one call of every fn per round (after one warm-up each):
    on a loaded machine every system sees the same load, so the ratios of one run are comparable."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def _cos(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(c.mean()), float(c.min())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="folder for the ONNX files (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tvm", action="store_true", help="add qir tvm-llvm float and w8a8 rows")
    ap.add_argument("--tvm-te", action="store_true", help="also tvm rows without the scheduled kernels")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qir.backends.compile import compile_module, load_artifact
    from qir.backends.onnx.runtime import make_session, optimized_op_counts
    from qir.evaluate import DEFAULT_SENTENCES
    from qir.frontend.encoder import SentenceEncoder
    from qir.frontend.importer import import_loaded
    from qir.models import load_model
    from qir.passes import PassManager, parse_pipeline

    loaded = load_model("minilm-l6")
    enc = loaded.tokenizer(list(DEFAULT_SENTENCES), padding="max_length", truncation=True, max_length=SEQ,
                           return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int64)
    mask = np.asarray(enc["attention_mask"], np.int64)
    batches = [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, len(ids), BATCH)]
    wrapper = SentenceEncoder(loaded.module, normalize=True).eval()

    def torch_run(i: np.ndarray, m: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(i), torch.from_numpy(m)).numpy()

    ref = np.concatenate([torch_run(i, m) for i, m in batches])
    rows: list[dict[str, Any]] = []
    timed: list[Callable[[], Any]] = []
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qir-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def add(name: str, run: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int, **extra: Any) -> None:
        emb = np.concatenate([run(i, m) for i, m in batches])
        mean, lo = _cos(emb, ref)
        timed.append(lambda: run(*batches[0]))
        rows.append({"system": name, "bytes": size, "cosine_mean": mean, "cosine_min": lo, **extra})

    fp32_bytes = sum(p.numel() * 4 for p in loaded.module.parameters())
    add("pytorch-fp32-eager", torch_run, fp32_bytes)

    # The peer: a torch.onnx export of the same wrapper, then ORT's dynamic per-channel int8 quantization.
    f32_onnx = work / "minilm-export.onnx"
    t_ids, t_mask = torch.from_numpy(ids[:2, :16]), torch.from_numpy(mask[:2, :16])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "emb": {0: "batch"}}
    torch.onnx.export(wrapper, (t_ids, t_mask), str(f32_onnx), input_names=["input_ids", "attention_mask"],
                      output_names=["emb"], dynamic_axes=axes, opset_version=17, dynamo=False)
    q_onnx = work / "minilm-quantize-dynamic.onnx"
    quantize_dynamic(str(f32_onnx), str(q_onnx), per_channel=True, weight_type=QuantType.QInt8)
    peer = make_session(q_onnx, threads=THREADS)
    add("ort-quantize_dynamic-int8", lambda i, m: peer.run(None, {"input_ids": i, "attention_mask": m})[0],
        q_onnx.stat().st_size, ort_ops=optimized_op_counts(q_onnx, threads=THREADS))
    f32_sess = make_session(f32_onnx, threads=THREADS)
    add("ort-export-fp32", lambda i, m: f32_sess.run(None, {"input_ids": i, "attention_mask": m})[0],
        f32_onnx.stat().st_size)

    module = import_loaded(loaded, source="minilm-l6").module
    for name, pipeline in (("qir-ort-cpu-float", ""), ("qir-ort-cpu-w8a8", "quantize{scheme=w8a8}")):
        mod = PassManager(parse_pipeline(pipeline)).run(module.clone()) if pipeline else module
        res = compile_module(mod, "ort-cpu", work / name, meta={"source": "minilm-l6", "kind": "encoder"})
        art = load_artifact(work / name, threads=THREADS)
        art.run(list(batches[0]))
        add(name, lambda i, m, a=art: a.run([i, m])[0], res.report["bytes"],
            ort_ops=optimized_op_counts(work / name / "model.onnx", threads=THREADS,
                                        session_config=dict(art.target.session_config)))

    if args.tvm:
        from qir.backends.target import load_target
        from qir.backends.tvm.compile import compile_tvm

        variants = [(f"qir-tvm-llvm-{p}{suffix}", pipe, kern) for suffix, kern in
                    ([("", True)] + ([("-te", False)] if args.tvm_te else []))
                    for p, pipe in (("float", ""), ("w8a8", "quantize{scheme=w8a8}"))]
        for name, pipeline, kern in variants:
            mod = PassManager(parse_pipeline(pipeline)).run(module.clone()) if pipeline else module
            t0 = time.perf_counter()
            res = compile_tvm(mod, load_target("tvm-llvm"), work / name, use_kernels=kern,
                              meta={"source": "minilm-l6", "kind": "encoder"})
            compile_s = time.perf_counter() - t0
            art = load_artifact(work / name, threads=THREADS)
            art.run(list(batches[0]))
            add(name, lambda i, m, a=art: a.run([i, m])[0], res.report["bytes"], compile_s=round(compile_s, 1),
                kernels=res.report["kernels"])

    for r, lat in zip(rows, _time_round_robin(timed, args.repeats)):
        r["latency_ms"] = round(lat, 2)
    peer_lat = next(r["latency_ms"] for r in rows if r["system"] == "ort-quantize_dynamic-int8")
    for r in rows:
        r["latency_vs_quantize_dynamic"] = round(r["latency_ms"] / peer_lat, 3)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"MiniLM-L6, batch {BATCH} x seq {SEQ}, {THREADS} threads, median of {args.repeats} runs "
              f"(files in {work})")
        print(f"{'system':28s} {'latency ms':>10s} {'x peer':>7s} {'MB':>7s} {'cos mean':>9s} {'cos min':>9s}")
        for r in rows:
            print(f"{r['system']:28s} {r['latency_ms']:10.1f} {r['latency_vs_quantize_dynamic']:7.2f} "
                  f"{r['bytes'] / 1e6:7.2f} {r['cosine_mean']:9.5f} {r['cosine_min']:9.5f}")
        for r in rows:
            if "compile_s" in r:
                print(f"  {r['system']} compile {r['compile_s']} s, matmuls: {r['kernels']}")
            if "ort_ops" in r:
                top = ", ".join(f"{k} {v}" for k, v in list(r["ort_ops"].items())[:10])
                print(f"  {r['system']} optimized graph: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
