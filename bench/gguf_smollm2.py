"""SmolLM2-135M kept in its GGUF quantization, against the dequantized float import, on ONNX Runtime (``ort-cpu``).

Needs artifact folders made by ``qir compile`` (one per system to compare), e.g.::

    qir import smollm2-135m -o /tmp/gguf/float.qir
    qir compile smollm2-135m --target ort-cpu --preset keep -o /tmp/gguf/ort-keep       # the file's own blocks
    qir compile /tmp/gguf/float.qir --target ort-cpu --preset float -o /tmp/gguf/ort-float
    python bench/gguf_smollm2.py /tmp/gguf/ort-float /tmp/gguf/ort-keep --threads 2

For each artifact, in one run: its bytes (``report.json``), perplexity on a license text (``qir.evaluate``'s
definition: 512-token windows, at most 8), prefill time of one 512-token window (median of ``--repeats``), and decode
tokens/s (``--decode`` greedy steps after a 128-token prefill, static KV cache). Ratios are to the first artifact.
Perplexity of the reference interpreter on the ``.qir`` files is ``qir eval X.qir --json`` (slow; not repeated here).

Measured 2026-11-23 on 2 cores shared with ~6 other jobs (load average ~19: times are noise-dominated; only the
ratio of one run means anything)::

    artifact                    MB       ppl   ppl x  prefill512 s      x  decode tok/s
    /tmp/gguf/ort-float     1076.8   12.7798  1.0000        13.408   1.00           1.5
    /tmp/gguf/ort-keep       214.3   12.7798  1.0000        10.439   0.78           2.1
"""

from __future__ import annotations

import argparse
import statistics
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
    rows = {a: measure(a, threads=args.threads, repeats=args.repeats, decode_steps=args.decode, text=args.text)
            for a in args.artifacts}
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
