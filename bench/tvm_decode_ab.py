"""A/B decode speed of ``tvm-llvm`` causal-LM artifacts: all loaded in ONE process, their decode steps alternated.

Why: this machine's speed drifts ±20% between runs (and between the minutes of one run), so two builds measured one
after the other can differ by more than the change under test. Here every artifact runs ``--steps`` decode steps
(positions 512..), then the next one, for ``--blocks`` rounds; the median and best tokens/s per artifact are printed.
The caches are zero-filled TVM tensors updated in place (the work of a step does not depend on their values), as
``bench/decode_vs_llamacpp.py`` and ``qir generate`` run them.

    python bench/tvm_decode_ab.py OUTDIR_A OUTDIR_B [...] [--blocks 8] [--steps 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm is imported
    import numpy as np
    import tvm

    from qir.backends.compile import load_artifact

    runs = []
    for folder in args.artifacts:
        art = load_artifact(folder, threads=args.threads)
        info = json.loads((folder / "report.json").read_text())["functions"]["decode"]
        caches = [tvm.runtime.tensor(np.zeros(info["input_types"][n]["shape"], np.float32))
                  for n in info["inputs"][2:]]
        runs.append((str(folder), art, caches))
    token = np.asarray([[42]], np.int64)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.blocks):
        for name, art, caches in runs:
            t0 = time.perf_counter()
            for i in range(args.steps):
                art.run_device([token, np.asarray([512 + i], np.int64), *caches], function="decode")
            rates[name].append(args.steps / (time.perf_counter() - t0))
    for name, r in rates.items():
        print(f"{name:40s} median {statistics.median(r):7.1f}  best {max(r):7.1f} tok/s")


if __name__ == "__main__":
    main()
