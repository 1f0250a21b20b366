"""The ``quantize`` pass (every scheme, static/dynamic activations, overrides, tied tables) and the GPTQ solver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qir
from qir.errors import QirError
from qir.graph import Module
from qir.passes import PASSES, PassContext, PassFailedError, format_pipeline, parse_pipeline, run_pipeline
from qir.passes.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from qir.passes.quantize import parse_overrides
from qir.printer import print_module
from qir.quant import QTensor
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden" / "passes"
VOCAB, HIDDEN, FFN = 40, 48, 80


def tiny_lm(seed: int = 0, *, tied: bool = True, two_functions: bool = False) -> Module:
    """embedding -> rms_norm -> q/k/v (one shared input) -> o -> SiLU MLP -> norm -> head (tied by default)."""
    rng = np.random.default_rng(seed)
    m = Module("tiny")

    def w(name: str, out: int, inp: int) -> qir.Constant:
        return m.add_constant(name, (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32))

    embed = m.add_constant("embed", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
    norm = m.add_constant("norm", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    ws = {n: w(n, HIDDEN, HIDDEN) for n in ("layer.q_proj.weight", "layer.k_proj.weight", "layer.v_proj.weight",
                                            "layer.o_proj.weight")}
    ws["layer.gate_proj.weight"] = w("layer.gate_proj.weight", FFN, HIDDEN)
    ws["layer.up_proj.weight"] = w("layer.up_proj.weight", FFN, HIDDEN)
    ws["layer.down_proj.weight"] = w("layer.down_proj.weight", HIDDEN, FFN)
    head = embed if tied else w("lm_head.weight", VOCAB, HIDDEN)
    for fname, seq in (("prefill", "seq"), ("decode", 1)) if two_functions else (("main", "seq"),):
        f = m.add_function(fname)
        ids = f.add_input("ids" if fname != "decode" else "token", TensorType.of("i64", [1, seq]))
        h = f.add_op("embedding", [embed, ids], names=["h"]).result
        x = f.add_op("rms_norm", [h, norm], {"eps": 1e-5}, names=["x" if fname != "decode" else "xd"]).result
        q, k, v = (f.add_op("linear", [x, ws[f"layer.{p}_proj.weight"]], names=[p]).result for p in "qkv")
        a = f.add_op("mul", [f.add_op("add", [q, k]).result, f.add_op("silu", [v]).result], names=["attn"]).result
        h2 = f.add_op("add", [h, f.add_op("linear", [a, ws["layer.o_proj.weight"]], names=["o"]).result]).result
        x2 = f.add_op("rms_norm", [h2, norm], {"eps": 1e-5}, names=["x2"]).result
        g = f.add_op("silu", [f.add_op("linear", [x2, ws["layer.gate_proj.weight"]], names=["gate"]).result]).result
        u = f.add_op("linear", [x2, ws["layer.up_proj.weight"]], names=["up"]).result
        mid = f.add_op("mul", [g, u], names=["mid"]).result
        h3 = f.add_op("add", [h2, f.add_op("linear", [mid, ws["layer.down_proj.weight"]], names=["down"]).result]
                      ).result
        logits = f.add_op("linear", [h3, head], names=["logits"]).result
        f.set_outputs([logits])
    qir.verify(m)
    return m


def feeds(n: int = 3, seq: int = 12, seed: int = 1, name: str = "ids") -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.integers(0, VOCAB, size=(1, seq), dtype=np.int64)} for _ in range(n)]


def run_out(m: Module, feed: dict[str, np.ndarray], function: str | None = None) -> np.ndarray:
    (out,) = qir.run(m, feed, function=function)
    return np.asarray(out.dequantize() if isinstance(out, QTensor) else out)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- goldens ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_quantize_golden(scheme: str) -> None:
    src = qir.parse((GOLDEN / "quantize_mlp.input.qir").read_text())
    out = run_pipeline(src, f"quantize{{scheme={scheme}}}")
    assert print_module(out) == (GOLDEN / f"quantize_mlp.{scheme}.expected.qir").read_text()
    x = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)
    assert rel_err(run_out(out, {"x": x}), run_out(src, {"x": x})) < 0.02


# -- every scheme keeps the module valid and its meaning -------------------------------------------------------
@pytest.mark.parametrize("pipeline, bound", [
    ("quantize{scheme=w8a16}", 0.01),
    ("quantize{scheme=w8a16,group=16}", 0.01),
    ("quantize{scheme=w8a8}", 0.03),
    ("quantize{scheme=w8a8,symmetric=false}", 0.03),
    ("quantize{scheme=w4a16,group=32}", 0.10),
    ("quantize{scheme=w4a16,group=32,symmetric=false}", 0.10),
    ("quantize{scheme=w4a16,group=32,embedding=i4,head=i4}", 0.25),  # i4 per row of a 48-wide table
    ("quantize{scheme=w4a8,group=16}", 0.12),
    ("calibrate,quantize{scheme=w8a8,act=static}", 0.05),
    ("calibrate,quantize{scheme=w4a8,act=static,group=16}", 0.12),
    ("quantize{scheme=w4a16,group=16,rounding=gptq}", 0.10),
    ("quantize{scheme=w4a16,group=16,zero=float}", 0.10),
    ("quantize{scheme=w4a16,group=16,zero=float,rounding=gptq}", 0.10),
    ("quantize{scheme=w4a8,group=16,zero=float}", 0.12),
    ("calibrate,quantize{scheme=w4a8,act=static,group=16,zero=float}", 0.12),
    ("quantize{scheme=w4a16,group=16,zero=float,embedding=i4g16,head=i4g16}", 0.15),
    ("quantize{scheme=w8a16,embedding=i4g16,head=i4g16}", 0.15),
])
def test_schemes_verify_and_stay_close(pipeline: str, bound: float) -> None:
    m = tiny_lm()
    out = run_pipeline(m, pipeline, context=PassContext(calibration=feeds(4, seq=32)))
    qir.verify(out)
    assert not out.main.find_ops("linear") and not out.main.find_ops("embedding")
    assert not [n for n in out.constants if n.startswith("calib.")]  # quantize consumed the statistics
    for feed in feeds(2, seed=7):
        assert rel_err(run_out(out, feed), run_out(m, feed)) < bound


def test_w8a8_inserts_one_quantize_per_activation_and_head_stays_weight_only() -> None:
    out = run_pipeline(tiny_lm(), "quantize{scheme=w8a8}")
    qs = out.main.find_ops("quantize")
    # q/k/v share %x, gate/up share %x2: four distinct inputs (x, attn, x2, mid); the head is weight-only.
    assert sorted(op.operands[0].name for op in qs) == ["attn", "mid", "x", "x2"]
    assert all(str(op.result.type).endswith(f"q(axis=2, group={op.operands[0].type.shape[-1]}, dynamic)")
               for op in qs)
    users = {op.result.name: op.operands[0].name for op in out.main.find_ops("qmatmul")}
    assert users["q"] == users["k"] == users["v"] == "x.q"
    assert users["logits"] == "h3" or users["logits"].startswith("add")  # float input to the head


def test_static_activations_are_per_tensor_u8_from_the_calibrated_range() -> None:
    m = tiny_lm()
    cal = run_pipeline(m, "calibrate", context=PassContext(calibration=feeds()))
    st = qir.passes.calibrate.calibration_stats(cal, "mid")
    assert st is not None
    out = run_pipeline(cal, "quantize{scheme=w8a8,act=static}")
    (qop,) = [op for op in out.main.find_ops("quantize") if op.operands[0].name == "mid"]
    spec = qop.result.type.quant
    assert qop.result.type.dtype.name == "u8" and spec.axis is None and not spec.dynamic
    assert spec.scale == pytest.approx((max(st.hi, 0) - min(st.lo, 0)) / 255, rel=1e-6)
    assert spec.zero_point == int(np.rint(-min(st.lo, 0) / spec.scale))


def test_static_without_calibration_names_the_value() -> None:
    with pytest.raises(PassFailedError) as info:
        run_pipeline(tiny_lm(), "quantize{scheme=w8a8,act=static}")
    msg = str(info.value)
    assert "no calibration statistics for %x" in msg and "run calibrate first" in msg


def test_static_stats_of_prefill_serve_decode_through_the_weight() -> None:
    m = tiny_lm(two_functions=True)
    ctx = PassContext(calibration=feeds(), function="prefill")
    out = run_pipeline(m, "calibrate,quantize{scheme=w8a8,act=static}", context=ctx)
    pre = {op.operands[0].name: op.result.type for op in out.functions["prefill"].find_ops("quantize")}
    dec = {op.operands[0].name: op.result.type for op in out.functions["decode"].find_ops("quantize")}
    assert pre["x"].quant == dec["xd"].quant  # decode's %xd is named differently; the weight ties them
    tok = {"token": np.array([[3]], np.int64)}
    assert rel_err(run_out(out, tok, "decode"), run_out(m, tok, "decode")) < 0.05


# -- overrides, embeddings, heads ---------------------------------------------------------------------------------
def test_overrides_keep_layers_float_and_change_schemes() -> None:
    out = run_pipeline(tiny_lm(), 'quantize{scheme=w4a16,group=16,overrides="layer.*_proj.weight=w8a16;'
                                  '*.down_proj.weight=none;*.gate_proj.weight=w4a16;layer.q_proj.weight=none"}')
    c = out.constants
    assert c["layer.down_proj.weight"].type.dtype.name == "f32"  # none: kept float ...
    assert [op.result.name for op in out.main.find_ops("linear")] == ["q", "down"]  # ... with its linear
    assert c["layer.q_proj.weight"].type.dtype.name == "f32"  # the last matching pattern wins
    assert str(c["layer.gate_proj.weight"].type) == "i4[80,48] q(axis=1, group=16, scale=@layer.gate_proj.weight.scale)"
    assert str(c["layer.k_proj.weight"].type) == "i8[48,48] q(axis=1, group=16, scale=@layer.k_proj.weight.scale)"
    qir.verify(out)
    assert parse_overrides(" a*=none ; b=w8a8 ;") == [("a*", "none"), ("b", "w8a8")]
    with pytest.raises(QirError, match=r"use one of w8a8, w8a16, w4a16, w4a8, w2a16 \(optionally with :tensor"):
        parse_overrides("x=w3a3")
    assert parse_overrides("x=w2a16:tensor") == [("x", "w2a16:tensor")]
    with pytest.raises(QirError, match="names 'w3a3:tensor'"):
        parse_overrides("x=w3a3:tensor")
    with pytest.raises(QirError, match="must be PATTERN=SCHEME"):
        parse_overrides("lm_head")


def test_tied_embedding_and_head_share_one_quantized_constant() -> None:
    out = run_pipeline(tiny_lm(), "quantize{scheme=w4a16,group=16}")
    (emb,) = out.main.find_ops("qembedding")
    head = [op for op in out.main.find_ops("qmatmul") if op.result.name == "logits"][0]
    assert emb.operands[0] is head.operands[1] is out.constants["embed"]
    assert str(out.constants["embed"].type) == "i8[40,48] q(axis=0, scale=@embed.scale)"  # per row
    assert "embed.q" not in out.constants
    with pytest.raises(PassFailedError, match="shared \\(tied\\)"):
        run_pipeline(tiny_lm(), "quantize{embedding=i8,head=i4}")


def test_tied_table_half_float_gets_a_quantized_copy() -> None:
    out = run_pipeline(tiny_lm(), "quantize{scheme=w8a16,embedding=none}")
    assert out.main.find_ops("embedding")[0].operands[0] is out.constants["embed"]
    assert out.constants["embed"].type.dtype.name == "f32"
    head = [op for op in out.main.find_ops("qmatmul") if op.result.name == "logits"][0]
    assert head.operands[1] is out.constants["embed.q"]
    assert "embed.q.scale" in out.constants
    out2 = run_pipeline(tiny_lm(), "quantize{scheme=w8a16,head=none}")
    assert [op.result.name for op in out2.main.find_ops("linear")] == ["logits"]
    assert out2.main.find_ops("qembedding")[0].operands[0].name == "embed.q"


def test_untied_head_is_recognised_by_vocabulary_size() -> None:
    out = run_pipeline(tiny_lm(tied=False), "quantize{scheme=w4a16,group=16,head=i8}")
    assert str(out.constants["lm_head.weight"].type) == "i8[40,48] q(axis=0, scale=@lm_head.weight.scale)"
    out = run_pipeline(tiny_lm(tied=False), 'quantize{scheme=w4a16,overrides="lm_head*=none"}')
    assert out.constants["lm_head.weight"].type.dtype.name == "f32"


def test_padded_groups_and_asymmetric_zero_points(tmp_path: Path) -> None:
    out = run_pipeline(tiny_lm(), "quantize{scheme=w4a16,group=32,symmetric=false}")  # 32 does not divide 48 or 80
    c = out.constants
    assert str(c["layer.q_proj.weight"].type) == ("u4[48,48] q(axis=1, group=32, scale=@layer.q_proj.weight.scale, "
                                                  "zp=@layer.q_proj.weight.zp)")
    assert c["layer.q_proj.weight.scale"].type == TensorType.of("f32", [48, 2])
    assert c["layer.q_proj.weight.zp"].type == TensorType.of("u8", [48, 2])
    qir.save(out, tmp_path / "q.qir")  # i4/u4 codes pack and load back
    back = qir.load(tmp_path / "q.qir")
    feed = feeds(1)[0]
    np.testing.assert_array_equal(run_out(back, feed), run_out(out, feed))
    assert qir.stored_bytes(out) < qir.stored_bytes(tiny_lm()) / 4


def test_keep_calib_and_registration() -> None:
    ctx = PassContext(calibration=feeds())
    out = run_pipeline(tiny_lm(), "calibrate,quantize{scheme=w8a8,act=static,keep_calib=true},dce", context=ctx)
    assert "calib.main.x" in out.constants
    assert "quantize" in PASSES and "calibrate" in PASSES
    passes = parse_pipeline('calibrate{method=entropy},quantize{scheme=w4a16,group=64,rounding=gptq,'
                            'overrides="lm_head*=none"}')
    assert format_pipeline(passes) == ("calibrate{method=entropy},quantize{scheme=w4a16,group=64,rounding=gptq,"
                                       "overrides=lm_head*=none}")
    with pytest.raises(QirError, match="not one of w8a8, w8a16, w4a16, w4a8"):
        parse_pipeline("quantize{scheme=w2a2}")
    with pytest.raises(PassFailedError, match="group must be >= 0"):
        run_pipeline(tiny_lm(), "quantize{group=-1}")
    with pytest.raises(PassFailedError, match="needs calibration data"):
        run_pipeline(tiny_lm(), "quantize{scheme=w4a16,rounding=gptq}")


# -- GPTQ -----------------------------------------------------------------------------------------------------------
def _correlated(seed: int, n_rows: int = 2048, k: int = 64, rank: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, k)) * 3 + 0.1 * rng.standard_normal((rank, k))
    z = rng.standard_normal((n_rows, rank))
    return (z @ a + 0.3 * rng.standard_normal((n_rows, k))).astype(np.float32)


@pytest.mark.parametrize("group, symmetric", [(None, True), (16, True), (16, False), (24, True)])
def test_gptq_beats_rtn_on_correlated_inputs(group: int | None, symmetric: bool) -> None:
    x = _correlated(0)
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    acc = HessianAccumulator(64)
    for chunk in np.split(x, 4):  # streamed in batches, like calibration feeds
        acc.add(chunk)
    np.testing.assert_allclose(acc.hessian(), 2 * x.astype(np.float64).T @ x / len(x), rtol=1e-10)
    dt = "i4" if symmetric else "u4"
    spec_axis = 0 if group is None else 1

    def deq(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
        from qir.quant import expand_params
        from qir.quantspec import QuantSpec

        spec = QuantSpec(axis=spec_axis, group_size=group, scale="s", zero_point=None if zp is None else "z",
                         symmetric=zp is None)
        z = None if zp is None else expand_params(zp, spec, w.shape)
        return qir.quant.dequantize(codes, expand_params(scale, spec, w.shape), z)

    rtn = deq(*rtn_quantize(w, dt, group=group, symmetric=symmetric))
    gptq = deq(*gptq_quantize(w, acc.hessian(), dt, group=group, symmetric=symmetric, block=32))
    ref = x @ w.T
    mse_rtn = float(np.mean((x @ rtn.T - ref) ** 2))
    mse_gptq = float(np.mean((x @ gptq.T - ref) ** 2))
    assert mse_gptq < 0.8 * mse_rtn


def test_gptq_act_order_uses_static_groups_and_beats_rtn() -> None:
    x = _correlated(5)
    x[:, 7] *= 20.0  # one loud input: act-order quantizes it first, while there is still room to compensate
    w = np.random.default_rng(6).standard_normal((32, 64)).astype(np.float32)
    acc = HessianAccumulator(64)
    acc.add(x)
    h = acc.hessian()
    codes, scale, zp = gptq_quantize(w, h, "u4", group=16, symmetric=False, act_order=True)
    # static groups: every group's parameters are round-to-nearest's, from the original weights
    _, rtn_scale, rtn_zp = rtn_quantize(w, "u4", group=16, symmetric=False)
    np.testing.assert_array_equal(scale, rtn_scale)
    np.testing.assert_array_equal(zp, rtn_zp)
    s, z = np.repeat(scale, 16, axis=1), np.repeat(zp, 16, axis=1)
    ref = x @ w.T

    def err(c: np.ndarray) -> float:
        return float(np.mean((x @ ((c.astype(np.float32) - z) * s).T - ref) ** 2))

    rtn_codes = rtn_quantize(w, "u4", group=16, symmetric=False)[0]
    assert err(codes) < 0.8 * err(rtn_codes)


def test_hessian_first_position_weight_and_sink_option() -> None:
    from qir.passes.gptq import SINK_WEIGHT, sink_weight

    x = np.random.default_rng(8).standard_normal((2, 5, 4))
    acc = HessianAccumulator(4)
    acc.add(x, first_weight=9.0)
    first = x[:, 0].reshape(-1, 4)
    want = 2 * (x.reshape(-1, 4).T @ x.reshape(-1, 4) + 8.0 * first.T @ first) / 10  # rows counted once
    np.testing.assert_allclose(acc.hessian(), want, rtol=1e-12)
    lm = tiny_lm()
    assert "decode" not in lm.functions and sink_weight(lm, 0, "quantize") == 1.0
    lm.add_function("decode")
    assert sink_weight(lm, 0, "quantize") == SINK_WEIGHT and sink_weight(lm, 3, "quantize") == 3.0
    with pytest.raises(QirError, match="sink must be 0 \\(automatic\\) or >= 1"):
        sink_weight(lm, 0.5, "quantize")


def test_gptq_through_the_pass_beats_rtn() -> None:
    rng = np.random.default_rng(2)
    m = Module("lin")
    m.add_constant("w", rng.standard_normal((32, 64)).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 64]))
    f.set_outputs([f.add_op("linear", [x, m.constants["w"]], names=["y"]).result])
    data = _correlated(3, n_rows=1024)
    ctx = PassContext(calibration=[{"x": c[None]} for c in np.split(data, 4)])
    test = {"x": _correlated(3, n_rows=256)[None]}  # same distribution, held out rows
    ref = run_out(m, test)
    errs = {r: float(np.mean((run_out(run_pipeline(m, f"quantize{{scheme=w4a16,group=16,rounding={r}}}",
                                                   context=ctx), test) - ref) ** 2)) for r in ("rtn", "gptq")}
    assert errs["gptq"] < 0.8 * errs["rtn"]


def test_gptq_handles_dead_inputs_and_reports_bad_hessians() -> None:
    w = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    h = np.eye(8)
    h[3, 3] = 0.0  # an input that was always zero
    codes, scale, zp = gptq_quantize(w, h, "i8", group=None, symmetric=True)
    assert np.all(codes[:, 3] == 0) and zp is None and scale.shape == (4,)
    with pytest.raises(QirError, match="not positive definite"):
        gptq_quantize(w, -np.eye(8), "i8", group=None, symmetric=True, damp=0.0)
    with pytest.raises(QirError, match="expected \\[8, 8\\]"):
        gptq_quantize(w, np.eye(4), "i8", group=None, symmetric=True)


# -- float minimum per group (zero=float: GGUF Q4_1 blocks) --------------------------------------------------------
def _q4_1_grid_weight(seed: int, n: int = 8, k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A weight whose blocks of 32 are exactly ``d*q + m`` with fp16 ``d``/``m`` and codes 0 and 15 present."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k))
    q[:, ::32] = 0
    q[:, 1::32] = 15
    d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1.0, 0.2, (n, k // 32)).astype(np.float16).astype(np.float32)
    return (np.repeat(d, 32, 1) * q + np.repeat(m, 32, 1)).astype(np.float32), q


def test_float_minimum_finds_q4_1_blocks_again_and_integer_zero_points_do_not() -> None:
    w, q = _q4_1_grid_weight(5)
    codes, scale, low = rtn_quantize(w, "u4", group=32, symmetric=False, minimum=True)
    assert np.array_equal(codes, q)
    np.testing.assert_array_equal(np.repeat(scale, 32, 1) * codes + np.repeat(low, 32, 1), w)
    # An integer zero point widens one-signed groups to contain 0: the same blocks no longer fit the grid.
    c2, s2, z2 = rtn_quantize(w, "u4", group=32, symmetric=False)
    assert z2 is not None
    assert np.abs(np.repeat(s2, 32, 1) * (c2 - np.repeat(z2, 32, 1)) - w).max() > 1e-3


def _one_linear(w: np.ndarray) -> Module:
    """``y = linear(x, @w)`` over ``x [1, seq, K]``."""
    m = Module("lin")
    m.add_constant("w", w)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", int(w.shape[1])]))
    f.set_outputs([f.add_op("linear", [x, m.constants["w"]], names=["y"]).result])
    return m


def test_zero_float_through_the_pass_is_an_offset_spec_and_lossless_on_grid_weights() -> None:
    w, _ = _q4_1_grid_weight(6, n=16, k=64)
    m = _one_linear(w)
    out = run_pipeline(m, "quantize{scheme=w4a16,group=32,zero=float}")
    t = out.constants["w"].type
    assert t.dtype.name == "u4" and t.quant.offset == "w.min" and t.quant.zero_point is None
    assert "offset=@w.min" in print_module(out)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_out(out, feed), run_out(m, feed), rtol=1e-5, atol=1e-5)
    back = qir.parse(print_module(out))  # the text round-trips (weights aside)
    assert back.constants["w"].type == t


def test_gptq_with_a_float_minimum_beats_rtn_with_one() -> None:
    x = _correlated(0)
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    acc = HessianAccumulator(64)
    acc.add(x)

    def deq(codes: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.repeat(scale, 16, 1) * codes + np.repeat(low, 16, 1)

    ref = x @ w.T
    rtn = deq(*rtn_quantize(w, "u4", group=16, symmetric=False, minimum=True))
    gptq = deq(*gptq_quantize(w, acc.hessian(), "u4", group=16, symmetric=False, minimum=True, block=32))
    assert np.mean((x @ gptq.T - ref) ** 2) < 0.8 * np.mean((x @ rtn.T - ref) ** 2)


def test_integer_path_adds_the_float_minimum_times_the_group_sums_of_x() -> None:
    """w4a8 with a float minimum per group (llama.cpp's Q4_1 x Q8 dot): ``qmatmul`` of int8 codes is the float
    matmul of the dequantized operands, the minimum entering as ``offset * sum over the group of x``."""
    from qir.ops.quantized import _integer_path
    from qir.quant import QTensor, quantize_dynamic
    from qir.quantspec import QuantSpec

    w, q = _q4_1_grid_weight(8, n=6, k=96)
    codes, scale, low = rtn_quantize(w, "u4", group=32, symmetric=False, minimum=True)
    wq = QTensor(codes, scale, None, QuantSpec(axis=1, group_size=32, scale="s", offset="m", symmetric=False), low)
    x = np.random.default_rng(3).standard_normal((3, 96)).astype(np.float32)
    xq = quantize_dynamic(x, QuantSpec(axis=1, group_size=96, dynamic=True), "i8")
    want = xq.dequantize().astype(np.float64) @ wq.dequantize().astype(np.float64).T
    np.testing.assert_allclose(_integer_path(xq, wq), want, rtol=1e-5, atol=1e-5)


def test_w4a8_with_a_float_minimum_keeps_q4_1_blocks() -> None:
    w, _ = _q4_1_grid_weight(9, n=16, k=64)
    m = _one_linear(w)
    out = run_pipeline(m, "quantize{scheme=w4a8,group=32,zero=float}")
    t = out.constants["w"].type
    assert t.dtype.name == "u4" and t.quant.offset == "w.min" and out.main.find_ops("quantize")
    feed = {"x": np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32)}
    assert rel_err(run_out(out, feed), run_out(m, feed)) < 0.01  # only the int8 activations are rounded


def test_zero_float_refuses_what_it_cannot_express() -> None:
    with pytest.raises(QirError, match="give a group size"):
        run_pipeline(tiny_lm(), "quantize{scheme=w4a16,zero=float}")
    with pytest.raises(QirError, match="unsigned codes"):
        rtn_quantize(np.ones((2, 32), np.float32), "i4", group=32, symmetric=False, minimum=True)


def test_table_formats_take_groups_and_bad_ones_fail_before_running() -> None:
    out = run_pipeline(tiny_lm(), "quantize{scheme=w4a16,group=16,zero=float,embedding=i4g16,head=i4g16}")
    t = out.constants["embed"].type
    assert (t.dtype.name, t.quant.axis, t.quant.group_size, t.quant.offset) == ("u4", 1, 16, "embed.min")
    with pytest.raises(QirError, match="i4g32"):
        parse_pipeline("quantize{embedding=i3}")
