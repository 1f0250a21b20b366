"""Quantization quality and size of SmolLM2-135M under each ``quantize`` scheme, measured with qir's own interpreter.

Imports SmolLM2-135M (float), calibrates on one set of texts and evaluates perplexity on a DIFFERENT text
(``/usr/share/common-licenses/GPL-3``), 512-token windows (``qir.evaluate``'s definition: independent,
non-overlapping windows, no special tokens). Prints one table row per scheme: stored bytes (``qir.stored_bytes``:
every constant, scales and zero points included), bits per float parameter, perplexity and the ratio to the float
model.

Calibration text (``--calib-text FILE``, repeatable): by default Debian's non-GPL licence texts (Apache-2.0,
MPL-2.0, GFDL-1.3, Artistic, CC0-1.0, BSD, MPL-1.1: ~23,000 tokens, 45 windows of 512), on every Debian machine and
none of them the evaluation text or one that quotes it (the LGPL texts would). The calibration *timing / memory*
measurement asks for ``--calib-windows`` windows (default 32 x 512 tokens; the text repeats if it is short); the
statistics used by the static and smoothed schemes come from that run. GPTQ uses the first ``--gptq-windows``
distinct windows (default 32, as `qir quantize --calib-windows`).

    python bench/quantize_smollm2.py                     # every scheme, 8 evaluation windows
    python bench/quantize_smollm2.py --eval-windows 2 --schemes w8a16,w4a16-g128-rtn
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

import qir
from qir.evaluate import perplexity, window_ids
from qir.passes import PassContext, run_pipeline
from qir.passes.calibrate import calibration_function

CALIB_TEXTS = [Path("/usr/share/common-licenses") / n
               for n in ("Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD", "MPL-1.1")]
EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")

# name -> (pipeline, needs calibration statistics, needs calibration feeds)
SCHEMES: dict[str, tuple[str, bool, bool]] = {
    "w8a8-static-tensor": ("quantize{scheme=w8a8,act=static}", True, False),
    "w8a8-dynamic-token": ("quantize{scheme=w8a8,act=dynamic}", False, False),
    "w8a8-dynamic-smooth": ("fold-scales{smooth=0.5},quantize{scheme=w8a8}", True, False),
    "w8a16": ("quantize{scheme=w8a16}", False, False),
    "w4a16-g128-rtn": ("quantize{scheme=w4a16,group=128}", False, False),
    "w4a16-g128-gptq": ("quantize{scheme=w4a16,group=128,rounding=gptq}", False, True),
    "w4a16-g128-asym-rtn": ("quantize{scheme=w4a16,group=128,symmetric=false}", False, False),
    "w4a16-g128-asym-gptq": ("quantize{scheme=w4a16,group=128,symmetric=false,rounding=gptq}", False, True),
    "w4a16-channel-rtn": ("quantize{scheme=w4a16}", False, False),
    "w4a16-g64-rtn": ("quantize{scheme=w4a16,group=64}", False, False),
    "w4a16-g64-gptq": ("quantize{scheme=w4a16,group=64,rounding=gptq}", False, True),
}


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def float_params(module: qir.Module) -> int:
    return sum(int(np.prod(c.type.shape)) for c in module.constants.values() if c.type.dtype.is_float)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--gptq-windows", type=int, default=32)
    ap.add_argument("--calib-text", action="append", type=Path, metavar="FILE",
                    help="calibration text (repeatable; default: Debian's non-GPL licence texts)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of " + ", ".join(SCHEMES))
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for s in wanted:
        if s not in SCHEMES:
            ap.error(f"unknown scheme {s!r}; choose from {', '.join(SCHEMES)}")

    t0 = time.perf_counter()
    imp = qir.import_model(args.model)
    module, tok = imp.module, imp.tokenizer
    print(f"# imported {args.model} in {time.perf_counter() - t0:.0f} s; peak RSS {rss_mb():.0f} MB", flush=True)
    func = calibration_function(module).name
    in_name = module.function(func).inputs[0].name

    texts = args.calib_text or CALIB_TEXTS
    ids = tok("\n\n".join(p.read_text() for p in texts), add_special_tokens=False)["input_ids"]
    distinct = [np.asarray([w], np.int64) for w in window_ids(ids, window=args.window, max_windows=None)
                if len(w) == args.window]
    reps = -(-args.calib_windows // max(len(distinct), 1))
    calib = [{in_name: w} for w in (distinct * reps)[: args.calib_windows]]
    print(f"# calibration texts {', '.join(p.name for p in texts)}: {len(ids)} tokens = {len(distinct)} distinct "
          f"windows of {args.window}; calibrating on {len(calib)} windows", flush=True)

    needs_stats = any(SCHEMES[s][1] for s in wanted)
    calibrated = module
    if needs_stats or args.calib_windows:
        before = rss_mb()
        t1 = time.perf_counter()
        calibrated = run_pipeline(module, "calibrate", context=PassContext(calibration=calib, function=func),
                                  verify_each=False)
        secs = time.perf_counter() - t1
        n_stats = sum(1 for n in calibrated.constants if n.startswith("calib.") and not n.endswith(".chmax"))
        print(f"# calibrate (minmax, {len(calib)} x {args.window} tokens, @{func}): {secs:.0f} s, {n_stats} values; "
              f"peak RSS {before:.0f} MB before, {rss_mb():.0f} MB after", flush=True)

    gptq_ctx = PassContext(calibration=[{in_name: w} for w in distinct[: args.gptq_windows]], function=func)
    n_params = float_params(module)
    t2 = time.perf_counter()
    base = perplexity(module, EVAL_TEXT, tokenizer=tok, window=args.window, max_windows=args.eval_windows)
    print(f"# evaluation: {EVAL_TEXT}, {base.windows} windows x {args.window} tokens ({base.tokens} predictions); "
          f"float run {time.perf_counter() - t2:.0f} s", flush=True)
    header = f"{'scheme':<22} {'bytes':>12} {'bits/param':>10} {'ppl':>9} {'ppl/float':>9} {'quantize s':>10}"
    print(header)
    print("-" * len(header))
    fbytes = qir.stored_bytes(module)
    print(f"{'float (f32)':<22} {fbytes:>12,} {8 * fbytes / n_params:>10.2f} {base.ppl:>9.3f} {1.0:>9.3f} {0.0:>10.0f}",
          flush=True)
    for name in wanted:
        pipeline, stats, feeds = SCHEMES[name]
        src = calibrated if stats else module
        t3 = time.perf_counter()
        out = run_pipeline(src, pipeline, context=gptq_ctx if feeds else PassContext(function=func),
                           verify_each=True)
        qsecs = time.perf_counter() - t3
        nbytes = qir.stored_bytes(out)
        r = perplexity(out, EVAL_TEXT, tokenizer=tok, window=args.window, max_windows=args.eval_windows)
        print(f"{name:<22} {nbytes:>12,} {8 * nbytes / n_params:>10.2f} {r.ppl:>9.3f} {r.ppl / base.ppl:>9.3f} "
              f"{qsecs:>10.0f}", flush=True)
        del out
    print(f"# total {time.perf_counter() - t0:.0f} s; peak RSS {rss_mb():.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
