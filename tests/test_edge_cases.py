"""Numerical edge cases in quantize, calibrate and the observers: each handled or refused by name.

All-zero and constant tensors get a defined scale; NaN/Inf in weights are refused naming the weight and
the first bad element; NaN/Inf in calibration data are ignored (a value that saw only NaN gets no
statistics, and a static quantization that needs them names it); single-element axes work; a group size
that does not divide the axis pads the last group; empty calibration data is refused naming the pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from qir import quant
from qir.errors import QirError, QuantError
from qir.graph import Module
from qir.interpreter import run
from qir.passes.calibrate import calibration_stats
from qir.passes.context import PassContext
from qir.passes.manager import PassFailedError, PassManager, run_pipeline
from qir.passes.observers import RangeObserver
from qir.types import TensorType


def one_linear(w: np.ndarray, name: str = "w") -> Module:
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", w.shape[1]]))
    wc = m.add_constant(name, w.astype(np.float32))
    f.set_outputs([f.add_op("linear", [x, wc], names=["y"]).result])
    return m


def quantized(m: Module, pipeline: str, name: str = "w") -> tuple[Module, np.ndarray, np.ndarray]:
    out = run_pipeline(m, pipeline)
    return out, np.asarray(out.constant(name).numpy()), np.asarray(out.constant(f"{name}.scale").numpy())


SCHEMES = ["quantize{scheme=w8a16}", "quantize{scheme=w4a16,group=4}", "quantize{scheme=w4a16,symmetric=false}",
           "quantize{scheme=w8a8}"]


@pytest.mark.parametrize("pipeline", SCHEMES)
def test_all_zero_weight_gets_scale_one_and_zero_output(pipeline: str) -> None:
    m, codes, scale = quantized(one_linear(np.zeros((3, 8))), pipeline)
    assert np.all(scale == 1.0)
    zp = m.constants.get("w.zp")
    offset = np.zeros(1) if zp is None else np.asarray(zp.numpy()).astype(np.int64)
    assert np.all(codes.astype(np.int64) - offset.reshape(-1, *([1] * (codes.ndim - 1))) == 0)
    (y,) = run(m, [np.ones((1, 2, 8), np.float32)])
    assert np.all(np.isfinite(y)) and np.all(y == 0)


@pytest.mark.parametrize("pipeline", SCHEMES)
def test_constant_weight_is_exact(pipeline: str) -> None:
    w = np.full((3, 8), 0.5)
    m, _, scale = quantized(one_linear(w), pipeline)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    x = np.ones((1, 2, 8), np.float32)
    (y,) = run(m, [x])
    # The range [0, 0.5] puts 0.5 on the top code, so the weight is exact and so is the product.
    np.testing.assert_allclose(y, x @ w.T.astype(np.float32), rtol=1e-2)


def test_tiny_constant_weight_gets_a_normal_scale() -> None:
    _, codes, scale = quantized(one_linear(np.full((2, 4), 1e-40)), "quantize{scheme=w8a16}")
    assert np.all(scale >= np.finfo(np.float32).tiny)
    assert np.all(np.isfinite(scale))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pipeline", SCHEMES[:3])
def test_nonfinite_weight_is_refused_by_name_and_position(bad: float, pipeline: str) -> None:
    w = np.ones((4, 8))
    w[2, 5] = bad
    m = one_linear(w, name="layers.3.mlp.up")
    with pytest.raises(PassFailedError) as info:
        run_pipeline(m, pipeline)
    message = str(info.value)
    assert "@layers.3.mlp.up" in message and "[2, 5]" in message and "NaN or Inf" in message, message
    assert not np.isfinite(m.constant("layers.3.mlp.up").numpy()[2, 5])  # the caller's module is untouched


@pytest.mark.parametrize("shape", [(1, 8), (5, 1), (1, 1)])
@pytest.mark.parametrize("pipeline", ["quantize{scheme=w8a16}", "quantize{scheme=w4a16,group=4}"])
def test_single_element_axes(shape: tuple[int, int], pipeline: str) -> None:
    w = np.random.default_rng(0).standard_normal(shape)
    m, codes, scale = quantized(one_linear(w), pipeline)
    assert codes.shape == shape
    x = np.random.default_rng(1).standard_normal((1, 3, shape[1])).astype(np.float32)
    (y,) = run(m, [x])
    ref = x @ w.T.astype(np.float32)
    assert np.abs(y - ref).max() <= np.abs(x).sum(axis=-1).max() * scale.max() / 2 + 1e-6


@pytest.mark.parametrize("k, group", [(10, 4), (10, 3), (576, 128), (7, 64)])
def test_group_that_does_not_divide_the_axis_pads_the_last_group(k: int, group: int) -> None:
    rng = np.random.default_rng(k)
    w = rng.standard_normal((3, k))
    w[:, -1] = 40.0  # an outlier alone in the short last group must not widen the full groups' scales
    m, codes, scale = quantized(one_linear(w), f"quantize{{scheme=w4a16,group={group}}}")
    ngroups = -(-k // group)
    assert scale.shape == (3, ngroups)
    assert str(m.constant("w").type).startswith(f"i4[3,{k}] q(axis=1, group={group}")
    if ngroups > 1:
        assert np.all(scale[:, :-1] < 40.0 / 7)  # the full groups did not see the outlier
    deq = quant.dequantize(codes, quant.expand_params(scale, m.constant("w").type.quant, codes.shape))
    full = quant.expand_params(scale, m.constant("w").type.quant, codes.shape)
    assert np.all(np.abs(deq - w.astype(np.float32)) <= full / 2 + 1e-6)


def test_choose_params_refusals_say_why() -> None:
    with pytest.raises(QuantError, match="empty tensor"):
        quant.choose_params(np.zeros((0, 4), np.float32), "i8", axis=0)
    with pytest.raises(QuantError, match="NaN or Inf"):
        quant.choose_params(np.array([1.0, np.nan], np.float32), "i8")
    spec, scale, _ = quant.choose_params(np.zeros((2, 3), np.float32), "i4", axis=0)
    assert np.all(scale == 1.0)


def test_dynamic_quantization_of_nonfinite_and_empty_activations() -> None:
    spec = quant.QuantSpec.dynamic_spec(axis=1, group_size=4)
    x = np.array([[1.0, np.nan, np.inf, -2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    qt = quant.quantize_dynamic(x, spec, "i8")
    assert np.all(np.isfinite(qt.scale)) and np.all(qt.scale > 0)
    assert qt.codes[1].tolist() == [0, 0, 0, 0]
    empty = quant.quantize_dynamic(np.zeros((0, 4), np.float32), spec, "i8")
    assert empty.codes.shape == (0, 4)


# -- calibration ----------------------------------------------------------------------------------------------
def two_linears() -> Module:
    rng = np.random.default_rng(0)
    m = Module("m")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, 4, 8]))
    h = f.add_op("linear", [x, m.add_constant("w1", rng.standard_normal((8, 8)).astype(np.float32))],
                 names=["h"]).result
    f.set_outputs([f.add_op("linear", [h, m.add_constant("w2", rng.standard_normal((3, 8)).astype(np.float32))],
                            names=["y"]).result])
    return m


STATIC = "calibrate,quantize{scheme=w8a8,act=static}"


def test_empty_calibration_data_is_refused_naming_the_pass() -> None:
    with pytest.raises(PassFailedError, match="calibrate needs calibration data"):
        PassManager(STATIC, context=PassContext(calibration=[])).run(two_linears())


def test_nan_and_inf_in_calibration_data_are_ignored() -> None:
    x = np.random.default_rng(2).standard_normal((1, 4, 8)).astype(np.float32)
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    out = PassManager("calibrate", context=PassContext(calibration=[{"x": x}])).run(two_linears())
    st = calibration_stats(out, "x", "main")
    assert st is not None
    finite = x[np.isfinite(x)]
    assert (st.lo, st.hi) == (float(finite.min()), float(finite.max()))
    assert np.all(np.isfinite(st.chmax))


def test_calibration_that_saw_only_nan_names_the_value() -> None:
    feed = {"x": np.full((1, 4, 8), np.nan, np.float32)}
    with pytest.raises(PassFailedError, match=r"no calibration statistics for %x") as info:
        PassManager(STATIC, context=PassContext(calibration=[feed])).run(two_linears())
    assert "@w1" in str(info.value)


def test_constant_calibration_data_gives_a_defined_static_scale() -> None:
    feed = {"x": np.full((1, 4, 8), 3.0, np.float32)}
    out = PassManager(STATIC, context=PassContext(calibration=[feed])).run(two_linears())
    q = [op for op in out.main.ops if op.opcode == "quantize"]
    assert q
    for op in q:
        spec = op.result.type.quant
        assert spec is not None and np.isfinite(spec.scale) and spec.scale > 0
    (y,) = run(out, [feed["x"]])
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("batch", [np.zeros((0, 8), np.float32), np.full((1, 8), np.nan, np.float32)])
def test_observer_without_finite_data_is_empty_and_refuses_a_range(batch: np.ndarray) -> None:
    obs = RangeObserver(64)
    obs.update(batch)
    assert obs.empty
    with pytest.raises(QirError, match="no calibration data reached this value"):
        obs.range("minmax")


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_observer_on_constant_and_single_element_data(method: str) -> None:
    for batch in (np.full((4, 8), 2.5, np.float32), np.array([[7.0]], np.float32), np.zeros((3, 8), np.float32)):
        obs = RangeObserver(2048)
        obs.update(batch)
        lo, hi = obs.range(method)
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
        assert batch.min() - 1e-6 <= hi and lo <= batch.max() + 1e-6


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_observer_range_of_one_signed_data_is_never_inverted(method: str) -> None:
    batch = np.random.default_rng(3).uniform(5.0, 6.0, (64, 8)).astype(np.float32)
    obs = RangeObserver(2048)
    obs.update(batch)
    lo, hi = obs.range(method, symmetric=method == "percentile")
    assert batch.min() <= lo <= hi <= batch.max()
