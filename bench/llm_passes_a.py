"""SmolLM2-135M perplexity with and without the ``outlier-split`` and ``fold-scales`` passes (issue 5, part A).

Imports SmolLM2-135M, calibrates (minmax) on ``/usr/share/common-licenses/Apache-2.0`` (its distinct 512-token
windows) and evaluates perplexity on ``/usr/share/common-licenses/GPL-3`` through qir's interpreter, so keep
``--eval-windows`` small (2 by default: about 10 s a window). Prints one row per pipeline: perplexity, ratio to
float, the number of ops (all functions), and for outlier-split the fraction of linear input columns moved to the
f16 path.

    python bench/llm_passes_a.py                       # every row, 2 evaluation windows
    python bench/llm_passes_a.py --rows split,static --eval-windows 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import qir
from qir.evaluate import perplexity, window_ids
from qir.passes import PassContext, run_pipeline
from qir.passes.calibrate import calibration_function

CALIB_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")

# row -> pipeline run on the calibrated float module (calibration feeds are in the context)
ROWS: dict[str, str] = {
    "static": "quantize{scheme=w8a8,act=static},dce",
    "split": "outlier-split,quantize{scheme=w8a8,act=static},dce",
    "split-t3": "outlier-split{threshold=3.0},quantize{scheme=w8a8,act=static},dce",
    "smooth-static": "fold-scales{smooth=0.5},calibrate,quantize{scheme=w8a8,act=static},fold-scales,dce",
    "smooth-split-static": "fold-scales{smooth=0.5},calibrate,outlier-split,quantize{scheme=w8a8,act=static},dce",
    "dynamic": "quantize{scheme=w8a8},dce",
    "smooth-dynamic": "fold-scales{smooth=0.5},calibrate,quantize{scheme=w8a8},fold-scales,dce",
}


def n_ops(module: qir.Module) -> int:
    return sum(len(f.ops) for f in module.functions.values())


def split_fraction(module: qir.Module, float_module: qir.Module) -> tuple[int, int, int, int]:
    """(outlier columns, input columns of every linear weight, split weights, linear weights), from the IR."""
    weights = {op.operands[1].name: int(op.operands[1].type.shape[1]) for f in float_module.functions.values()
               for op in f.find_ops("linear") if op.operands[1].is_constant}
    moved = n_split = 0
    for name in weights:
        c = module.constants.get(name + ".outlier")
        if c is not None and c.type.dtype.name == "f16":
            moved += int(c.type.shape[0])
            n_split += 1
    return moved, sum(weights.values()), n_split, len(weights)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    imp = qir.import_model(args.model)
    module, tok = imp.module, imp.tokenizer
    func = calibration_function(module).name
    in_name = module.function(func).inputs[0].name
    ids = tok(CALIB_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    calib = [{in_name: np.asarray([w], np.int64)} for w in window_ids(ids, window=args.window, max_windows=None)
             if len(w) == args.window]
    ctx = PassContext(calibration=calib, function=func)
    t0 = time.perf_counter()
    calibrated = run_pipeline(module, "calibrate", context=ctx, verify_each=False)
    print(f"# calibrate: {len(calib)} x {args.window} tokens of {CALIB_TEXT} in {time.perf_counter() - t0:.0f} s; "
          f"eval: {args.eval_windows} x {args.window} tokens of {EVAL_TEXT}", flush=True)
    base = perplexity(module, EVAL_TEXT, tokenizer=tok, window=args.window, max_windows=args.eval_windows)
    print(f"{'row':<20} {'ppl':>9} {'ppl/float':>9} {'ops':>6}  notes / pipeline (after calibrate)")
    print(f"{'float':<20} {base.ppl:>9.3f} {1.0:>9.3f} {n_ops(module):>6}", flush=True)
    for r in rows:
        t1 = time.perf_counter()
        out = run_pipeline(calibrated, ROWS[r], context=ctx, verify_each=True)
        res = perplexity(out, EVAL_TEXT, tokenizer=tok, window=args.window, max_windows=args.eval_windows)
        moved, total, n_split, n_weights = split_fraction(out, module)
        note = (f"split {moved}/{total} input cols = {moved / total:.2%} ({n_split}/{n_weights} weights); "
                if n_split else "")
        print(f"{r:<20} {res.ppl:>9.3f} {res.ppl / base.ppl:>9.3f} {n_ops(out):>6}  {note}{ROWS[r]} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
