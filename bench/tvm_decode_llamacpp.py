"""llama.cpp's SmolLM2-135M decode speed at Q8_0 / Q4_0 / Q4_1: the reference for qir's tvm-llvm decode numbers.

Bench-only dependency (not in pyproject): ``llama-cpp-python``, which builds llama.cpp from source from PyPI
(``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``, 5-15 min on 2 cores).

The source model is the cached GGUF of ``qir.models`` (``~/.cache/qir/smollm2-135m/*.Q4_1.gguf``); Q8_0 and
Q4_0 files are made from it with llama.cpp's own quantizer (``llama_model_quantize``, requantizing: the weights
are the Q4_1 ones re-encoded, which changes accuracy, not speed). Decode: context 512, 2 threads; a 64-token
prompt is evaluated, then ``--tokens`` single-token steps are timed (llama.cpp's work per step does not depend on
the token id; it grows with the position, so the steps cover positions 64..64+tokens).

    nice -n 10 python bench/tvm_decode_llamacpp.py [--tokens 128] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

THREADS = 2
N_CTX = 512
PROMPT = 64
# llama_ftype values (llama.h): MOSTLY_Q4_0 = 2, MOSTLY_Q4_1 = 3, MOSTLY_Q8_0 = 7.
FTYPES = {"Q8_0": 7, "Q4_0": 2}


def source_gguf() -> Path:
    found = sorted((Path.home() / ".cache" / "qir" / "smollm2-135m").glob("*.gguf"))
    if not found:
        raise SystemExit("no SmolLM2 GGUF in ~/.cache/qir/smollm2-135m: run `qir import smollm2-135m` once")
    return found[0]


def quantized(src: Path, name: str, out_dir: Path) -> Path:
    """``src`` re-quantized by llama.cpp to ``name`` (cached next to the other bench outputs)."""
    import llama_cpp

    out = out_dir / f"{src.stem.split('.')[0]}.{name}.gguf"
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[name]
    params.nthread = THREADS
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {name} failed with {rc}")
    return out


def decode_tokens_per_s(path: Path, tokens: int, threads: int = THREADS) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8)[:PROMPT]
    tok = prompt[-1]
    best = None
    for _ in range(2):  # the first pass warms caches and the allocator; report the faster of the two
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(tokens):
            llm.eval([tok])
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return {"file": path.name, "size_mb": path.stat().st_size / 1e6, "tokens_per_s": tokens / best,
            "ms_per_token": best / tokens * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qir-bench-llamacpp"))
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="decode threads (default 2; 1 is steadier on a loaded shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if PROMPT + args.tokens > N_CTX:  # reset() between passes: one pass must fit the context
        raise SystemExit(f"--tokens must be <= {N_CTX - PROMPT}")
    args.out.mkdir(parents=True, exist_ok=True)
    src = source_gguf()
    rows = {"Q4_1 (source)": decode_tokens_per_s(src, args.tokens, args.threads)}
    for name in FTYPES:
        rows[name] = decode_tokens_per_s(quantized(src, name, args.out), args.tokens, args.threads)
    if args.json:
        print(json.dumps({"threads": args.threads, "n_ctx": N_CTX, "rows": rows}, indent=1))
        return
    print(f"llama.cpp SmolLM2-135M decode, {args.threads} threads, n_ctx {N_CTX}, {args.tokens} steps after a "
          f"{PROMPT}-token prompt")
    for name, r in rows.items():
        print(f"{name:>14}: {r['tokens_per_s']:7.1f} tok/s  {r['ms_per_token']:6.2f} ms/token  {r['size_mb']:6.1f} MB")


if __name__ == "__main__":
    main()
