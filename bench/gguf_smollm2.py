"""SmolLM2-135M kept in its GGUF quantization (``--preset keep``) on ``ort-cpu`` and ``tvm-llvm``, beside llama.cpp.

Needs artifact folders made by ``qir compile`` (one per system to compare), e.g.::

    qir import smollm2-135m --keep-quantized -o /tmp/gguf/keep.qir
    qir compile smollm2-135m --target ort-cpu --preset keep -o /tmp/tvmkeep/ort-keep     # the file's own blocks
    qir compile smollm2-135m --target tvm-llvm --preset keep -o /tmp/tvmkeep/tvm-keep2
    qir quantize /tmp/gguf/keep.qir -p compress-scales -o /tmp/tvmkeep/keep-cs.qir       # 8-bit block parameters
    qir compile /tmp/tvmkeep/keep-cs.qir --target tvm-llvm --preset keep -o /tmp/tvmkeep/tvm-keep-cs
    python bench/gguf_smollm2.py /tmp/tvmkeep/ort-keep /tmp/tvmkeep/tvm-keep2 /tmp/tvmkeep/tvm-keep-cs \
        --llama-cpp --repeats 3 --decode 32

For each artifact, in one run: its bytes (``report.json``: library + weights), perplexity on a license text
(``qir.evaluate``'s definition: 512-token windows, at most 8; Python's LICENSE.txt has 7), prefill time of one
512-token window (median of ``--repeats``), and decode tokens/s (``--decode`` greedy steps after a 128-token prefill;
TVM keeps its static KV cache on the device). Ratios are to the first artifact. ``--llama-cpp`` adds llama.cpp
(llama-cpp-python 0.3.36, bench-only dependency) on the GGUF file qir imported: the same token ids (qir's tokenizer,
no special tokens) so the same next tokens are scored, all logits returned (``logits_all``) in prefill as qir's
``prefill`` does, size = the file's bytes; and every row's ratios to it.

Measured 2026-11-23 (session 3), 2 threads, on 2 cores shared with ~5 other jobs (load average 7-14 during the run,
46 min wall): perplexity is exact, times are noise-dominated::

    system             MB      ppl  ppl x  prefill512 s      x  decode tok/s | vs llama.cpp: MB, ppl, prefill, decode
    ort-keep        107.4  12.7798 1.0000         5.201   1.00           1.9 |  1.09 0.9983  0.33 13.25
    tvm-keep2        98.4  12.7798 1.0000        91.409  17.58           4.8 |  1.00 0.9983  5.88 33.42
    tvm-keep-cs      93.2  12.7366 0.9966        99.644  19.16           5.6 |  0.95 0.9950  6.41 38.87
    llama.cpp Q4_1   98.4  12.8010 1.0017        15.543   2.99           0.1 |  1.00 1.0000  1.00  1.00

(rows: the artifact folders above under /tmp/tvmkeep; llama.cpp on SmolLM2-135M-Instruct.Q4_1.gguf)

The float (dequantized) import's perplexity on these windows is 12.7798: ``tvm-keep`` equals it (x1.0000), the
``compress-scales`` artifact is at -0.34% (as its ``.qir``), llama.cpp at +0.17% (its dot products quantize the
activations to 8 bits). llama.cpp's decode/prefill collapse here because its thread pool spin-waits at every op
barrier and the cores were oversubscribed: right after the run (load ~5.5) the same file gave 55.8 tok/s decode and
6.0 s prefill with 1 thread, but 2.5 tok/s and 12.3 s with 2 threads. So the decode ratios above are NOT a
speed-up over llama.cpp; measure on a quiet machine. On the TVM side the weight matmuls of one 512-token prefill
take ~4.3 s (``wmatmul`` alone, same load); the rest of the 91 s is the non-matmul kernels (attention, softmax,
norms, RoPE under the generic schedule: issue #7).

A speed-only rerun right after (same functions, no perplexity, repeats 2, load average 2-3) gave prefill512 /
decode: ort-keep 2.19 s / 5.7 tok/s, tvm-keep 51.6 s / 11.7 tok/s, tvm-keep-cs 75.2 s / 7.2 tok/s, llama.cpp
(2 threads) 10.8 s / 0.17 tok/s -- still the spin-wait collapse, against 55.8 tok/s with 1 thread.

Quiet machine, after the TVM attention/quantize kernels (#7) were merged, nothing else running (one run,
``--repeats 3 --decode 32``, artifacts ort-keep and tvm-keep only)::

    ort-keep        107.3  12.7798 1.0000         0.662   1.00           9.2
    tvm-keep         98.5  12.7798 1.0000        15.629  23.60          41.9
    llama.cpp Q4_1   98.4  12.8010 1.0017         9.877  14.91           0.3

llama.cpp still collapses INSIDE this process (0.3 tok/s even on the quiet machine: ORT's and TVM's thread pools
of the earlier rows are alive in the same process and its workers spin against them). Run alone right after,
``python bench/tvm_decode_llamacpp.py --tokens 64 --threads 2`` gave Q4_1 130.4 tok/s (Q8_0 126.1, Q4_0 182.0;
1 thread: 110.7 / 98.5 / 168.1): tvm-keep's 41.9 tok/s is ~0.32x llama.cpp at equal bits (its context here is
128 + 32 tokens, llama.cpp's 64 + 64). Running llama.cpp in a child process would make the row trustworthy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qir.backends.compile import load_artifact
from qir.evaluate import evaluate_artifact, perplexity_of_ids, window_ids

TEXT = Path("/usr/lib/python3.11/LICENSE.txt")
PROMPT = 128  # decode: tokens of the first window evaluated before the timed single-token steps


def measure(path: str, *, threads: int, repeats: int, decode_steps: int, text: Path) -> dict[str, float]:
    art = load_artifact(path, threads=threads)
    res = evaluate_artifact(art, text=text)
    ids = art.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    window = np.asarray([window_ids(ids, window=512, max_windows=1)[0]], np.int64)
    art.run([window], function="prefill")  # warm-up: session creation and first-run allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        art.run([window], function="prefill")
        times.append(time.perf_counter() - t0)
    out = {"bytes": float(art.bytes), "ppl": float(res["ppl"]), "prefill_s": statistics.median(times)}
    if decode_steps and "decode" in art.functions:
        rate = decode_rate_device if hasattr(art, "run_device") else decode_rate
        out["decode_tok_s"] = rate(art, window[:, :PROMPT], decode_steps)
    return out


def decode_rate_device(art: object, prompt: np.ndarray, steps: int) -> float:
    """:func:`decode_rate` for a TVM artifact: the caches stay on the device, updated in place (``run_device``)."""
    import tvm

    outs = art.run_device([prompt], function="prefill")  # type: ignore[attr-defined]
    logits, caches = outs[0].numpy(), outs[1:]
    info = art.report["functions"]["decode"]  # type: ignore[attr-defined]
    n = prompt.shape[1]
    dev = []
    for name, c in zip(info["inputs"][2:], caches):
        full = np.zeros(info["input_types"][name]["shape"], np.float32)
        full[:, :, :n] = c.numpy()
        dev.append(tvm.runtime.tensor(full))
    token = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
    t0 = time.perf_counter()
    for i in range(steps):
        out = art.run_device([token, np.asarray([n + i], np.int64), *dev], function="decode")  # type: ignore
        token = np.asarray([[int(np.argmax(out[0].numpy()[0, -1]))]], np.int64)
    return steps / (time.perf_counter() - t0)


def measure_llama_cpp(gguf: Path, ids: list[int], *, threads: int, repeats: int, decode_steps: int,
                      ) -> dict[str, float]:
    """llama.cpp (llama-cpp-python) on the GGUF file itself: the same token windows, the same metric.

    The windows are qir's token ids (the tokenizer qir loads from this GGUF; no special tokens) fed to llama.cpp
    as ids, so both score exactly the same next tokens; ``logits_all=True`` gives every position's logits and the
    perplexity is computed by :func:`qir.evaluate.perplexity_of_ids`. Prefill: one 512-token window, all logits
    returned, as qir's ``prefill`` does. Decode: ``PROMPT`` tokens, then greedy single-token steps.
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)

    def logits_fn(x: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in x[0]])
        return np.asarray(llm.scores[: x.shape[1]], np.float32)[None]

    ppl = perplexity_of_ids(logits_fn, ids).ppl
    window = window_ids(ids, window=512, max_windows=1)[0]
    logits_fn(np.asarray([window]))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits_fn(np.asarray([window]))
        times.append(time.perf_counter() - t0)
    out = {"bytes": float(gguf.stat().st_size), "ppl": ppl, "prefill_s": statistics.median(times)}
    if decode_steps:
        llm.reset()
        llm.eval(window[:PROMPT])
        token = int(np.argmax(llm.scores[PROMPT - 1]))
        t0 = time.perf_counter()
        for i in range(decode_steps):
            llm.eval([token])
            token = int(np.argmax(llm.scores[PROMPT + i]))
        out["decode_tok_s"] = decode_steps / (time.perf_counter() - t0)
    return out


