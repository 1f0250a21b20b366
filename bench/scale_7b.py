"""Scale: a synthetic LLaMA-shaped 7B model through save, dump, verify, load and weight-only quantization.

The model is LLaMA-2-7B's shape (32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32000, untied head:
6.74 B parameters, 13.5 GB in bf16). Its weights are generated one tensor at a time while ``qir.save``
writes them (seeded normal values, never all in memory), into ``OUT/llama7b.qir`` + ``.safetensors``.
Then each step runs as its own process, whose peak resident set size (``ru_maxrss`` from ``wait4``) and
wall time are printed:

    build      generate and save the model (this script, ``--build-only``)
    dump       ``qir dump --summary``
    verify     ``qir verify``
    load       ``qir.load`` (weights memory-mapped) + ``qir.verify`` (reads the small constants only)
    quantize   ``qir quantize -p quantize{scheme=w8a16}`` (or ``--pipeline``): reads every weight, writes the
               codes and f32 scales

    python bench/scale_7b.py --out /tmp/scale            # 7B; needs ~21 GB of disk, deletes it at the end
    python bench/scale_7b.py --out /tmp/scale --layers 2 --hidden 1024 --ffn 2816 --vocab 8000 --heads 8

Prints one line per step with seconds per billion parameters. ``--keep`` keeps the model files (and
``--reuse`` then skips the build). The numbers are for the machine it runs on (disk speed matters: the
model is written and read once per step that touches data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qir.graph import Module
from qir.types import TensorType


@dataclass(frozen=True)
class Shape:
    """A LLaMA-style decoder's sizes."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    vocab: int = 32000


class Generated:
    """A weight whose bf16 values are generated (seeded by its name) when ``numpy()`` is called, never kept."""

    def __init__(self, name: str, shape: tuple[int, ...], std: float) -> None:
        self.name = name
        self.shape = shape
        self.std = std
        import ml_dtypes

        self.dtype = np.dtype(ml_dtypes.bfloat16)

    def numpy(self) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        out = np.empty(self.shape, dtype=self.dtype)
        flat = out.reshape(-1)
        step = 1 << 22
        for i in range(0, flat.size, step):  # f32 scratch of one block, not of the whole tensor
            n = min(step, flat.size - i)
            flat[i:i + n] = (rng.standard_normal(n, dtype=np.float32) * np.float32(self.std)).astype(self.dtype)
        return out


def build(s: Shape) -> Module:
    """The float (bf16) model with generated weights: embedding, per layer RMSNorm, attention, SwiGLU MLP."""
    m = Module("llama-7b-synthetic")
    hd = s.hidden // s.heads

    def weight(name: str, *shape: int, std: float = 0.02) -> object:
        return m.add_constant(name, Generated(name, shape, std), type=TensorType.of("bf16", list(shape)))

    def ones(name: str, n: int) -> object:
        return m.add_constant(name, Generated(name, (n,), 0.0), type=TensorType.of("bf16", [n]))

    embed = weight("model.embed_tokens.weight", s.vocab, s.hidden)
    f = m.add_function("prefill")
    ids = f.add_input("tokens", TensorType.of("i64", [1, "seq"]))
    h = f.add_op("embedding", [embed, ids], names=["h"]).result
    for i in range(s.layers):
        p = f"model.layers.{i}"
        x = f.add_op("rms_norm", [h, ones(f"{p}.input_layernorm.weight", s.hidden)], names=[f"{p}.x"]).result
        q = f.add_op("linear", [x, weight(f"{p}.self_attn.q_proj.weight", s.heads * hd, s.hidden)],
                     names=[f"{p}.q"]).result
        k = f.add_op("linear", [x, weight(f"{p}.self_attn.k_proj.weight", s.kv_heads * hd, s.hidden)],
                     names=[f"{p}.k"]).result
        v = f.add_op("linear", [x, weight(f"{p}.self_attn.v_proj.weight", s.kv_heads * hd, s.hidden)],
                     names=[f"{p}.v"]).result

        def heads(t: object, n: int, name: str) -> object:
            t = f.add_op("reshape", [t], {"shape": [1, "seq", n, hd]}, names=[f"{name}.split"]).result
            return f.add_op("transpose", [t], {"perm": [0, 2, 1, 3]}, names=[f"{name}.heads"]).result

        a = f.add_op("attention", [heads(q, s.heads, f"{p}.q"), heads(k, s.kv_heads, f"{p}.k"),
                                   heads(v, s.kv_heads, f"{p}.v")], {"causal": True}, names=[f"{p}.attn"]).result
        a = f.add_op("transpose", [a], {"perm": [0, 2, 1, 3]}, names=[f"{p}.attn.merge"]).result
        a = f.add_op("reshape", [a], {"shape": [1, "seq", s.hidden]}, names=[f"{p}.attn.flat"]).result
        o = f.add_op("linear", [a, weight(f"{p}.self_attn.o_proj.weight", s.hidden, s.heads * hd)],
                     names=[f"{p}.o"]).result
        h = f.add_op("add", [h, o], names=[f"{p}.h1"]).result
        y = f.add_op("rms_norm", [h, ones(f"{p}.post_attention_layernorm.weight", s.hidden)], names=[f"{p}.y"]).result
        g = f.add_op("linear", [y, weight(f"{p}.mlp.gate_proj.weight", s.ffn, s.hidden)], names=[f"{p}.gate"]).result
        u = f.add_op("linear", [y, weight(f"{p}.mlp.up_proj.weight", s.ffn, s.hidden)], names=[f"{p}.up"]).result
        g = f.add_op("silu", [g], names=[f"{p}.act"]).result
        gu = f.add_op("mul", [g, u], names=[f"{p}.gu"]).result
        d = f.add_op("linear", [gu, weight(f"{p}.mlp.down_proj.weight", s.hidden, s.ffn)], names=[f"{p}.down"]).result
        h = f.add_op("add", [h, d], names=[f"{p}.h2"]).result
    h = f.add_op("rms_norm", [h, ones("model.norm.weight", s.hidden)], names=["final"]).result
    logits = f.add_op("linear", [h, weight("lm_head.weight", s.vocab, s.hidden)], names=["logits"]).result
    f.set_outputs([logits])
    return m


