"""The numerics debugger on SmolLM2-135M: one MLP down-projection at 2 bits per tensor, the rest w8a16.

Checks the issue's scenario end to end with the library calls behind ``qir debug``:

1. ``compare`` (float vs broken, 1 window of 256 tokens of Apache-2.0) must rank that layer's output ``worst``;
2. ``bisect`` (metric: perplexity on 1 x 256 tokens of GPL-3, bound: 1.01 x plain w8a16's) must keep exactly that
   layer at w8a16;
3. the repaired pipeline's perplexity (same sample) is compared with plain w8a16's.

Run: ``nice -n 10 python bench/debug_smollm2.py [--layer 12] [--qir smol.qir]`` (about 5 minutes on 2 idle cores;
``--qir`` reuses a file written by ``qir import smollm2-135m``). Prints one line per step and the numbers.
"""

from __future__ import annotations

import argparse
import time

from qir.debug import QirSource, compare_sources, default_feeds
from qir.debug.account import bounded_metric
from qir.debug.bisect import bisect_layers
from qir.frontend.importer import import_model
from qir.passes import run_pipeline

CALIB = "/usr/share/common-licenses/Apache-2.0"
EVAL = "/usr/share/common-licenses/GPL-3"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qir", default="smollm2-135m", help="a .qir of SmolLM2 (or the zoo name: traced here)")
    ap.add_argument("--layer", type=int, default=12)
    args = ap.parse_args()
    t0 = time.perf_counter()
    imp = import_model(args.qir)
    weight = f"hf.model.layers.{args.layer}.mlp.down_proj.weight"
    broken = f'quantize{{scheme=w8a16,overrides="*.layers.{args.layer}.mlp.down_proj.weight=w2a16:tensor"}}'
    metric = bounded_metric(imp.module, imp.kind, imp.tokenizer, text=EVAL, windows=1, seq=256)
    plain = metric.measure(run_pipeline(imp.module, "quantize{scheme=w8a16}"))
    bad_module = run_pipeline(imp.module, broken)
    print(f"# loaded and quantized in {time.perf_counter() - t0:.0f} s; ppl (1 x 256 tokens of {EVAL}): float "
          f"{metric.measure(imp.module):.3f}, w8a16 {plain:.3f}")
    src = QirSource.from_import(imp)
    t1 = time.perf_counter()
    res = compare_sources(src, QirSource(bad_module), default_feeds(src, text=CALIB, windows=1, seq=256))
    worst = next(t for t in res.tensors if t.name == res.worst)
    print(f"compare: {res.matched} of {res.names_b} values matched in {time.perf_counter() - t1:.0f} s; worst "
          f"{res.worst} ({worst.weights[0] if worst.weights else '?'}: {worst.sqnr_db:.2f} dB, drop "
          f"{worst.drop_db:.2f} dB) -> {'OK' if worst.weights and worst.weights[0] == weight else 'WRONG'}")
    del bad_module
    t2 = time.perf_counter()
    b = bisect_layers(imp.module, broken, metric, 1.01 * plain, feeds=default_feeds(src, text=EVAL, seq=256))
    print(f"bisect: {len(b.evaluations)} evaluations in {time.perf_counter() - t2:.0f} s; kept {b.kept}; ppl "
          f"{b.baseline:.3f} -> {b.final:.3f} (w8a16 {plain:.3f}, ratio {b.final / plain:.4f}) -> "
          f"{'OK' if b.kept == [weight] and b.final <= 1.01 * plain else 'WRONG'}")
    print(f"overrides=\"{b.overrides}\"")


if __name__ == "__main__":
    main()
