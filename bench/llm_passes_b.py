"""Measure ``vocab-share`` and ``mixed-precision`` on SmolLM2-135M (and ``vocab-share`` on MiniLM-L6).

Everything runs through qir's reference interpreter. Calibration (token frequencies, input second moments) uses
``/usr/share/common-licenses/Apache-2.0``; evaluation uses a DIFFERENT text, ``/usr/share/common-licenses/GPL-3``,
in ``--eval-windows`` non-overlapping 512-token windows (``qir.evaluate``'s perplexity definition). Sizes are
``qir.stored_bytes`` (every constant: codes, scales, zero points, index maps).

``vocab`` section: for each ``clusters`` K, ``vocab-share{clusters=K,keep=N,residual_bits=B}`` alone (the rest of
the model float): embedding+head bytes (the tied table's replacement: codebook, index map, residual codes and
scales), perplexity, and top-1 next-token agreement with the float model over the evaluated positions; the same
with the codebook then quantized i8 per row by ``quantize``. MiniLM: the same table bytes and the sentence
embedding cosine against the float module.

``mixed`` section: ``mixed-precision{budget=B}`` for several budgets against uniform ``quantize`` w8a16, w4a16 g128
and w4a16 per channel (their default i8 embedding/head); total stored bytes and perplexity; ``--png FILE`` saves the
ppl-vs-size curve (needs matplotlib).

    python bench/llm_passes_b.py --sections vocab,mixed --eval-windows 2 --png /tmp/mixed.png
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

import qir
from qir.evaluate import embedding_cosine, qir_embed_fn, qir_logits_fn, window_ids
from qir.passes import PassContext, run_pipeline
from qir.passes.mixed_precision import MixedPrecision, parse_candidates

CALIB_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")


def nll_and_top1(module: qir.Module, windows: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window: the NLL of each next token and the argmax prediction at each position."""
    fn = qir_logits_fn(module)
    nlls, tops = [], []
    for w in windows:
        lg = np.asarray(fn(np.asarray([w], np.int64)))[0].astype(np.float64)
        x = lg[:-1]
        m = x.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
        tgt = np.asarray(w[1:], np.int64)
        nlls.append(lse - x[np.arange(len(tgt)), tgt])
        tops.append(lg.argmax(axis=-1))
    return nlls, tops


def ppl(nlls: list[np.ndarray]) -> float:
    return math.exp(float(np.concatenate(nlls).mean()))


def table_bytes(module: qir.Module, prefix: str) -> int:
    """Bytes of the constants that replace the table ``prefix`` (it, ``prefix.*``)."""
    return sum(c.type.nbytes() for n, c in module.constants.items() if n == prefix or n.startswith(prefix + "."))


def embedding_table(module: qir.Module) -> str:
    for f in module.functions.values():
        for op in f.find_ops("embedding"):
            if op.operands[0].is_constant:
                return op.operands[0].name
    raise SystemExit("no embedding table")


