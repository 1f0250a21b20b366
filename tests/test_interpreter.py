"""Tests of the reference interpreter: a small transformer block against torch, symbolic sizes,
the observer, freeing of intermediate values, and the errors it reports."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from qir import quant
from qir.errors import InterpretError
from qir.graph import Module, Value
from qir.interpreter import Interpreter, RunContext, run
from qir.quant import QTensor
from qir.quantspec import QuantSpec
from qir.types import TensorType
from qir.verifier import verify

VOCAB, D, HEADS, KV_HEADS, FFN = 50, 32, 4, 2, 48
HD = D // HEADS


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    return {"embed": rng.standard_normal((VOCAB, D)).astype(np.float32),
            "norm1": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "norm2": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "wq": w(D, D), "wk": w(KV_HEADS * HD, D), "wv": w(KV_HEADS * HD, D), "wo": w(D, D),
            "gate": w(FFN, D), "up": w(FFN, D), "down": w(D, FFN)}


def build_block(weights: dict[str, np.ndarray], *, quantized: bool = False) -> Module:
    """embedding -> rms_norm -> q/k/v -> heads -> causal GQA attention -> o -> residual -> SiLU MLP -> residual.

    ``quantized`` stores the projection weights as i4 per-group codes and uses weight-only ``qmatmul``.
    """
    m = Module("block")
    consts = {}
    for name, arr in weights.items():
        if quantized and arr.ndim == 2 and name != "embed":
            spec, scale, _ = quant.choose_params(arr, "i4", axis=1, group_size=16, scale_name=f"{name}.scale")
            m.add_constant(f"{name}.scale", scale)
            codes = quant.quantize_spec(arr, spec, "i4", scale).codes
            consts[name] = m.add_constant(name, codes, type=TensorType.of("i4", arr.shape, spec))
        else:
            consts[name] = m.add_constant(name, arr)
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))

    def proj(x: Value, w: str) -> Value:
        return f.add_op("qmatmul" if quantized else "linear", [x, consts[w]], names=[w + ".out"],
                        loc=f"block.py:{w}").result

    def heads(x: Value, n: int, name: str) -> Value:
        r = f.add_op("reshape", [x], {"shape": [1, "seq", n, HD]}, names=[name + ".r"]).result
        return f.add_op("transpose", [r], {"perm": [0, 2, 1, 3]}, names=[name]).result

    h = f.add_op("embedding", [consts["embed"], ids], names=["h"]).result
    x = f.add_op("rms_norm", [h, consts["norm1"]], {"eps": 1e-5}, names=["x"]).result
    q, k, v = heads(proj(x, "wq"), HEADS, "q"), heads(proj(x, "wk"), KV_HEADS, "k"), heads(proj(x, "wv"), KV_HEADS, "v")
    a = f.add_op("attention", [q, k, v], {"causal": True}, names=["attn"]).result
    a = f.add_op("transpose", [a], {"perm": [0, 2, 1, 3]}, names=["attn.t"]).result
    a = f.add_op("reshape", [a], {"shape": [1, "seq", -1]}, names=["attn.r"]).result
    h2 = f.add_op("add", [h, proj(a, "wo")], names=["h2"]).result
    x2 = f.add_op("rms_norm", [h2, consts["norm2"]], {"eps": 1e-5}, names=["x2"]).result
    g = f.add_op("silu", [proj(x2, "gate")], names=["gate.act"]).result
    mid = f.add_op("mul", [g, proj(x2, "up")], names=["mid"]).result
    out = f.add_op("add", [h2, proj(mid, "down")], names=["out"]).result
    f.set_outputs([out])
    verify(m)
    return m


def torch_block(w: dict[str, torch.Tensor], ids: np.ndarray) -> torch.Tensor:
    s = ids.shape[1]
    h = F.embedding(torch.from_numpy(ids), w["embed"])
    x = F.rms_norm(h, (D,), w["norm1"], eps=1e-5)

    def heads(y: torch.Tensor, n: int) -> torch.Tensor:
        return y.view(1, s, n, HD).transpose(1, 2)

    q, k, v = heads(F.linear(x, w["wq"]), HEADS), heads(F.linear(x, w["wk"]), KV_HEADS), \
        heads(F.linear(x, w["wv"]), KV_HEADS)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    h2 = h + F.linear(a.transpose(1, 2).reshape(1, s, D), w["wo"])
    x2 = F.rms_norm(h2, (D,), w["norm2"], eps=1e-5)
    return h2 + F.linear(F.silu(F.linear(x2, w["gate"])) * F.linear(x2, w["up"]), w["down"])


def _dequantized(m: Module, names: list[str]) -> dict[str, torch.Tensor]:
    ctx = RunContext(m)
    out = {}
    for n in names:
        c = ctx.constant(n)
        out[n] = torch.from_numpy(c.dequantize() if isinstance(c, QTensor) else np.asarray(c))
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_transformer_block_matches_torch_at_two_lengths(quantized: bool) -> None:
    weights = _weights(0)
    m = build_block(weights, quantized=quantized)
    tw = _dequantized(m, list(weights))
    rng = np.random.default_rng(1)
    for seq in (5, 11):
        ids = rng.integers(0, VOCAB, (1, seq)).astype(np.int64)
        (got,) = run(m, [ids])
        want = torch_block(tw, ids)
        assert got.shape == (1, seq, D) and got.dtype == np.float32
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)
    if quantized:  # the i4 weights change the answer, but not by much
        (full,) = run(build_block(weights), [ids])
        assert np.abs(got - full).max() > 1e-4
        assert np.abs(got - full).max() < 0.5 * np.abs(full).max()


def test_causal_prefix_is_unchanged_by_later_tokens() -> None:
    m = build_block(_weights(2))
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 9)).astype(np.int64)
    (long,) = run(m, {"ids": ids})
    (short,) = run(m, {"ids": ids[:, :4]})
    np.testing.assert_allclose(long[:, :4], short, atol=1e-6, rtol=1e-6)


def test_observer_sees_every_value_once_in_order() -> None:
    m = build_block(_weights(0))
    func = m.main
    seen: list[tuple[str, tuple[int, ...]]] = []

    def observe(value: Value, rv: Any) -> None:
        assert value.type.dtype.numpy == np.asarray(rv).dtype
        seen.append((value.name, np.shape(rv)))

    run(m, [np.zeros((1, 6), np.int64)], observer=observe)
    assert [n for n, _ in seen] == [v.name for v in func.values()]
    shapes = dict(seen)
    assert shapes["ids"] == (1, 6) and shapes["q"] == (1, HEADS, 6, HD) and shapes["k"] == (1, KV_HEADS, 6, HD)


def test_intermediate_values_are_freed_after_their_last_use() -> None:
    m = build_block(_weights(0))
    it = Interpreter(m)
    it.run([np.zeros((1, 4), np.int64)])
    n_values = len(list(m.main.values()))
    assert it.stats.freed == n_values - 1  # everything but the one output
    assert it.stats.peak_live <= 6  # residual stream, normed x, q/k/v and a temporary, never all ~30 values


def test_freed_arrays_are_really_released() -> None:
    m = Module("chain")
    f = m.add_function("main")
    v = f.add_input("x", TensorType.of("f32", [1000]))
    for op in ("exp", "neg", "tanh", "sin", "cos", "abs"):
        v = f.add_op(op, [v], names=[op]).result
    f.set_outputs([v])
    refs: list[weakref.ref[Any]] = []
    alive_at: list[int] = []

    def observe(value: Value, rv: Any) -> None:
        gc.collect()
        alive_at.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(rv))

    run(m, [np.ones(1000, np.float32)], observer=observe)
    # when a result is observed, only its operand (and the caller's input array) may still be alive
    assert max(alive_at) <= 2, alive_at


def test_input_errors_name_the_input() -> None:
    m = build_block(_weights(0))
    with pytest.raises(InterpretError, match=r"input %ids of @main expects dtype i64 .*got i32"):
        run(m, [np.zeros((1, 3), np.int32)])
    with pytest.raises(InterpretError, match=r"input %ids of @main expects shape \[1,seq\], got \[2, 3\]"):
        run(m, [np.zeros((2, 3), np.int64)])
    with pytest.raises(InterpretError, match=r"expects shape \[1,seq\], got \[3\]"):
        run(m, [np.zeros(3, np.int64)])
    with pytest.raises(InterpretError, match=r"takes inputs \['ids'\]; missing \['ids'\], unexpected \['x'\]"):
        run(m, {"x": np.zeros((1, 3), np.int64)})
    with pytest.raises(InterpretError, match="takes 1 inputs"):
        run(m, [])
    (out,) = run(m, [[[1, 2, 3]]])  # a nested list becomes an int64 array: the dtype matches exactly
    assert out.shape == (1, 3, D)


def test_symbols_bound_by_one_input_are_checked_in_the_others() -> None:
    m = Module("two")
    f = m.add_function("main")
    a = f.add_input("a", TensorType.of("f32", ["seq", 4]))
    b = f.add_input("b", TensorType.of("f32", ["seq", 4]))
    f.set_outputs([f.add_op("add", [a, b]).result])
    (y,) = run(m, [np.ones((3, 4), np.float32), np.ones((3, 4), np.float32)])
    assert y.shape == (3, 4)
    with pytest.raises(InterpretError, match=r"input %b of @main expects shape \[seq,4\], got \[5, 4\]"):
        run(m, [np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)])


def test_failing_op_reports_name_loc_and_text() -> None:
    m = build_block(_weights(0))
    with pytest.raises(InterpretError) as info:
        run(m, [np.array([[1, VOCAB]], np.int64)])
    text = str(info.value)
    assert "op embedding in @main" in text and f"id {VOCAB} is outside" in text
    assert "%h = embedding @embed, %ids : f32[1,seq,32]" in text
    qm = build_block(_weights(0), quantized=True)
    qm.constant("wk.scale").data = np.ones((3, 3), np.float32)  # not the shape its type says
    with pytest.raises(InterpretError, match=r"op qmatmul in @main at block\.py:wk failed: constant @wk.scale "
                                             r"holds f32\[3, 3\], but its type is f32\[16,2\]"):
        run(qm, [np.array([[1, 2]], np.int64)])


def test_result_that_breaks_its_declared_type_is_reported() -> None:
    m = Module("bad")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 3]))
    y = f.add_op("exp", [x], result_types=[TensorType.of("f32", [3, 2])], loc="here.py:1").result
    f.set_outputs([y])
    with pytest.raises(InterpretError, match=r"op exp in @main at here\.py:1 failed: result %exp is declared "
                                             r"f32\[3,2\] but has shape \[2, 3\]"):
        run(m, [np.ones((2, 3), np.float32)])
    m2 = Module("bad")
    f2 = m2.add_function("main")
    x2 = f2.add_input("x", TensorType.of("f32", [2]))
    f2.set_outputs([f2.add_op("reshape", [x2], {"shape": [2]}, result_types=[TensorType.of("f16", [2])]).result])
    with pytest.raises(InterpretError, match=r"declared f16\[2\] but has dtype f32"):
        run(m2, [np.ones(2, np.float32)])


def test_quantized_inputs_constants_and_double_quantization() -> None:
    rng = np.random.default_rng(5)
    wf = rng.standard_normal((8, 32)).astype(np.float32)
    spec, scale, _ = quant.choose_params(wf, "i4", axis=1, group_size=8, scale_name="w.scale")
    codes = quant.quantize_spec(wf, spec, "i4", scale).codes
    # the scale constant is itself quantized: u8 codes with a per-tensor f32 scale and zero point
    sspec, sscale, szp = quant.choose_params(scale, "u8", symmetric=False)
    m = Module("dq")
    m.add_constant("w.scale", quant.quantize(scale, sscale, szp, "u8"), type=TensorType.of("u8", scale.shape, sspec))
    w = m.add_constant("w", codes, type=TensorType.of("i4", [8, 32], spec))
    f = m.add_function("main")
    xq_t = TensorType.of("i8", [2, 32], QuantSpec.dynamic_spec(axis=1, group_size=32))
    x = f.add_input("x", xq_t)
    f.set_outputs([f.add_op("qmatmul", [x, w]).result, f.add_op("dequantize", [w]).result])
    verify(m)
    xf = rng.standard_normal((2, 32)).astype(np.float32)
    xqt = quant.quantize_dynamic(xf, xq_t.quant, "i8")
    y, wd = run(m, [xqt])
    real_scale = quant.dequantize(quant.quantize(scale, sscale, szp, "u8"), sscale, szp)
    np.testing.assert_array_equal(wd, quant.dequantize(codes, np.repeat(real_scale, 8, axis=1)))
    np.testing.assert_allclose(y, xqt.dequantize() @ wd.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(InterpretError, match="dynamic type .* pass a qir.quant.QTensor"):
        run(m, [xqt.codes])
    with pytest.raises(InterpretError, match="is the plain type"):
        run(build_block(_weights(0)), [xqt])


def test_constant_without_data_is_reported() -> None:
    m = Module("nodata")
    c = m.add_constant("w", None, type=TensorType.of("f32", [4, 4]))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, 4]))
    f.set_outputs([f.add_op("linear", [x, c]).result])
    with pytest.raises(InterpretError, match="constant @w has no data"):
        run(m, [np.ones((1, 4), np.float32)])


def test_interpreter_runs_the_shared_quantized_block(block_builder: Callable[..., Module]) -> None:
    m = block_builder()
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    (full,) = run(m, [ids])
    (prefix,) = run(m, [ids[:, :3]])
    assert full.shape[:2] == (1, 6) and np.all(np.isfinite(full))
    # per-token dynamic activations, per-tensor statics and causal attention: a prefix does not see the future
    np.testing.assert_allclose(full[:, :3], prefix, atol=1e-5, rtol=1e-5)
