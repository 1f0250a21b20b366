"""The ``fold-scales`` pass: SmoothQuant migration through norms, scale muls folded into (q)matmuls, fold-qdq."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qir
from qir.graph import Module
from qir.passes import PassContext, PassFailedError, run_pipeline
from qir.passes.calibrate import calibration_stats
from qir.passes.fold_scales import smoothing_factors
from qir.printer import print_module
from qir.quant import QTensor
from qir.quantspec import QuantSpec
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden" / "passes"


def out(m: Module, feed: dict[str, np.ndarray], function: str | None = None) -> list[np.ndarray]:
    return [np.asarray(o.dequantize() if isinstance(o, QTensor) else o) for o in qir.run(m, feed, function=function)]


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


def ops(m: Module) -> Counter[str]:
    return Counter(op.opcode for f in m.functions.values() for op in f.ops)


def golden_input() -> Module:
    return qir.parse((GOLDEN / "fold_scales.input.qir").read_text())


def h_feed(seed: int, seq: int = 5) -> dict[str, np.ndarray]:
    return {"h": np.random.default_rng(seed).standard_normal((1, seq, 4)).astype(np.float32)}


def test_golden_and_float_equivalence() -> None:
    src = golden_input()
    got = run_pipeline(src, "fold-scales,dce", verify_each=True)
    assert print_module(got) == (GOLDEN / "fold_scales.expected.qir").read_text()
    assert ops(src) - ops(got) == Counter({"mul": 1})
    for seed in range(3):
        assert rel_err(out(got, h_feed(seed)), out(src, h_feed(seed))) < 1e-5


def test_smoothing_factors_formula() -> None:
    s = smoothing_factors(np.array([16.0, 1.0, 0.0]), np.array([0.25, 4.0, 1.0]), 0.5)
    np.testing.assert_allclose(s, [8.0, 0.5, 1.0])
    np.testing.assert_allclose(smoothing_factors(np.array([3.0]), np.array([2.0]), 1.0), [3.0])


def test_transformed_statistics_match_a_second_calibrate() -> None:
    from test_quantize import feeds, tiny_lm

    m = tiny_lm(two_functions=True)
    ctx = PassContext(calibration=feeds(2, seq=16), function="prefill")
    smoothed = run_pipeline(m, "calibrate,fold-scales", context=ctx, verify_each=True)
    again = run_pipeline(smoothed, "calibrate", context=ctx)
    for v in ("x", "x2", "mid"):  # the norm outputs and the gated MLP's product
        derived, measured = calibration_stats(smoothed, v, "prefill"), calibration_stats(again, v, "prefill")
        assert derived is not None and measured is not None
        np.testing.assert_allclose(derived.chmax, measured.chmax, rtol=1e-5)
        assert derived.lo <= measured.lo + 1e-6 and derived.hi >= measured.hi - 1e-6
    # both functions stay exactly equivalent in float (they share the smoothed norm and weights)
    assert not np.allclose(smoothed.constant("norm").numpy(), m.constant("norm").numpy())
    for w in ("layer.up_proj.weight", "layer.down_proj.weight"):
        assert not np.allclose(smoothed.constant(w).numpy(), m.constant(w).numpy())
    for name, fn, seq in (("ids", "prefill", 12), ("token", "decode", 1)):
        feed = feeds(1, seq=seq, seed=4, name=name)[0]
        assert rel_err(out(smoothed, feed, fn), out(m, feed, fn)) < 1e-5


def outlier_norm_model(seed: int = 0) -> Module:
    """rms_norm whose weight has a few x30 channels, feeding three linears (a q/k/v-like group)."""
    rng = np.random.default_rng(seed)
    m = Module("smooth")
    k = 64
    g = np.ones(k, np.float32)
    g[[2, 30, 41]] = 30.0
    gc = m.add_constant("ln.weight", g)
    ws = [m.add_constant(f"p{i}.weight", (rng.standard_normal((48, k)) / 8).astype(np.float32)) for i in range(3)]
    f = m.add_function("main")
    h = f.add_input("h", TensorType.of("f32", [1, "seq", k]))
    x = f.add_op("rms_norm", [h, gc], {"eps": 1e-5}, names=["x"]).result
    f.set_outputs([f.add_op("linear", [x, w], names=[f"y{i}"]).result for i, w in enumerate(ws)])
    qir.verify(m)
    return m


def feeds_h(n: int, seed: int, k: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"h": rng.standard_normal((1, 16, k)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_smoothing_lowers_w8a8_error(act: str) -> None:
    m = outlier_norm_model()
    ctx = PassContext(calibration=feeds_h(3, seed=1))
    plain = run_pipeline(m, f"calibrate,quantize{{scheme=w8a8,act={act}}}", context=ctx, verify_each=True)
    smooth = run_pipeline(m, f"calibrate,fold-scales{{smooth=0.5}},calibrate,quantize{{scheme=w8a8,act={act}}}",
                          context=ctx, verify_each=True)
    feed = feeds_h(1, seed=7)[0]
    want = out(m, feed)
    assert rel_err(out(smooth, feed), want) < 0.5 * rel_err(out(plain, feed), want)


def gated_mlp_model(seed: int = 0, *, expose_mid: bool = False) -> Module:
    """SwiGLU MLP whose up projection has a few x30 rows: the down projection's input has outlier channels."""
    rng = np.random.default_rng(seed)
    m = Module("mlp")
    k, f_dim = 48, 96
    up = (rng.standard_normal((f_dim, k)) / 7).astype(np.float32)
    up[[3, 40, 77]] *= 30.0
    wg = m.add_constant("gate.weight", (rng.standard_normal((f_dim, k)) / 7).astype(np.float32))
    wu = m.add_constant("up.weight", up)
    wd = m.add_constant("down.weight", (rng.standard_normal((k, f_dim)) / 10).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("h", TensorType.of("f32", [1, "seq", k]))
    g = f.add_op("silu", [f.add_op("linear", [x, wg], names=["gate"]).result]).result
    u = f.add_op("linear", [x, wu], names=["up"]).result
    mid = f.add_op("mul", [g, u], names=["mid"]).result
    y = f.add_op("linear", [mid, wd], names=["y"]).result
    f.set_outputs([y, mid] if expose_mid else [y])
    qir.verify(m)
    return m


def test_gated_mlp_smoothing_is_exact_in_float_and_lowers_w8a8_error() -> None:
    m = gated_mlp_model()
    ctx = PassContext(calibration=feeds_h(3, seed=1, k=48))
    smoothed = run_pipeline(m, "calibrate,fold-scales{smooth=0.5}", context=ctx, verify_each=True)
    assert not np.allclose(smoothed.constant("up.weight").numpy(), m.constant("up.weight").numpy())
    assert np.array_equal(smoothed.constant("gate.weight").numpy(), m.constant("gate.weight").numpy())
    feed = feeds_h(1, seed=7, k=48)[0]
    want = out(m, feed)
    assert rel_err(out(smoothed, feed), want) < 1e-5
    plain = run_pipeline(m, "quantize{scheme=w8a8}", verify_each=True)
    smooth = run_pipeline(m, "calibrate,fold-scales{smooth=0.5},quantize{scheme=w8a8}", context=ctx,
                          verify_each=True)
    assert rel_err(out(smooth, feed), want) < 0.7 * rel_err(out(plain, feed), want)


def test_gated_mlp_is_left_alone_when_its_product_is_read_elsewhere() -> None:
    m = gated_mlp_model(expose_mid=True)
    got = run_pipeline(m, "calibrate,fold-scales{smooth=0.5}", context=PassContext(calibration=feeds_h(2, 1, 48)))
    for w in ("up.weight", "down.weight"):
        assert np.array_equal(got.constant(w).numpy(), m.constant(w).numpy())


def test_mul_after_qmatmul_folds_into_the_weight_scale() -> None:
    src = golden_input()
    q = run_pipeline(src, "quantize{scheme=w8a8},dce")
    folded = run_pipeline(q, "fold-scales{smooth=0},dce", verify_each=True)
    assert ops(q) - ops(folded) == Counter({"mul": 1})
    assert "c" not in folded.constants
    np.testing.assert_allclose(folded.constant("wb.scale").numpy(), q.constant("wb.scale").numpy() * [0.5, 2.0],
                               rtol=1e-6)
    np.testing.assert_array_equal(folded.constant("wb").numpy(), q.constant("wb").numpy())  # codes untouched
    for seed in range(3):
        assert rel_err(out(folded, h_feed(seed)), out(q, h_feed(seed))) < 1e-5


def test_mul_is_kept_when_the_weight_is_also_read_elsewhere() -> None:
    m = golden_input()
    f = m.main
    extra = f.add_op("linear", [f.value("x"), m.constant("wb")], names=["z"]).result
    f.set_outputs([*f.outputs, extra])
    got = run_pipeline(m, "fold-scales{smooth=0}", verify_each=True)
    assert got.main.find_ops("mul") and np.array_equal(got.constant("wb").numpy(), m.constant("wb").numpy())


def test_dequantize_quantize_chain_becomes_requantize() -> None:
    m = Module("qdq")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 8]))
    a = f.add_op("quantize", [x], result_types=[TensorType.of("i8", [2, 8], QuantSpec.per_tensor(0.05, 0))]).result
    d = f.add_op("dequantize", [a], result_types=[TensorType.of("f32", [2, 8])]).result
    b = f.add_op("quantize", [d], result_types=[TensorType.of("i8", [2, 8], QuantSpec.per_tensor(0.1, 3))]).result
    f.set_outputs([f.add_op("dequantize", [b], result_types=[TensorType.of("f32", [2, 8])]).result])
    got = run_pipeline(m, "fold-scales", verify_each=True)
    assert ops(m) - ops(got) == Counter({"quantize": 1, "dequantize": 1}) and got.main.find_ops("requantize")
    xv = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(out(got, xv)[0], out(m, xv)[0], atol=1e-6)