def smol_setup(window: int, eval_windows: int) -> tuple[Any, PassContext, list[list[int]]]:
    t0 = time.perf_counter()
    imp = qir.import_model("smollm2-135m")
    print(f"# imported smollm2-135m in {time.perf_counter() - t0:.0f} s", flush=True)
    module, tok = imp.module, imp.tokenizer
    name = module.function("prefill").inputs[0].name
    cal = tok(CALIB_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    ctx = PassContext(calibration=[{name: np.asarray([w], np.int64)} for w in window_ids(cal, window=window,
                                                                                          max_windows=None)],
                      function="prefill")
    ev = window_ids(tok(EVAL_TEXT.read_text(), add_special_tokens=False)["input_ids"], window=window,
                    max_windows=eval_windows)
    return imp, ctx, ev


def vocab_smol(imp: Any, ctx: PassContext, ev: list[list[int]], args: argparse.Namespace) -> None:
    module = imp.module
    tname = embedding_table(module)
    t0 = time.perf_counter()
    fl_nll, fl_top = nll_and_top1(module, ev)
    print(f"# float: ppl {ppl(fl_nll):.4f} ({time.perf_counter() - t0:.0f} s for {len(ev)} windows)", flush=True)
    print("| pipeline | emb+head bytes | ppl | top-1 agreement | pass s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| float | {table_bytes(module, tname)} | {ppl(fl_nll):.4f} | 1.0000 | - |")
    for bits, scheme in (("i8", "w8a16"), ("i4", "w4a16"))[: 2 if args.i4_baseline else 1]:
        qt = run_pipeline(module, f'quantize{{overrides="*=none;{tname}={scheme}"}}')
        nll, top = nll_and_top1(qt, ev)
        agree = float(np.mean(np.concatenate(top) == np.concatenate(fl_top)))
        print(f"| quantize (table {bits} per row only) | {table_bytes(qt, tname)} | {ppl(nll):.4f} | {agree:.4f} | - |",
              flush=True)
    for spec in filter(None, args.vocab_configs.split(";")):
        pipe = f"vocab-share{{{spec}}}"
        t0 = time.perf_counter()
        shared = run_pipeline(module, pipe, context=ctx)
        dt = time.perf_counter() - t0
        # the same result with the codebook then quantized i8 per row (k-means is not rerun)
        q8 = f'quantize{{overrides="*=none;{tname}.codebook=w8a16"}}'
        for label, out in ((pipe, shared), (f"{pipe},{q8}", run_pipeline(shared, q8))):
            nll, top = nll_and_top1(out, ev)
            agree = float(np.mean(np.concatenate(top) == np.concatenate(fl_top)))
            print(f"| `{label}` | {table_bytes(out, tname)} | {ppl(nll):.4f} | {agree:.4f} | {dt:.0f} |", flush=True)


def vocab_minilm(args: argparse.Namespace) -> None:
    imp = qir.import_model("minilm-l6")
    module, tok = imp.module, imp.tokenizer
    tname = embedding_table(module)
    ref = qir_embed_fn(module, tok)
    lines = [ln.strip() for ln in CALIB_TEXT.read_text().splitlines() if ln.strip()][:64]
    feeds = []
    for i in range(0, len(lines), 8):
        enc = tok(lines[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds.append({"input_ids": np.asarray(enc["input_ids"], np.int64),
                      "attention_mask": np.asarray(enc["attention_mask"], np.int64)})
    ctx = PassContext(calibration=feeds)
    total = qir.stored_bytes(module)
    print(f"# minilm-l6: {total} bytes, table @{tname} {table_bytes(module, tname)} bytes")
    print("| pipeline | table bytes | model bytes | cosine mean | cosine min |")
    print("|---|---:|---:|---:|---:|")
    runs: list[tuple[str, qir.Module]] = []
    for scheme in ("w8a16", "w4a16"):
        pipe = f'quantize{{overrides="*=none;{tname}={scheme}"}}'
        runs.append((pipe, run_pipeline(module, pipe)))
    q8 = f'quantize{{overrides="*=none;{tname}.codebook=w8a16"}}'
    for spec in filter(None, args.minilm_configs.split(";")):
        out = run_pipeline(module, f"vocab-share{{{spec}}}", context=ctx)
        runs += [(f"vocab-share{{{spec}}}", out), (f"vocab-share{{{spec}}},{q8}", run_pipeline(out, q8))]
    for pipe, out in runs:
        cos = embedding_cosine(qir_embed_fn(out, tok), ref)
        print(f"| `{pipe}` | {table_bytes(out, tname)} | {qir.stored_bytes(out)} | "
              f"{cos.cosine_mean:.5f} | {cos.cosine_min:.5f} |", flush=True)


def mixed_smol(imp: Any, ctx: PassContext, ev: list[list[int]], args: argparse.Namespace) -> None:
    module = imp.module
    rows: list[tuple[str, int, float]] = []
    print("| pipeline | stored bytes | bits/param | ppl | pass s |")
    print("|---|---:|---:|---:|---:|")
    nparams = sum(int(np.prod(c.type.shape)) for c in module.constants.values())
    pipes = [("uniform w8 (per row)", "quantize{scheme=w8a16}"),
             ("uniform w4 g128", "quantize{scheme=w4a16,group=128}"),
             ("uniform w4 per-channel", "quantize{scheme=w4a16}")]
    for label, pipe in pipes:
        t0 = time.perf_counter()
        out = run_pipeline(module, pipe)
        dt = time.perf_counter() - t0
        nll, _ = nll_and_top1(out, ev)
        nb = qir.stored_bytes(out)
        rows.append((label, nb, ppl(nll)))
        print(f"| `{pipe}` | {nb} | {8 * nb / nparams:.3f} | {ppl(nll):.4f} | {dt:.0f} |", flush=True)
    # the sensitivities do not depend on the budget: measure once, then allocate and quantize per budget
    t0 = time.perf_counter()
    probe = MixedPrecision(candidates=args.candidates, windows=args.mp_windows)
    probe.context = ctx
    options = probe.measure(module)
    print(f"# mixed-precision: sensitivities of {len(options)} tensors x {len(parse_candidates(args.candidates))} "
          f"candidates in {time.perf_counter() - t0:.0f} s ({args.mp_windows} calibration windows)", flush=True)
    for b in args.budgets.split(","):
        pipe = f'mixed-precision{{budget={b},candidates="{args.candidates}",windows={args.mp_windows}}}'
        mp = MixedPrecision(budget=float(b), candidates=args.candidates, windows=args.mp_windows)
        mp.context = ctx
        out = module.clone()
        t0 = time.perf_counter()
        mp.assign(out, options)
        dt = time.perf_counter() - t0
        qir.verify(out)
        nll, _ = nll_and_top1(out, ev)
        nb = qir.stored_bytes(out)
        rows.append((f"mixed {b}", nb, ppl(nll)))
        print(f"| `{pipe}` | {nb} | {8 * nb / nparams:.3f} | {ppl(nll):.4f} | {dt:.0f} |", flush=True)
        print("#   " + mp.table().splitlines()[-1], flush=True)
        if args.show_table:
            print(mp.table(), flush=True)
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("# matplotlib is not installed: no PNG (pip install matplotlib)")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        mixed = sorted((nb, p) for label, nb, p in rows if label.startswith("mixed"))
        ax.plot([nb / 1e6 for nb, _ in mixed], [p for _, p in mixed], "o-", label="mixed-precision")
        for label, nb, p in rows:
            if label.startswith("uniform"):
                ax.plot([nb / 1e6], [p], "s", label=label)
        ax.set_xlabel("stored MB (qir.stored_bytes)")
        ax.set_ylabel(f"perplexity, GPL-3, {len(ev)} x 512 tokens")
        ax.set_title("SmolLM2-135M: mixed-precision vs uniform")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"# saved {args.png}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="vocab,minilm,mixed")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--vocab-configs", default="clusters=4096,keep=1024,residual_bits=2,iters=2;"
                    "clusters=8192,keep=1024,residual_bits=2,iters=2;clusters=16384,keep=1024,residual_bits=2,iters=2")
    ap.add_argument("--minilm-configs", default="clusters=2048,keep=512,residual_bits=2,iters=2;"
                    "clusters=4096,keep=512,residual_bits=2,iters=2;clusters=8192,keep=512,residual_bits=2,iters=2")
    ap.add_argument("--i4-baseline", action="store_true", help="also the table quantized i4 per row")
    ap.add_argument("--budgets", default="4.25,4.5,5,5.5")
    ap.add_argument("--candidates", default="8,4g32,4g128,4")
    ap.add_argument("--mp-windows", type=int, default=2, help="calibration windows for the sensitivities")
    ap.add_argument("--show-table", action="store_true", help="print the full per-tensor table of each mixed run")
    ap.add_argument("--png", default="")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections & {"vocab", "mixed"}:
        imp, ctx, ev = smol_setup(args.window, args.eval_windows)
        if "vocab" in sections:
            vocab_smol(imp, ctx, ev, args)
        if "mixed" in sections:
            mixed_smol(imp, ctx, ev, args)
    if "minilm" in sections:
        vocab_minilm(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