def decode_rate(art: object, prompt: np.ndarray, steps: int) -> float:
    """Greedy decode steps per second after a prefill of ``prompt`` (caches zero-padded to the decode slots)."""
    outs = art.run([prompt], function="prefill")  # type: ignore[attr-defined]
    logits, caches = outs[0], outs[1:]
    sess = art.session("decode")  # type: ignore[attr-defined]
    cache_shape = sess.get_inputs()[2].shape
    slots = int(cache_shape[2])
    n = prompt.shape[1]
    padded = []
    for c in caches:
        full = np.zeros(c.shape[:2] + (slots,) + c.shape[3:], c.dtype)
        full[:, :, :n] = c
        padded.append(full)
    token = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
    t0 = time.perf_counter()
    for i in range(steps):
        outs = art.run([token, np.asarray([n + i], np.int64), *padded], function="decode")  # type: ignore
        padded = outs[1:]
        token = np.asarray([[int(np.argmax(outs[0][0, -1]))]], np.int64)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", help="qir compile output folders; the first is the baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32, help="decode steps to time (0: skip)")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--llama-cpp", nargs="?", const="cached", default=None, metavar="GGUF",
                    help="add a llama.cpp row on this GGUF file (default: the cached SmolLM2 GGUF, the file qir "
                         "imports) and print every row's ratios to it")
    args = ap.parse_args(argv)
    rows = {}
    for a in args.artifacts:
        rows[a] = measure(a, threads=args.threads, repeats=args.repeats, decode_steps=args.decode, text=args.text)
        print(f"measured {a}: {rows[a]}", file=sys.stderr, flush=True)  # partial results survive an interrupt
    base = rows[args.artifacts[0]]
    ref = None
    if args.llama_cpp is not None:
        gguf = source_gguf() if args.llama_cpp == "cached" else Path(args.llama_cpp)
        art = load_artifact(args.artifacts[0])
        ids = art.tokenizer(args.text.read_text(), add_special_tokens=False)["input_ids"]
        ref = rows[f"llama.cpp {gguf.name}"] = measure_llama_cpp(gguf, ids, threads=args.threads,
                                                                  repeats=args.repeats, decode_steps=args.decode)
    print(f"{'system':40s} {'MB':>8s} {'ppl':>9s} {'ppl x':>7s} {'prefill512 s':>13s} {'x':>6s} "
          f"{'decode tok/s':>13s}" + ("  | vs llama.cpp: MB x, ppl x, prefill x, decode x" if ref else ""))
    for a, r in rows.items():
        dec = r.get("decode_tok_s", float("nan"))
        line = (f"{a:40s} {r['bytes'] / 1e6:8.1f} {r['ppl']:9.4f} {r['ppl'] / base['ppl']:7.4f} "
                f"{r['prefill_s']:13.3f} {r['prefill_s'] / base['prefill_s']:6.2f} {dec:13.1f}")
        if ref is not None:
            line += (f"  | {r['bytes'] / ref['bytes']:5.2f} {r['ppl'] / ref['ppl']:7.4f} "
                     f"{r['prefill_s'] / ref['prefill_s']:6.2f} {dec / ref.get('decode_tok_s', float('nan')):6.2f}")
        print(line)
    return 0


def source_gguf() -> Path:
    """The GGUF file ``qir import smollm2-135m`` reads (``qir.models``' cache; fetched there if missing)."""
    from qir.models.zoo import model_files, resolve_model

    spec = resolve_model("smollm2-135m")
    assert spec is not None and spec.gguf_file is not None
    return model_files("smollm2-135m") / spec.gguf_file


if __name__ == "__main__":
    raise SystemExit(main())
