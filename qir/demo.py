"""The demo behind ``qir demo``: the IR core end to end on a small transformer block.

It builds a float LLaMA-style block (embedding, RMSNorm, grouped-query causal
attention, SiLU-gated MLP, tied output head) with a symbolic sequence length,
then two quantized versions written by hand with :mod:`qir.quant` (the pass
pipeline arrives with its own issue):

* ``w4``: int4 weights in groups of 32 (weight-only, ``qmatmul`` on float inputs)
  and an int8 per-row embedding table (``qembedding``);
* ``w8a8``: int8 per-row weights and int8 activations quantized per token at run
  time, so the matmuls accumulate in int32.

Each module is verified, saved as ``.qir`` + ``.safetensors``, loaded back
lazily, and run by the reference interpreter; the report compares logits with
the float module and stored bytes. The source document's worked example
(seeds/002) is printed first.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qir import quant
from qir.graph import Constant, Module, Value
from qir.quantspec import QuantSpec
from qir.types import TensorType

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 512, 128, 4, 2, 352
HEAD_DIM = HIDDEN // HEADS
LINEARS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights with a few large input channels, as real LLM weights have."""
    rng = np.random.default_rng(seed)
    kv = KV_HEADS * HEAD_DIM
    shapes = {"wq": (HIDDEN, HIDDEN), "wk": (kv, HIDDEN), "wv": (kv, HIDDEN), "wo": (HIDDEN, HIDDEN),
              "gate": (FFN, HIDDEN), "up": (FFN, HIDDEN), "down": (HIDDEN, FFN)}
    w: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        a[:, rng.choice(shape[1], 3, replace=False)] *= 4.0
        w[name] = a
    w["embed"] = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    w["norm1"] = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    w["norm2"] = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    return w


def build(weights: dict[str, np.ndarray], scheme: str = "f32") -> Module:
    """The block as a qir module; ``scheme`` is ``f32``, ``w4`` or ``w8a8``."""
    m = Module(f"tiny-{scheme}")
    consts: dict[str, Constant] = {}
    if scheme == "f32":
        consts["embed"] = m.add_constant("embed", weights["embed"])
    else:
        spec, s, _ = quant.choose_params(weights["embed"], "i8", axis=0, scale_name="embed.scale")
        codes = quant.quantize_spec(weights["embed"], spec, "i8", s).codes
        m.add_constant("embed.scale", s)
        consts["embed"] = m.add_constant("embed", codes, type=TensorType.of("i8", codes.shape, spec))
    m.add_constant("norm1", weights["norm1"])
    m.add_constant("norm2", weights["norm2"])
    for name in LINEARS:
        w = weights[name]
        if scheme == "f32":
            consts[name] = m.add_constant(name, w)
            continue
        bits, kw = ("i4", {"axis": 1, "group_size": 32}) if scheme == "w4" else ("i8", {"axis": 0})
        spec, s, _ = quant.choose_params(w, bits, scale_name=f"{name}.scale", **kw)
        codes = quant.quantize_spec(w, spec, bits, s).codes
        m.add_constant(f"{name}.scale", s)
        consts[name] = m.add_constant(name, codes, type=TensorType.of(bits, codes.shape, spec))

    f = m.add_function("main")
    ids = f.add_input("tokens", TensorType.of("i64", [1, "seq"]))

    def op(opcode: str, operands: list[Value], attrs: dict | None = None, name: str | None = None,
           result_type: TensorType | None = None) -> Value:
        rt = None if result_type is None else [result_type]
        return f.add_op(opcode, operands, attrs or {}, result_types=rt, names=[name or opcode]).result

    def matmul(x: Value, wname: str, name: str) -> Value:
        w = consts[wname]
        if scheme == "f32":
            return op("linear", [x, w], name=name)
        if scheme == "w8a8":
            spec = QuantSpec.dynamic_spec(axis=2, group_size=HIDDEN if wname != "down" else FFN)
            xt = TensorType.of("i8", x.type.shape, spec)
            x = op("quantize", [x], name=f"{name}.xq", result_type=xt)
        return op("qmatmul", [x, w], name=name)

    if scheme == "f32":
        h = op("embedding", [consts["embed"], ids], name="h0")
    else:
        h = op("qembedding", [consts["embed"], ids], name="h0")
    x = op("rms_norm", [h, m.constants["norm1"]], {"eps": 1e-5}, name="attn_in")
    q = matmul(x, "wq", "q")
    k = matmul(x, "wk", "k")
    v = matmul(x, "wv", "v")

    def heads(t: Value, n: int, name: str) -> Value:
        t = op("reshape", [t], {"shape": [1, "seq", n, HEAD_DIM]}, name=f"{name}.split")
        return op("transpose", [t], {"perm": [0, 2, 1, 3]}, name=f"{name}.heads")

    a = op("attention", [heads(q, HEADS, "q"), heads(k, KV_HEADS, "k"), heads(v, KV_HEADS, "v")],
           {"causal": True}, name="attn")
    a = op("transpose", [a], {"perm": [0, 2, 1, 3]}, name="attn.merge")
    a = op("reshape", [a], {"shape": [1, "seq", HIDDEN]}, name="attn.flat")
    h = op("add", [h, matmul(a, "wo", "attn_out")], name="h1")
    x = op("rms_norm", [h, m.constants["norm2"]], {"eps": 1e-5}, name="mlp_in")
    g = op("silu", [matmul(x, "gate", "gate")], name="gate.act")
    u = op("mul", [g, matmul(x, "up", "up")], name="mlp_hidden")
    h = op("add", [h, matmul(u, "down", "mlp_out")], name="h2")
    # Tied head: logits = h @ embed.T, reusing the (quantized) embedding table.
    logits = op("linear", [h, consts["embed"]], name="logits") if scheme == "f32" else \
        op("qmatmul", [h, consts["embed"]], name="logits")
    f.set_outputs([logits])
    return m


