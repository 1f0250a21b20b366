"""The ``outlier-split`` pass: LLM.int8-style f16 outlier columns + a quantized rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qir
from qir.errors import QirError
from qir.graph import Module
from qir.passes import PassContext, PassFailedError, run_pipeline
from qir.passes.calibrate import calibration_stats
from qir.passes.outlier_split import outlier_columns
from qir.printer import print_module
from qir.quant import QTensor
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden" / "passes"
K, H = 64, 96
PLANTED = (3, 17, 40)  # input channels scaled by 50


def out(m: Module, feed: dict[str, np.ndarray], function: str | None = None) -> list[np.ndarray]:
    return [np.asarray(o.dequantize() if isinstance(o, QTensor) else o) for o in qir.run(m, feed, function=function)]


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


def planted_model(seed: int = 0) -> Module:
    """x -> (linear w1, linear w2 share x) ; silu(h1) * gain (gain has planted x50 channels) -> linear w3."""
    rng = np.random.default_rng(seed)
    m = Module("planted")
    w1 = m.add_constant("l1.weight", (rng.standard_normal((H, K)) / np.sqrt(K)).astype(np.float32))
    w2 = m.add_constant("l2.weight", (rng.standard_normal((H, K)) / np.sqrt(K)).astype(np.float32))
    w3 = m.add_constant("l3.weight", (rng.standard_normal((K, H)) / np.sqrt(H)).astype(np.float32))
    gain = np.ones(H, np.float32)
    gain[[5, 60]] = 50.0
    g = m.add_constant("gain", gain)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", K]))
    h1 = f.add_op("linear", [x, w1], names=["h1"]).result
    h2 = f.add_op("linear", [x, w2], names=["h2"]).result
    a = f.add_op("mul", [f.add_op("silu", [h1]).result, g], names=["a"]).result
    y = f.add_op("linear", [a, w3], names=["y"]).result
    f.set_outputs([y, h2])
    qir.verify(m)
    return m


def planted_feeds(n: int, seed: int, seq: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((1, seq, K)).astype(np.float32)
        x[..., list(PLANTED)] *= 50.0
        feeds.append({"x": x})
    return feeds


def test_golden() -> None:
    src = qir.parse((GOLDEN / "outlier_split.input.qir").read_text())
    got = run_pipeline(src, "outlier-split{max_fraction=0.25}", verify_each=True)
    assert print_module(got) == (GOLDEN / "outlier_split.expected.qir").read_text()
    x = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32) * np.float32([1, 40, 1, 1])
    assert rel_err(out(got, {"x": x}), out(src, {"x": x})) < 1e-3  # only the f16 rounding of W[:, 1]


def test_outlier_columns_threshold_and_cap() -> None:
    ch = np.array([1.0, 9.0, 7.0, 0.5, 20.0, 6.0], np.float32)
    assert outlier_columns(ch, 6.0, 1.0).tolist() == [1, 2, 4]
    assert outlier_columns(ch, 6.0, 0.34).tolist() == [1, 4]  # at most 2 of 6: the two largest
    assert outlier_columns(ch, 6.0, 0.1).tolist() == []
    assert outlier_columns(ch, 100.0, 1.0).tolist() == []


def test_split_cuts_static_w8a8_error_at_least_10x() -> None:
    m = planted_model()
    ctx = PassContext(calibration=planted_feeds(4, seed=1))
    plain = run_pipeline(m, "calibrate,quantize{scheme=w8a8,act=static},dce", context=ctx, verify_each=True)
    split = run_pipeline(m, "calibrate,outlier-split,quantize{scheme=w8a8,act=static},dce", context=ctx,
                         verify_each=True)
    # the split is visible: f16 constants for the outlier columns, gathers, and qmatmuls on the rest
    f16 = {n: c for n, c in split.constants.items() if c.type.dtype.name == "f16"}
    assert sorted(f16) == ["l1.weight.outlier", "l2.weight.outlier", "l3.weight.outlier"]
    assert f16["l1.weight.outlier"].type.shape == (len(PLANTED), H)
    l3_cols = np.asarray(split.constant("l3.weight.outlier_cols").numpy()).tolist()
    assert {5, 60} <= set(l3_cols) and len(l3_cols) <= int(0.05 * H)  # the planted gains, within max_fraction
    assert len(split.main.find_ops("qmatmul")) == 3 and not split.main.find_ops("linear")
    assert len(split.main.find_ops("gather")) == 4  # l1 and l2 share both gathers of %x
    assert len(split.main.find_ops("quantize")) == 2
    assert split.constant("l1.weight").type.shape == (H, K - len(PLANTED))
    for feed in planted_feeds(2, seed=9):
        want = out(m, feed)
        e_plain, e_split = rel_err(out(plain, feed), want), rel_err(out(split, feed), want)
        assert e_split * 10 <= e_plain, (e_plain, e_split)


def test_rest_gets_derived_statistics_and_quantize_needs_no_second_calibrate() -> None:
    m = planted_model()
    ctx = PassContext(calibration=planted_feeds(2, seed=1))
    split = run_pipeline(m, "calibrate,outlier-split", context=ctx)
    recal = run_pipeline(split, "calibrate", context=ctx)
    derived = calibration_stats(split, "x.rest")
    measured = calibration_stats(recal, "x.rest")
    assert derived is not None and measured is not None
    np.testing.assert_allclose(derived.chmax, measured.chmax, rtol=1e-6)  # chmax[rest] is exact
    assert derived.lo <= measured.lo and derived.hi >= measured.hi  # the range bound is conservative
    assert max(abs(derived.lo), derived.hi) == pytest.approx(float(measured.chmax.max()))


def test_prefill_and_decode_share_the_split_weights() -> None:
    from test_quantize import feeds, tiny_lm

    m = tiny_lm(two_functions=True)
    ctx = PassContext(calibration=feeds(3, seq=16), function="prefill")
    pipeline = "calibrate,outlier-split{threshold=0.0,max_fraction=0.1},quantize{scheme=w8a8,act=static},dce"
    got = run_pipeline(m, pipeline, context=ctx, verify_each=True)
    for fname in ("prefill", "decode"):
        assert got.function(fname).find_ops("gather") and got.function(fname).find_ops("matmul")
    # the tied embedding/head table is not split (the lookup reads it too) and stays one constant
    assert "embed.outlier" not in got.constants and got.constant("embed").type.shape == (40, 48)
    assert got.constant("layer.q_proj.weight").type.shape == (48, 48 - 4)
    for name, fn in (("ids", "prefill"), ("token", "decode")):
        feed = feeds(1, seq=12 if fn == "prefill" else 1, seed=5, name=name)[0]
        assert rel_err(out(got, feed, fn), out(m, feed, fn)) < 0.06


def test_weight_outliers_move_the_largest_weights_to_f16() -> None:
    m = planted_model()
    w = np.asarray(m.constant("l1.weight").numpy()).copy()
    w[7, 11] = 25.0  # a planted outlier weight on a normal column
    m.constant("l1.weight").data = w
    ctx = PassContext(calibration=planted_feeds(2, seed=1))
    got = run_pipeline(m, "calibrate,outlier-split{weight_outliers=2}", context=ctx, verify_each=True)
    rest = np.asarray(got.constant("l1.weight").numpy())
    assert np.abs(rest).max() < 5.0  # 25.0 no longer stretches row 7's scale
    cols = np.asarray(got.constant("l1.weight.outlier_cols").numpy()).tolist()
    assert 11 in cols and set(PLANTED) <= set(cols)
    for feed in planted_feeds(2, seed=3):
        assert rel_err(out(got, feed), out(m, feed)) < 2e-3  # exact up to the f16 rounding


def test_needs_calibration_and_valid_options() -> None:
    with pytest.raises(PassFailedError, match="run calibrate first"):
        run_pipeline(planted_model(), "outlier-split")
    with pytest.raises((QirError, PassFailedError), match="max_fraction"):
        run_pipeline(planted_model(), "outlier-split{max_fraction=2.0}")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.floats(0.0, 60.0), max_fraction=st.floats(0.0, 0.5),
       weight_outliers=st.integers(0, 5))
def test_property_split_keeps_the_module_valid_and_its_meaning(seed: int, threshold: float, max_fraction: float,
                                                               weight_outliers: int) -> None:
    m = planted_model(seed % 7)
    ctx = PassContext(calibration=planted_feeds(1, seed=seed))
    pipeline = f"calibrate,outlier-split{{threshold={threshold},max_fraction={max_fraction},"\
               f"weight_outliers={weight_outliers}}},dce"
    got = run_pipeline(m, pipeline, context=ctx)
    qir.verify(got)
    for c in got.constants.values():
        if c.name.endswith(".outlier"):
            assert c.type.shape[0] <= int(max_fraction * K) + weight_outliers or c.type.shape[0] <= int(
                max_fraction * H) + weight_outliers
    feed = planted_feeds(1, seed=seed + 1)[0]
    assert rel_err(out(got, feed), out(m, feed)) < 2e-3