def parameters(m: Module) -> int:
    return sum(c.type.numel() for c in m.constants.values())


@dataclass(frozen=True)
class Step:
    """One measured child process."""

    name: str
    seconds: float
    peak_rss_mb: float
    returncode: int


def measure(name: str, argv: list[str]) -> Step:
    """Run ``argv`` as a child process; its wall time and peak RSS (``wait4``'s ``ru_maxrss``, KiB on Linux)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stdout.write(output.decode(errors="replace")[-3000:])
    return Step(name, seconds, usage.ru_maxrss / 1024, proc.returncode)


def steps(out: Path, s: Shape, pipeline: str) -> list[tuple[str, list[str]]]:
    py = sys.executable
    model = out / "llama7b.qir"
    shape_args = [f"--{k.replace('_', '-')}={v}" for k, v in s.__dict__.items()]
    load_verify = ("import sys, qir; m = qir.load(sys.argv[1]); qir.verify(m); "
                   "print(sum(c.type.numel() for c in m.constants.values()))")
    return [
        ("build", [py, __file__, "--build-only", "--out", str(out), *shape_args]),
        ("dump", [py, "-m", "qir", "dump", "--summary", str(model)]),
        ("verify", [py, "-m", "qir", "verify", str(model)]),
        ("load", [py, "-c", load_verify, str(model)]),
        ("quantize", [py, "-m", "qir", "quantize", str(model), "-p", pipeline, "-o", str(out / "llama7b-q.qir")]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the model files (created; emptied at the end)")
    for field, default in Shape().__dict__.items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the model files")
    ap.add_argument("--pipeline", default="quantize{scheme=w8a16}", help="the quantize step's pipeline")
    ap.add_argument("--reuse", action="store_true", help="skip the build when OUT holds a model (from --keep)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    s = Shape(**{k: getattr(args, k) for k in Shape().__dict__})
    out = Path(args.out)
    if args.build_only:
        import qir

        m = build(s)
        qir.save(m, out / "llama7b.qir")
        return
    out.mkdir(parents=True, exist_ok=True)
    params = parameters(build(s))
    free = shutil.disk_usage(out).free
    need = params * 2 + params + params // 64  # bf16 model + i8 codes + scales
    print(f"{s}\nparameters: {params / 1e9:.3f} B; disk needed ~{need / 1e9:.1f} GB, free {free / 1e9:.1f} GB")
    if need > free:
        sys.exit("not enough disk space")
    results: list[Step] = []
    sizes: dict[str, int] = {}
    try:
        for name, argv in steps(out, s, args.pipeline):
            if name == "build" and args.reuse and (out / "llama7b.qir").is_file():
                print("build      skipped (--reuse)")
                continue
            step = measure(name, argv)
            results.append(step)
            print(f"{name:10s} {step.seconds:8.1f} s   peak RSS {step.peak_rss_mb:8.0f} MB   "
                  f"{step.seconds / (params / 1e9):7.1f} s per B params   rc {step.returncode}", flush=True)
            if step.returncode != 0:
                break
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        print("files:", ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for suffix in (".qir", ".safetensors", ".json"):  # a kept model is reused; the result is not
                (out / f"llama7b-q{suffix}").unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": s.__dict__, "parameters": params, "files": sizes,
                                               "steps": [r.__dict__ for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