def run_demo(out_dir: Path, quiet: bool = False) -> int:
    """Build, verify, save, reload and run the three modules; print the report. Returns an exit code."""
    from qir.interpreter import run
    from qir.printer import print_module
    from qir.serialize import load, save, stored_bytes
    from qir.verifier import verify

    def say(text: str = "") -> None:
        if not quiet:
            print(text)

    say("qir demo — the IR core end to end")
    say("\n1. The source document's worked example (seeds/002), qir convention q = rint(x/S) + zp:")
    x = np.array([[1.2, 2.4, 3.6], [11.2, 12.4, 13.6]], dtype=np.float32)
    q = quant.quantize(x, 0.0486, -152, "i8")
    s, zp = quant.params_from_range(1.2, 13.6, "i8", symmetric=False)
    say(f"   S from the range [1.2, 13.6]: {float(s):.5f} (zero point {int(zp)}; the slide truncates to -152)")
    say(f"   X_q with S=0.0486, zp=-152: {q.tolist()}")
    deq = quant.dequantize(q, 0.0486, -152)
    say(f"   dequantized: {np.array2string(deq, precision=2, separator=', ').replace(chr(10), '')}"
        "  (13.6 clips to 127)")

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = make_weights()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, size=(1, 48)).astype(np.int64)
    say(f"\n2. A LLaMA-style block (hidden {HIDDEN}, {HEADS} heads / {KV_HEADS} KV heads, vocab {VOCAB}), "
        "symbolic sequence length, run on 48 tokens:")
    results: dict[str, np.ndarray] = {}
    rows = []
    for scheme in ("f32", "w4", "w8a8"):
        module = build(weights, scheme)
        verify(module)
        path = out_dir / f"tiny-{scheme}.qir"
        save(module, path)
        loaded = load(path)
        verify(loaded)
        assert print_module(loaded) == print_module(module), "text round trip changed the module"
        t0 = time.perf_counter()
        (logits,) = run(loaded, [tokens])
        ms = (time.perf_counter() - t0) * 1e3
        results[scheme] = np.asarray(logits, dtype=np.float32)
        rows.append((scheme, stored_bytes(loaded), ms, path))
    ref = results["f32"]
    say(f"   {'scheme':6s} {'bytes':>9s} {'x f32':>6s} {'logit cos':>10s} {'top-1 agree':>11s} {'run ms':>7s}  file")
    for scheme, nbytes, ms, path in rows:
        got = results[scheme]
        cos = float(np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
        agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        say(f"   {scheme:6s} {nbytes:9,d} {nbytes / rows[0][1]:6.3f} {cos:10.5f} {agree:11.3f} {ms:7.1f}  {path}")
    say("\n3. The int4 module's text (first lines); `qir dump`, `qir diff` and `qir verify` work on these files:")
    text = print_module(load(out_dir / "tiny-w4.qir"))
    for line in text.splitlines()[:14]:
        say("   " + line)
    say(f"   ... ({len(text.splitlines())} lines)")
    say(f"\n   try: qir diff {out_dir / 'tiny-f32.qir'} {out_dir / 'tiny-w4.qir'}")
    return 0
