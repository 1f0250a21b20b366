"""Where the time of a qir ``tvm-llvm`` build goes: time per TensorIR kernel, through the Relax VM's instrument hook.

apache-tvm 0.27's Relax VM has no ``profile=True`` any more; it calls an instrument function before and after each
``Call`` instruction (``VirtualMachine.set_instrument``), which is enough to time every PrimFunc call (the VM runs
them synchronously on the CPU). The table groups calls by PrimFunc name (after fusion: ``fused_...`` names list the
ops fused into one kernel) and prints total milliseconds per run, calls per run and share of the total.

    python bench/tvm_profile.py [--model minilm-l6] [--pipeline "quantize{scheme=w8a8}"] [--runs 5] [--top 30]
    python bench/tvm_profile.py --model smollm2-135m --function decode --position 512 --pipeline "..."

MiniLM runs batch 8 x seq 128 (as ``bench/ort_minilm.py``), 2 threads. A causal LM's ``decode`` runs one token at
``--position`` (the caches zero-filled: the work does not depend on their values), its ``prefill`` ``--position``
tokens. ``--no-kernels`` profiles the build without the hand-scheduled kernels.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import numpy as np

THREADS = 2
BATCH, SEQ = 8, 128


def _lm_inputs(module: Any, function: str, position: int) -> list[np.ndarray]:
    if function == "prefill":
        return [np.random.default_rng(0).integers(0, 1000, (1, position)).astype(np.int64)]
    caches = [np.zeros(v.type.shape, np.float32) for v in module.function(function).inputs[2:]]
    return [np.array([[42]], np.int64), np.array([position], np.int64), *caches]


def _inputs(model: str) -> list[np.ndarray]:
    from qir.evaluate import DEFAULT_SENTENCES
    from qir.models import load_model

    loaded = load_model(model)
    enc = loaded.tokenizer(list(DEFAULT_SENTENCES)[:BATCH], padding="max_length", truncation=True,
                           max_length=SEQ, return_tensors="np")
    return [np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64)]


def profile(built: Any, inputs: list[np.ndarray], runs: int, function: str | None = None
            ) -> tuple[dict[str, float], dict[str, int], float]:
    """Milliseconds and calls per run of each called symbol, and the wall time of a run (median)."""
    import tvm
    from tvm import relax

    fname = function or next(iter(built.lowered.signatures))
    sig = built.lowered.signatures[fname]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
    args += [tvm.runtime.tensor(built.lowered.params[p]) for p in sig["params"]]
    vm[fname](*args)  # warm-up, uninstrumented
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        vm[fname](*args)
        walls.append(time.perf_counter() - t)
    ms: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    start: dict[str, float] = {}

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *a: Any) -> int:
        if before:
            start[symbol] = time.perf_counter()
        else:
            ms[symbol] += (time.perf_counter() - start.pop(symbol)) * 1e3 / runs
            calls[symbol] += 1
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    for _ in range(runs):
        vm[fname](*args)
    return dict(ms), {k: v // runs for k, v in calls.items()}, float(np.median(walls)) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--pipeline", default="quantize{scheme=w8a8}")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--function", default=None, help="causal LMs: prefill or decode (default: the first function)")
    ap.add_argument("--position", type=int, default=512, help="decode position / prefill length")
    args = ap.parse_args()

    import tvm

    from qir.backends.target import load_target
    from qir.backends.tvm.compile import build
    from qir.frontend.importer import import_model
    from qir.passes import PassManager, parse_pipeline

    tvm.get_global_func("runtime.config_threadpool")(0, THREADS)
    module = import_model(args.model).module
    if args.pipeline:
        module = PassManager(parse_pipeline(args.pipeline)).run(module)
    t0 = time.perf_counter()
    built = build(module, load_target("tvm-llvm"), use_kernels=not args.no_kernels)
    print(f"built in {time.perf_counter() - t0:.1f} s; kernels: {built.lowered.kernels}")
    fname = args.function or next(iter(built.lowered.signatures))
    feeds = _inputs(args.model) if args.function is None else _lm_inputs(module, fname, args.position)
    ms, calls, wall = profile(built, feeds, args.runs, fname)
    total = sum(v for k, v in ms.items())
    what = f"@{fname} position {args.position}" if args.function else f"batch {BATCH} x {SEQ}"
    print(f"{args.model} {args.pipeline or 'float'}, {what}, {THREADS} threads: "
          f"wall {wall:.1f} ms per run, instrumented calls sum {total:.1f} ms")
    print(f"{'kernel':70s} {'ms/run':>8s} {'calls':>6s} {'share':>6s}")
    for name, v in sorted(ms.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name[:70]:70s} {v:8.2f} {calls[name]:6d} {v / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
