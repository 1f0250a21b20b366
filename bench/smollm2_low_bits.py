"""SmolLM2-135M below 4.65 bits per parameter: qir's bit-budget curve against llama.cpp's own sub-4-bit formats.

Issue #5's goals sit at 4.25 and 3.25 bits/param (ppl within 3% and 10% of float). This prints, in one run:

* qir: ``split-vocab{hot=N}`` (the most frequent rows of the tied table int8-able, the rest a separate tensor), then
  ``mixed-precision`` over every linear weight and both table parts with the formats that are lossless or nearly so
  on this model -- ``4g32m`` (Q4_1's own blocks, a float minimum per group of 32), ``4g64m``, ``4g128m`` (GPTQ) and
  ``8`` -- with block scales stored in 8 bits (``scales=u8``). The sensitivities are measured once (GPTQ per tensor
  and candidate, Hessians from ``--calib-windows`` windows of Debian's non-GPL licence texts), then one row per
  ``--budgets`` value. Perplexity by qir's interpreter on GPL-3 (``qir.evaluate``, ``--eval-windows`` x 512).
* llama.cpp (``--llama-cpp``, llama-cpp-python): the cached Q4_1 GGUF requantized by llama.cpp's own quantizer
  to each of ``--llama-formats`` (``allow_requantize``), its file size as bits per parameter and its perplexity
  on the same token windows (qir's tokenizer ids fed as ids).

    python bench/smollm2_low_bits.py [--budgets 4.4,4.45,4.5,4.55,4.6] [--hot 2048] [--llama-cpp]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from quantize_smollm2 import CALIB_TEXTS, EVAL_TEXT, float_params

import qir
from qir.evaluate import perplexity, perplexity_of_ids, window_ids
from qir.passes import PassContext, PassManager, run_pipeline
from qir.passes.calibrate import calibration_function

CANDIDATES = "8,4g32m,4g64m,4g128m"


def llama_cpp_rows(formats: list[str], ids: list[int], eval_windows: int, n_params: int) -> None:
    """Requantize the source GGUF with llama.cpp to each format; print bits/param (file size) and perplexity."""
    import llama_cpp
    from gguf_smollm2 import source_gguf
    from llama_cpp import Llama

    src = source_gguf()

    def ppl(path: Path) -> float:
        llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
                    verbose=False)

        def fn(x: np.ndarray) -> np.ndarray:
            llm.reset()
            llm.eval([int(t) for t in x[0]])
            return np.asarray(llm.scores[: x.shape[1]], np.float32)[None]

        return perplexity_of_ids(fn, ids, max_windows=eval_windows).ppl

    base = ppl(src)
    print(f"{'llama.cpp Q4_1 (source)':<34} {8 * src.stat().st_size / n_params:>10.3f} {base:>9.3f} {1.0:>12.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in formats:
            out = Path(tmp) / f"{name}.gguf"
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            p.allow_requantize = True
            p.nthread = 2
            if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) != 0:
                print(f"{'llama.cpp ' + name:<34} quantization failed")
                continue
            r = ppl(out)
            print(f"{'llama.cpp ' + name:<34} {8 * out.stat().st_size / n_params:>10.3f} {r:>9.3f} "
                  f"{r / base:>12.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="4.4,4.45,4.5,4.55,4.6")
    ap.add_argument("--hot", type=int, default=2048, help="split-vocab's hot rows (0: no split)")
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--llama-cpp", action="store_true", help="add llama.cpp's requantized formats")
    ap.add_argument("--llama-formats", default="Q4_K_S,Q3_K_L,Q3_K_M,Q3_K_S,Q2_K")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    imp = qir.import_model("smollm2-135m")
    module, tok = imp.module, imp.tokenizer
    func = calibration_function(module).name
    in_name = module.function(func).inputs[0].name
    ids = tok("\n\n".join(p.read_text() for p in CALIB_TEXTS), add_special_tokens=False)["input_ids"]
    calib = [{in_name: np.asarray([w], np.int64)} for w in window_ids(ids, window=512, max_windows=None)
             if len(w) == 512][: args.calib_windows]
    ctx = PassContext(calibration=calib, function=func)
    n_params = float_params(module)
    base = perplexity(module, EVAL_TEXT, tokenizer=tok, max_windows=args.eval_windows)
    print(f"# float ppl {base.ppl:.3f} ({base.windows} x 512 tokens of {EVAL_TEXT.name}); calibration "
          f"{len(calib)} windows of the licence texts", flush=True)
    src = run_pipeline(module, f"split-vocab{{hot={args.hot}}}", context=ctx) if args.hot else module
    opts = f'candidates="{args.candidates}",scales=u8,rounding=gptq,windows={args.calib_windows}'
    pm = PassManager(f"mixed-precision{{budget=8,{opts}}}", context=ctx)
    mp = pm.passes[0]
    mp.context = ctx
    t1 = time.perf_counter()
    options = mp.measure(src)
    print(f"# split-vocab{{hot={args.hot}}}, mixed-precision{{{opts}}}: sensitivities in "
          f"{time.perf_counter() - t1:.0f} s", flush=True)
    print(f"{'system':<34} {'bits/param':>10} {'ppl':>9} {'ppl/float':>12}  formats")
    for budget in (float(b) for b in args.budgets.split(",")):
        mp.budget = budget
        out = src.clone()
        mp.assign(out, options)
        r = perplexity(out, EVAL_TEXT, tokenizer=tok, max_windows=args.eval_windows)
        counts: dict[str, int] = {}
        for a in mp.assignment:
            counts[str(a.fmt)] = counts.get(str(a.fmt), 0) + 1
        print(f"{'qir budget ' + str(budget):<34} {8 * qir.stored_bytes(out) / n_params:>10.3f} {r.ppl:>9.3f} "
              f"{r.ppl / base.ppl:>12.3f}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), flush=True)
        del out
    if args.llama_cpp:
        eval_ids = tok(EVAL_TEXT.read_text(), add_special_tokens=False)["input_ids"]
        llama_cpp_rows([f.strip() for f in args.llama_formats.split(",") if f.strip()], eval_ids,
                       args.eval_windows, n_params)
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