def test_needs_statistics_to_smooth_and_checks_its_option() -> None:
    with pytest.raises(PassFailedError, match="run calibrate"):
        run_pipeline(outlier_norm_model(), "fold-scales")
    assert run_pipeline(outlier_norm_model(), "fold-scales{smooth=0}") is not None
    with pytest.raises(PassFailedError, match="smooth must be in"):
        run_pipeline(outlier_norm_model(), "fold-scales{smooth=1.5}")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 1.0))
def test_property_smoothing_keeps_the_module_valid_and_exact(seed: int, alpha: float) -> None:
    m = outlier_norm_model(seed % 5)
    ctx = PassContext(calibration=feeds_h(1, seed=seed))
    got = run_pipeline(m, f"calibrate,fold-scales{{smooth={alpha}}},dce", context=ctx)
    qir.verify(got)
    feed = feeds_h(1, seed=seed + 1)[0]
    assert rel_err(out(got, feed), out(m, feed)) < 1e-4


def test_report_layer_errors_compare_with_the_weights_as_smoothing_left_them() -> None:
    from test_quantize import feeds, tiny_lm

    from qir.passes import FloatSnapshot, PassManager
    from qir.tools.report import layer_rows

    m = tiny_lm()
    snap = FloatSnapshot()
    out = PassManager("calibrate,fold-scales{smooth=0.5},quantize{scheme=w8a8}", instruments=[snap],
                      context=PassContext(calibration=feeds(2, seq=16))).run(m)
    against_import = {r["name"]: r["rel_error"] for r in layer_rows(m, out)}
    against_snapshot = {r["name"]: r["rel_error"] for r in layer_rows(snap.reference(m), out)}
    assert against_import["layer.down_proj.weight"] > 0.3  # the rescaled columns, not quantization error
    assert all(e is not None and e < 0.02 for e in against_snapshot.values())
    assert snap.reference(tiny_lm()) is not None
