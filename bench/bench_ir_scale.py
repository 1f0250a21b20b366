"""How the IR core scales: build, print, parse, verify and save/load a SmolLM2-shaped module.

Builds a LLaMA-shaped module (SmolLM2-135M's sizes by default: 30 layers, hidden
576, 9 heads / 3 KV heads, FFN 1536, vocab 49152) with int4 per-group weights
whose data is never materialized in full, and times each core operation. Prints
one line per step with seconds and, for the text, bytes and lines.

    python bench/bench_ir_scale.py                 # SmolLM2-135M shape
    python bench/bench_ir_scale.py --layers 80 --hidden 8192 --ffn 28672 --vocab 128256  # 70B shape, types only
"""

from __future__ import annotations

import argparse
import resource
import time

from qir.graph import Module
from qir.quantspec import QuantSpec
from qir.types import TensorType


def build(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, group: int) -> Module:
    """The module with typed constants and no weight data (printing and verifying never need it)."""
    m = Module("llama-shape")
    head_dim = hidden // heads

    def weight(name: str, out: int, inp: int):
        spec = QuantSpec.per_group(1, group, f"{name}.scale")
        m.add_constant(f"{name}.scale", None, type=TensorType.of("f16", [out, -(-inp // group)]))
        return m.add_constant(name, None, type=TensorType.of("i4", [out, inp], spec))

    embed = m.add_constant("embed", None, type=TensorType.of("f32", [vocab, hidden]))
    f = m.add_function("prefill")
    ids = f.add_input("tokens", TensorType.of("i64", [1, "seq"]))
    h = f.add_op("embedding", [embed, ids], names=["h"]).result
    for i in range(layers):
        p = f"layers.{i}"
        nw = m.add_constant(f"{p}.norm1", None, type=TensorType.of("f32", [hidden]))
        x = f.add_op("rms_norm", [h, nw], names=[f"{p}.x"]).result
        q = f.add_op("qmatmul", [x, weight(f"{p}.wq", hidden, hidden)], names=[f"{p}.q"]).result
        k = f.add_op("qmatmul", [x, weight(f"{p}.wk", kv_heads * head_dim, hidden)], names=[f"{p}.k"]).result
        v = f.add_op("qmatmul", [x, weight(f"{p}.wv", kv_heads * head_dim, hidden)], names=[f"{p}.v"]).result

        def split(t, n, name):
            t = f.add_op("reshape", [t], {"shape": [1, "seq", n, head_dim]}, names=[f"{name}.split"]).result
            return f.add_op("transpose", [t], {"perm": [0, 2, 1, 3]}, names=[f"{name}.heads"]).result

        a = f.add_op("attention", [split(q, heads, f"{p}.q"), split(k, kv_heads, f"{p}.k"),
                                   split(v, kv_heads, f"{p}.v")], {"causal": True}, names=[f"{p}.attn"]).result
        a = f.add_op("transpose", [a], {"perm": [0, 2, 1, 3]}, names=[f"{p}.attn.merge"]).result
        a = f.add_op("reshape", [a], {"shape": [1, "seq", hidden]}, names=[f"{p}.attn.flat"]).result
        o = f.add_op("qmatmul", [a, weight(f"{p}.wo", hidden, hidden)], names=[f"{p}.o"]).result
        h = f.add_op("add", [h, o], names=[f"{p}.h1"]).result
        nw2 = m.add_constant(f"{p}.norm2", None, type=TensorType.of("f32", [hidden]))
        x = f.add_op("rms_norm", [h, nw2], names=[f"{p}.y"]).result
        g = f.add_op("qmatmul", [x, weight(f"{p}.gate", ffn, hidden)], names=[f"{p}.gate"]).result
        u = f.add_op("qmatmul", [x, weight(f"{p}.up", ffn, hidden)], names=[f"{p}.up"]).result
        g = f.add_op("silu", [g], names=[f"{p}.act"]).result
        gu = f.add_op("mul", [g, u], names=[f"{p}.gu"]).result
        d = f.add_op("qmatmul", [gu, weight(f"{p}.down", hidden, ffn)], names=[f"{p}.down"]).result
        h = f.add_op("add", [h, d], names=[f"{p}.h2"]).result
    logits = f.add_op("linear", [h, embed], names=["logits"]).result
    f.set_outputs([logits])
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--group", type=int, default=32)
    args = ap.parse_args()

    from qir.parser import parse
    from qir.printer import print_module
    from qir.verifier import verify

    def step(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        print(f"{name:28s} {time.perf_counter() - t0:8.3f} s")
        return out

    m = step("build (types only)", lambda: build(args.layers, args.hidden, args.heads, args.kv_heads, args.ffn,
                                                 args.vocab, args.group))
    params = sum(c.type.numel() for c in m.constants.values())
    print(f"{'parameters':28s} {params / 1e9:8.3f} B   ops: {len(m.main.ops)}   constants: {len(m.constants)}")
    step("verify", lambda: verify(m))
    text = step("print", lambda: print_module(m))
    print(f"{'text':28s} {len(text) / 1e6:8.3f} MB   {text.count(chr(10))} lines")
    m2 = step("parse", lambda: parse(text))
    assert step("print again", lambda: print_module(m2)) == text
    step("verify parsed", lambda: verify(m2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak RSS':28s} {rss:8.1f} MB")


if __name__ == "__main__":
    main()
