"""Where MiniLM's time goes on ONNX Runtime CPU: kernel time per op type of several ONNX files, side by side.

Each file runs on the bench's MiniLM batch (8 x 128, 2 threads by default) with ORT's profiler on; the files take
turns, one run each per round. A node's time is its *minimum* over the rounds (after two warm-ups), which keeps the
table readable on a loaded machine where the wall time of a whole run is not; the table sums those minima per op
type (the fused ops ORT actually ran, e.g. ``MatMulIntegerToFloat``, ``SkipLayerNormalization``).

    python bench/ort_minilm_profile.py A.onnx [B.onnx ...] [--runs 20] [--threads 2] [--top 30] [--no-spin]
        [--no-profile]

Each file's line also gives the process CPU time per run (all threads; median): the work a run does, which load
on the machine barely changes. ``--no-spin`` turns ORT's spin-waiting of idle pool threads off (for every file
alike), so the CPU time counts work, not spinning, and on a loaded machine the wall time is not dominated by
threads spinning against each other. ``--no-profile`` times without ORT's profiler (no table).

The files are what ``bench/ort_minilm.py --out DIR`` leaves: ``DIR/minilm-quantize-dynamic.onnx`` (the peer) and
``DIR/qir-ort-cpu-w8a8/model.onnx``; any model with inputs ``input_ids`` and ``attention_mask`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning=0 for every file")
    ap.add_argument("--no-profile", action="store_true", help="wall and CPU time only, without ORT's profiler")
    args = ap.parse_args()

    import onnxruntime as ort

    from qir.evaluate import DEFAULT_SENTENCES
    from qir.models import load_model

    enc = load_model("minilm-l6").tokenizer(list(DEFAULT_SENTENCES), padding="max_length", truncation=True,
                                             max_length=128, return_tensors="np")
    feeds = {"input_ids": np.asarray(enc["input_ids"], np.int64)[:8],
             "attention_mask": np.asarray(enc["attention_mask"], np.int64)[:8]}
    tmp = Path(tempfile.mkdtemp(prefix="qir-ortprof-"))
    sessions: list[Any] = []
    for i, path in enumerate(args.models):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling = not args.no_profile
        so.profile_file_prefix = str(tmp / f"m{i}")
        if args.no_spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
    walls: list[list[float]] = [[] for _ in sessions]
    cpus: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.runs + 2):
        for i, s in enumerate(sessions):
            c, t = time.process_time(), time.perf_counter()
            s.run(None, feeds)
            walls[i].append(time.perf_counter() - t)
            cpus[i].append(time.process_time() - c)
    if args.no_profile:
        for i, path in enumerate(args.models):
            w, c = sorted(walls[i][2:]), sorted(cpus[i][2:])
            print(f"[{i}] {path}: wall min {w[0] * 1e3:.1f} ms, median {w[len(w) // 2] * 1e3:.1f} ms; "
                  f"CPU time median {c[len(c) // 2] * 1e3:.1f} ms")
        return 0
    tables: list[tuple[Counter[str], Counter[str]]] = []
    for i, s in enumerate(sessions):
        prof = s.end_profiling()
        with open(prof) as fh:
            events = json.load(fh)
        os.remove(prof)
        node: dict[str, list[int]] = defaultdict(list)
        kind: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                node[e["name"]].append(int(e["dur"]))
                kind[e["name"]] = e["args"]["op_name"]
        per: Counter[str] = Counter()
        count: Counter[str] = Counter()
        for name, durs in node.items():
            per[kind[name]] += min(durs[2:] or durs)
            count[kind[name]] += 1
        tables.append((per, count))
        w, c = sorted(walls[i][2:]), sorted(cpus[i][2:])
        print(f"[{i}] {args.models[i]}: {sum(count.values())} nodes, sum of per-node minima "
              f"{sum(per.values()) / 1e3:.2f} ms; wall min {w[0] * 1e3:.1f} ms, median {w[len(w) // 2] * 1e3:.1f} ms; "
              f"CPU time median {c[len(c) // 2] * 1e3:.1f} ms")
    total: Counter[str] = Counter()
    for per, _ in tables:
        total.update(per)
    print(f"{'op type':30s}" + "".join(f"{f'[{i}] ms':>10s}{'n':>4s}" for i in range(len(tables))))
    for op, _ in total.most_common(args.top):
        print(f"{op:30s}" + "".join(f"{per[op] / 1e3:10.2f}{count[op]:4d}" for per, count in tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
