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
from qir.evaluate import evaluate_artifact, window_ids

TEXT = Path("/usr/lib/python3.11/LICENSE.txt")


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
        out["decode_tok_s"] = decode_rate(art, window[:, :128], decode_steps)
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
    args = ap.parse_args(argv)
    rows = {a: measure(a, threads=args.threads, repeats=args.repeats, decode_steps=args.decode, text=args.text)
            for a in args.artifacts}
    base = rows[args.artifacts[0]]
    print(f"{'artifact':40s} {'MB':>8s} {'ppl':>9s} {'ppl x':>7s} {'prefill512 s':>13s} {'x':>6s} "
          f"{'decode tok/s':>13s}")
    for a, r in rows.items():
        dec = r.get("decode_tok_s", float("nan"))
        print(f"{a:40s} {r['bytes'] / 1e6:8.1f} {r['ppl']:9.4f} {r['ppl'] / base['ppl']:7.4f} "
              f"{r['prefill_s']:13.3f} {r['prefill_s'] / base['prefill_s']:6.2f} {dec:13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
