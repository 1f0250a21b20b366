"""SmolLM2-135M decode tokens/s: qir ``tvm-llvm`` (w8a16, w8a8, w4a16, w4a8) vs llama.cpp (Q8_0, Q4_0, Q4_1), ONE run.

Why a child process per system: llama.cpp's thread pool spin-waits at every op barrier, and inside a process that
also holds ONNX Runtime's or TVM's thread pools it collapses (session 3: 2.5 tok/s instead of 130). So every system
here runs in its own fresh interpreter (``multiprocessing`` spawn), one after the other, nothing else loaded: the
same 2 threads, the same position. Each child: a 512-token prompt (prefill, not timed), then ``--tokens`` single-
token decode steps at positions 512.. (context 512), timed; the best of ``--passes`` such runs is reported.

* qir: ``smollm2-135m`` imported, quantized by the ``qir compile`` preset, compiled for ``tvm-llvm`` (the scheduled
  kernels; compile time reported), loaded with ``load_artifact(threads=2)``; the KV caches stay on the device and are
  updated in place (``run_device``), the next token is the argmax of the logits, as ``qir run`` decodes.
* llama.cpp (``llama-cpp-python``, bench-only dependency): the cached GGUF (Q4_1, the file ``qir import`` uses) and
  Q8_0 / Q4_0 files requantized from it by llama.cpp's own quantizer (``bench/tvm_decode_llamacpp.py``).

Pairs at equal bits per weight: w8a16 and w8a8 vs Q8_0; w4a16 and w4a8 (groups of 32, float minimum, 8-bit scales:
4.5 bits per weight as Q4_0, half a bit under Q4_1) vs Q4_0/Q4_1. llama.cpp's Q4_0/Q4_1 dot products quantize the
activations to 8 bits (Q8_0/Q8_1 blocks of 32), so w4a8 is the like-for-like numerics; w4a16 keeps them float.

    nice -n 10 python bench/decode_vs_llamacpp.py [--tokens 64] [--passes 2] [--rounds 1] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from timing import in_child  # bench/: this script's folder

PROMPT = 512
HERE = Path(__file__).resolve().parent


def _qir_child(preset: str, work: str, threads: int, tokens: int, passes: int) -> dict[str, Any]:
    os.environ["TVM_NUM_THREADS"] = str(threads)  # before tvm is imported in this fresh process
    import numpy as np
    import tvm

    from qir.backends.compile import load_artifact
    from qir.backends.target import load_target
    from qir.backends.tvm.compile import compile_tvm
    from qir.frontend.importer import import_model
    from qir.passes import PassManager, parse_pipeline
    from qir.tools.compile_cli import PRESETS

    folder = Path(work) / preset
    compile_s = None
    if not (folder / "report.json").exists():  # a later round reuses the artifact of the first
        module = import_model("smollm2-135m").module
        if PRESETS[preset]:
            module = PassManager(parse_pipeline(PRESETS[preset])).run(module)
        t0 = time.perf_counter()
        compile_tvm(module, load_target("tvm-llvm"), folder,
                    meta={"source": "smollm2-135m", "kind": "causal-lm", "pipeline": PRESETS[preset]})
        compile_s = time.perf_counter() - t0
    art = load_artifact(folder, threads=threads)
    prompt = np.random.default_rng(0).integers(0, 49152, (1, PROMPT)).astype(np.int64)
    info = art.report["functions"]["decode"]
    best = None
    for _ in range(passes):
        outs = art.run_device([prompt], function="prefill")
        caches = []
        for name, c in zip(info["inputs"][2:], outs[1:]):
            full = np.zeros(info["input_types"][name]["shape"], np.float32)
            full[:, :, :PROMPT] = c.numpy()
            caches.append(tvm.runtime.tensor(full))
        token = np.asarray([[int(np.argmax(outs[0].numpy()[0, -1]))]], np.int64)
        t = time.perf_counter()
        for i in range(tokens):
            out = art.run_device([token, np.asarray([PROMPT + i], np.int64), *caches], function="decode")
            token = np.asarray([[int(np.argmax(out[0].numpy()[0, -1]))]], np.int64)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return {"system": f"qir tvm-llvm {preset}", "tok_s": tokens / best, "mb": art.report["params_bytes"] / 1e6,
            "compile_s": compile_s}


def _llama_child(path: str, threads: int, tokens: int, passes: int) -> dict[str, Any]:
    from llama_cpp import Llama

    # n_ctx covers the prompt and the timed steps; the steps run at the same positions as qir's.
    llm = Llama(model_path=path, n_ctx=PROMPT + tokens + 64, n_batch=PROMPT, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    import numpy as np

    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 49152, PROMPT)]
    best = None
    for _ in range(passes):
        llm.reset()
        llm.eval(prompt)
        tok = prompt[-1]
        t = time.perf_counter()
        for _ in range(tokens):
            llm.eval([tok])
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    name = Path(path).name.split(".")[-2]
    return {"system": f"llama.cpp {name}", "tok_s": tokens / best, "mb": Path(path).stat().st_size / 1e6}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps (positions 512..)")
    ap.add_argument("--passes", type=int, default=2, help="runs per system and round; the best is reported")
    ap.add_argument("--rounds", type=int, default=1, help="times the whole sequence of systems runs, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default="w8a16,w8a8,w4a16,w4a8")
    ap.add_argument("--quants", default="Q8_0,Q4_0,Q4_1", help="llama.cpp files (Q4_1: the cached source GGUF)")
    ap.add_argument("--work", type=Path, default=None, help="where the qir artifacts go (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import tvm_decode_llamacpp as lc  # the GGUF files: source and llama.cpp requantizations

    src = lc.source_gguf()
    out = Path("/tmp/qir-bench-llamacpp")
    out.mkdir(parents=True, exist_ok=True)
    files = {q: src if src.name.endswith(f".{q}.gguf") else None for q in args.quants.split(",")}
    best: dict[str, dict[str, Any]] = {}  # system -> its best row over the rounds

    def keep(row: dict[str, Any]) -> None:
        print(f"  {row['system']:24s} {row['tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)
        old = best.get(row["system"])
        if old is None or row["tok_s"] > old["tok_s"]:
            if old is not None and old.get("compile_s") is not None:
                row["compile_s"] = old["compile_s"]
            best[row["system"]] = row

    paths = {q: files[q] or in_child(_quantize_child, str(src), q, str(out)) for q in files}
    with tempfile.TemporaryDirectory() as tmp:
        work = str(args.work or tmp)
        # Rounds interleave the systems, so a slow spell of a shared machine hits each of them alike.
        for _ in range(args.rounds):
            for q in files:
                keep(in_child(_llama_child, str(paths[q]), args.threads, args.tokens, args.passes))
            for preset in args.presets.split(","):
                keep(in_child(_qir_child, preset, work, args.threads, args.tokens, args.passes))
    rows = list(best.values())
    ref = {r["system"].split()[-1]: r["tok_s"] for r in rows if r["system"].startswith("llama.cpp")}
    pairs = {"w8a16": ["Q8_0"], "w8a8": ["Q8_0"], "w4a16": ["Q4_1", "Q4_0"], "w4a8": ["Q4_1", "Q4_0"]}
    for r in rows:
        peers = [p for p in pairs.get(r["system"].split()[-1], []) if p in ref]
        if peers:
            r["vs"] = ", ".join(f"{p} {r['tok_s'] / ref[p]:.2f}x" for p in peers)
    if args.json:
        print(json.dumps({"threads": args.threads, "prompt": PROMPT, "tokens": args.tokens, "rounds": args.rounds,
                          "rows": rows}, indent=1))
        return
    print(f"SmolLM2-135M decode, {args.threads} threads, {args.tokens} steps after a {PROMPT}-token prompt, "
          f"best of {args.passes} x {args.rounds} round(s), each system in its own process")
    print(f"{'system':26s} {'tok/s':>7s} {'MB':>7s}  vs llama.cpp at equal bits")
    for r in rows:
        print(f"{r['system']:26s} {r['tok_s']:7.1f} {r['mb']:7.1f}  {r.get('vs', '')}")


def _quantize_child(src: str, q: str, out: str) -> str:
    sys.path.insert(0, str(HERE))
    import tvm_decode_llamacpp as lc

    return str(lc.quantized(Path(src), q, Path(out)))


if __name__ == "__main__":
    main()
