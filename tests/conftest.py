"""Shared test fixtures: small valid modules built with the graph API.

``block_module`` is a quantized transformer block with a symbolic sequence
length (embedding, RMSNorm, grouped-query causal attention, SiLU-gated MLP)
that touches every quantization granularity: int4 weights per group (one with
a double-quantized u8 scale), int8 per row, an asymmetric u4 weight with a zero
point constant, a per-tensor literal spec and per-token dynamic activations.
Each call builds a fresh module, so tests may mutate it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from qir import quant
from qir.graph import Constant, Module, Value
from qir.quantspec import QuantSpec
from qir.types import TensorType

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 32, 64, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS


def _quantized_weight(m: Module, name: str, w: np.ndarray, *, dt: str, axis: int, group: int | None,
                      symmetric: bool = True, double: bool = False) -> Constant:
    """Add ``w`` quantized (codes, scale and maybe zero point constants) and return the codes constant."""
    spec, scale, zp = quant.choose_params(w, dt, symmetric=symmetric, axis=axis, group_size=group,
                                          scale_name=f"{name}.scale", zero_point_name=f"{name}.zp")
    qt = quant.quantize_spec(w, spec, dt, scale, zp)
    if double:
        # 8-bit scales against one per-tensor float scale: the scale constant is itself quantized.
        sspec, sscale, szp = quant.choose_params(scale, "u8", symmetric=False)
        codes = quant.quantize(scale, sscale, szp, "u8")
        m.add_constant(f"{name}.scale", codes, type=TensorType.of("u8", scale.shape, sspec))
    else:
        m.add_constant(f"{name}.scale", scale.astype(np.float16 if group else np.float32))
    if zp is not None:
        m.add_constant(f"{name}.zp", zp.astype(np.int8 if dt.startswith("i") else np.uint8))
    return m.add_constant(name, qt.codes, type=TensorType.of(dt, w.shape, spec))


def build_block(seed: int = 0) -> Module:
    """A valid quantized transformer block (see the module docstring)."""
    rng = np.random.default_rng(seed)
    m = Module("block")
    kv = KV_HEADS * HEAD_DIM

    def weight(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    table = _quantized_weight(m, "embed", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), dt="i8",
                              axis=0, group=None)
    norm = m.add_constant("norm", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    wq = _quantized_weight(m, "wq", weight(HIDDEN, HIDDEN), dt="i4", axis=1, group=32, double=True)
    wk = _quantized_weight(m, "wk", weight(kv, HIDDEN), dt="i8", axis=0, group=None)
    wv = _quantized_weight(m, "wv", weight(kv, HIDDEN), dt="u4", axis=1, group=32, symmetric=False)
    wo = _quantized_weight(m, "wo", weight(HIDDEN, HIDDEN), dt="i4", axis=1, group=16)
    gate = _quantized_weight(m, "gate", weight(FFN, HIDDEN), dt="i8", axis=0, group=None)
    up = _quantized_weight(m, "up", weight(FFN, HIDDEN), dt="i8", axis=0, group=None)
    down = _quantized_weight(m, "down", weight(HIDDEN, FFN), dt="i8", axis=0, group=None)

    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))
    h = f.add_op("qembedding", [table, ids], names=["h"]).result
    x = f.add_op("rms_norm", [h, norm], {"eps": 1e-5}, names=["x"]).result

    def heads(v: Value, n: int, name: str) -> Value:
        r = f.add_op("reshape", [v], {"shape": [1, "seq", n, HEAD_DIM]}, names=[name + ".r"]).result
        return f.add_op("transpose", [r], {"perm": [0, 2, 1, 3]}, names=[name]).result

    q = heads(f.add_op("qmatmul", [x, wq], names=["q"]).result, HEADS, "qh")
    k = heads(f.add_op("qmatmul", [x, wk], names=["k"]).result, KV_HEADS, "kh")
    v = heads(f.add_op("qmatmul", [x, wv], names=["v"]).result, KV_HEADS, "vh")
    a = f.add_op("attention", [q, k, v], {"causal": True}, names=["attn"]).result
    a = f.add_op("transpose", [a], {"perm": [0, 2, 1, 3]}, names=["attn.t"]).result
    a = f.add_op("reshape", [a], {"shape": [1, "seq", HIDDEN]}, names=["attn.r"]).result
    h2 = f.add_op("add", [h, f.add_op("qmatmul", [a, wo], names=["o"]).result], names=["h2"]).result

    # The MLP runs w8a8: activations quantized per token at run time, the matmuls accumulate in int32.
    per_token = TensorType.of("i8", [1, "seq", HIDDEN], QuantSpec.dynamic_spec(axis=2, group_size=HIDDEN))
    xq = f.add_op("quantize", [h2], result_types=[per_token], names=["xq"]).result
    g = f.add_op("silu", [f.add_op("qmatmul", [xq, gate], names=["gate"]).result], names=["gate.act"]).result
    u = f.add_op("qmatmul", [xq, up], names=["up"]).result
    mid = f.add_op("mul", [g, u], names=["mid"]).result
    # A static per-tensor spec with literal parameters (the range of a SiLU-gated product is small).
    mid_t = TensorType.of("u8", [1, "seq", FFN], QuantSpec.per_tensor(0.05, 128))
    midq = f.add_op("quantize", [mid], result_types=[mid_t], names=["mid.q"]).result
    y = f.add_op("qmatmul", [midq, down], names=["down"]).result
    out = f.add_op("add", [h2, y], names=["out"]).result
    f.set_outputs([out])
    return m


@pytest.fixture
def block_module() -> Module:
    """A fresh valid quantized transformer block (mutate freely)."""
    return build_block()


@pytest.fixture
def block_builder() -> Callable[..., Module]:
    """:func:`build_block` itself, for tests that want several modules or other seeds."""
    return build_block
