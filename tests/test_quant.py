"""Quantization arithmetic (qir.quant) and QuantSpec validation.

The golden numbers come from the source document's worked example (seeds/002);
the property tests check the error bound ``|dequantize(quantize(x)) - x| <= S/2``
for every granularity, symmetric and asymmetric, at every storage width.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qir import dtypes, quant
from qir.dtypes import DType
from qir.errors import QuantError
from qir.quant import (
    QTensor,
    choose_params,
    dequantize,
    expand_params,
    params_from_range,
    quantize,
    quantize_dynamic,
    quantize_spec,
)
from qir.quantspec import QuantSpec
from qir.shapes import dim
from qir.types import TensorType

X = np.array([[1.2, 2.4, 3.6], [11.2, 12.4, 13.6]], dtype=np.float32)

# Every integer storage dtype whose codes an f32 quotient x/scale represents exactly (i32 does not).
WIDTHS: tuple[DType, ...] = (dtypes.i2, dtypes.u2, dtypes.i4, dtypes.u4, dtypes.i8, dtypes.u8, dtypes.i16)


def _slack(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """f32 rounding in x/scale and in scale*(q-zp): a few ulps of the magnitudes involved."""
    return 1e-6 * (np.abs(x) + scale)


# -- the source document's worked example -------------------------------------------------------------------------
def test_golden_quantize_from_source_document() -> None:
    q = quantize(X, 0.0486, -152, "i8")
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [[-127, -103, -78], [78, 103, 127]])


def test_golden_dequantize_within_half_scale_except_clipped() -> None:
    q = quantize(X, 0.0486, -152, "i8")
    back = dequantize(q, 0.0486, -152)
    assert back.dtype == np.float32
    err = np.abs(back - X)
    clipped = np.zeros_like(X, dtype=bool)
    clipped[1, 2] = True  # 13.6 / 0.0486 - 152 = 127.8 rounds to 128, one past i8's range
    assert np.all(err[~clipped] <= 0.0486 / 2 + 1e-6)
    assert err[1, 2] > 0.0486 / 2
    assert back[1, 2] == pytest.approx(0.0486 * (127 + 152), rel=1e-6)


def test_golden_params_from_range() -> None:
    scale, zp = params_from_range(1.2, 13.6, "i8", symmetric=False)
    assert float(scale) == pytest.approx(0.04863, abs=1e-5)
    assert float(scale) == pytest.approx((13.6 - 1.2) / 255, rel=1e-6)
    assert int(zp) == -153  # the slide truncates 1.2/S = 24.68 to 24 and writes -152; qir rounds


def test_golden_choose_params_without_zero_in_range_raises() -> None:
    with pytest.raises(QuantError, match=r"zero point -153.*outside the i8 storage range.*scale 0\.0486") as info:
        choose_params(X, "i8", symmetric=False, include_zero=False)
    assert "include_zero" in str(info.value)


def test_golden_choose_params_default_includes_zero() -> None:
    spec, scale, zp = choose_params(X, "i8", symmetric=False)
    assert spec.granularity == "tensor" and not spec.symmetric
    assert zp is not None and int(zp) == -128  # range widened to [0, 13.6]: real 0 maps to qmin exactly
    assert float(scale) == pytest.approx(13.6 / 255, rel=1e-6)
    TensorType.of("i8", [2, 3], spec)  # the spec is valid for the tensor
    q = quantize(X, spec.scale, spec.zero_point, "i8")
    assert np.all(np.abs(dequantize(q, spec.scale, spec.zero_point) - X) <= float(scale) / 2 + 1e-6)
    assert quantize(np.zeros(1, np.float32), spec.scale, spec.zero_point, "i8")[0] == -128


# -- rounding and clamping ----------------------------------------------------------------------------------------
def test_rounding_is_half_to_even() -> None:
    x = np.array([0.5, 1.5, -0.5, 2.5, -1.5, -2.5, 0.49999997], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, 1.0, None, "i8"), [0, 2, 0, 2, -2, -2, 0])
    # ties are decided on x/scale, before the zero point is added
    np.testing.assert_array_equal(quantize(np.array([0.25, 0.75], np.float32), 0.5, 3, "i8"), [3, 5])


def test_quantize_clamps_to_storage_range_and_maps_nan_to_zero_point() -> None:
    x = np.array([-1e9, 1e9, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, 1.0, None, "i4"), [-8, 7, 7, -8])
    np.testing.assert_array_equal(quantize(x, 1.0, 0, "u4"), [0, 15, 15, 0])
    assert quantize(np.array([np.nan], np.float32), 1.0, None, "i8")[0] == 0


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_quantize_rejects_bad_scale(bad: float) -> None:
    with pytest.raises(QuantError, match="finite and > 0"):
        quantize(X, bad, None, "i8")


def test_quantize_rejects_float_target() -> None:
    with pytest.raises(QuantError, match="integer dtype, not f16"):
        quantize(X, 0.1, None, "f16")
    with pytest.raises(QuantError, match="integer dtype"):
        choose_params(X, "f32")


def test_choose_params_rejects_empty_and_nonfinite() -> None:
    with pytest.raises(QuantError, match="empty"):
        choose_params(np.zeros((0, 3), np.float32), "i8")
    with pytest.raises(QuantError, match="NaN or Inf"):
        choose_params(np.array([1.0, np.nan], np.float32), "i8")
    with pytest.raises(QuantError, match="NaN or Inf"):
        params_from_range(0.0, np.inf, "i8", symmetric=True)


def test_tiny_range_scale_does_not_underflow() -> None:
    # (1e-45 - 0) / 255 underflows f32 to 0; the scale is floored at the smallest normal f32 instead
    x = np.array([0.0, 1e-45, 1e-40], dtype=np.float32)
    for symmetric in (True, False):
        scale, zp = params_from_range(x.min(), x.max(), "i8", symmetric=symmetric)
        assert float(scale) == np.finfo(np.float32).tiny
        q = quantize(x, scale, zp, "i8")
        assert np.all(np.abs(dequantize(q, scale, zp) - x) <= float(scale) / 2)
    qt = quantize_dynamic(x.reshape(1, 3), QuantSpec.dynamic_spec(axis=1, group_size=3, symmetric=False), "u8")
    assert np.all(np.isfinite(qt.dequantize())) and float(qt.scale.min()) > 0


def test_params_from_range_zero_width_gets_unit_scale() -> None:
    scale, zp = params_from_range(0.0, 0.0, "u8", symmetric=False)
    assert float(scale) == 1.0 and int(zp) == 0
    scale, zp = params_from_range(0.0, 0.0, "i8", symmetric=True)
    assert float(scale) == 1.0 and zp is None


# -- property tests ------------------------------------------------------------------------------------------------
@st.composite
def _per_tensor_case(draw: st.DrawFn) -> tuple[DType, float, int | None, np.ndarray]:
    dt = draw(st.sampled_from(WIDTHS))
    scale = float(np.float32(draw(st.floats(1e-4, 1e3))))
    symmetric = draw(st.booleans())
    zp = None if symmetric else draw(st.integers(dt.qmin, dt.qmax))
    z = 0 if zp is None else zp
    lo, hi = scale * (dt.qmin - z), scale * (dt.qmax - z)
    x = draw(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(lo, hi)))
    return dt, scale, zp, x.astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(_per_tensor_case())
def test_round_trip_error_at_most_half_scale_per_tensor(case: tuple[DType, float, int | None, np.ndarray]) -> None:
    dt, scale, zp, x = case
    q = quantize(x, scale, zp, dt)
    assert q.dtype == dt.numpy
    codes = q.astype(np.int64)
    assert codes.min() >= dt.qmin and codes.max() <= dt.qmax
    err = np.abs(dequantize(q, scale, zp).astype(np.float64) - x)
    assert np.all(err <= scale / 2 + _slack(x, np.float64(scale)))


@st.composite
def _granular_case(draw: st.DrawFn) -> tuple[DType, np.ndarray, int | None, int | None, bool]:
    dt = draw(st.sampled_from(WIDTHS))
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=rank, max_size=rank)))
    gran = draw(st.sampled_from(["tensor", "axis", "group"]))
    axis = None if gran == "tensor" else draw(st.integers(-rank, rank - 1))
    group = None
    if gran == "group":
        assert axis is not None
        group = draw(st.integers(1, shape[axis] + 2))  # divides, does not divide, or exceeds the axis
    mag = draw(st.sampled_from([2.0**-10, 1.0, 128.0]))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-mag, mag, width=32)))
    symmetric = draw(st.booleans())
    if symmetric and dt.kind == "uint":
        x = np.abs(x)  # a symmetric unsigned spec has zero point 0: it represents [0, qmax*scale] only
    return dt, x, axis, group, symmetric


@settings(max_examples=200, deadline=None)
@given(_granular_case())
def test_round_trip_error_every_granularity(case: tuple[DType, np.ndarray, int | None, int | None, bool]) -> None:
    dt, x, axis, group, symmetric = case
    spec, scale, zp = choose_params(x, dt, symmetric=symmetric, axis=axis, group_size=group)
    t = TensorType.of(dt, x.shape, spec)  # the chosen spec is valid for the tensor
    if spec.axis is not None:
        assert scale.shape == t.quant.scale_shape(t.shape)
        assert zp is None or zp.shape == scale.shape
    qt = quantize_spec(x, spec, dt, scale, zp)
    codes = qt.codes.astype(np.int64)
    assert codes.min() >= dt.qmin and codes.max() <= dt.qmax
    if zp is not None:
        assert zp.min() >= dt.qmin and zp.max() <= dt.qmax
    s_full = np.broadcast_to(qt.scale_full(), x.shape).astype(np.float64)
    err = np.abs(qt.dequantize().astype(np.float64) - x)
    assert np.all(err <= s_full / 2 + _slack(x, s_full))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(WIDTHS), st.floats(-50, 50), st.floats(0, 100), st.booleans())
def test_params_from_range_cover_the_range(dt: DType, lo: float, width: float, symmetric: bool) -> None:
    hi = lo + width
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range a backend quantizes always holds 0
    if symmetric and dt.kind == "uint":
        lo = 0.0  # symmetric unsigned: zero point 0, so only [0, qmax*scale] is representable
    scale, zp = params_from_range(lo, hi, dt, symmetric=symmetric)
    s = float(scale)
    assert s > 0 and math.isfinite(s)
    z = 0 if zp is None else int(zp)
    assert dt.qmin <= z <= dt.qmax
    x = np.array([lo, hi, 0.0, (lo + hi) / 2], dtype=np.float32)
    q = quantize(x, s, z, dt)
    err = np.abs(dequantize(q, s, z).astype(np.float64) - x)
    assert np.all(err <= s / 2 + _slack(x, np.float64(s)))
    assert dequantize(q, s, z)[2] == 0.0  # real zero is exact


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9)),
                  elements=st.floats(-30, 30, width=32)), st.booleans(), st.sampled_from([dtypes.i8, dtypes.u8,
                                                                                           dtypes.i4]))
def test_quantize_dynamic_per_token(x: np.ndarray, symmetric: bool, dt: DType) -> None:
    if symmetric and dt.kind == "uint":
        x = np.abs(x)  # zero point 0: a symmetric unsigned spec represents [0, qmax*scale] only
    hidden = x.shape[-1]
    spec = QuantSpec.dynamic_spec(axis=-1, group_size=hidden, symmetric=symmetric)
    qt = quantize_dynamic(x, spec, dt)
    assert isinstance(qt, QTensor)
    assert qt.spec.axis == 2 and qt.scale.shape == x.shape[:2] + (1,)
    # an independent per-token computation of the parameters
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0).astype(np.float64)
    hi = np.maximum(x.max(axis=-1, keepdims=True), 0).astype(np.float64)
    if symmetric:
        want = np.maximum(np.abs(lo), hi) / dt.qmax
        assert qt.zero_point is None
    else:
        want = (hi - lo) / (dt.qmax - dt.qmin)
        assert qt.zero_point is not None and qt.zero_point.shape == qt.scale.shape
    want = np.maximum(np.where(want > 0, want, 1.0), np.finfo(np.float32).tiny)  # see test_tiny_range_scale
    np.testing.assert_allclose(qt.scale, want, rtol=1e-6)
    codes = qt.codes.astype(np.int64)
    assert codes.min() >= dt.qmin and codes.max() <= dt.qmax
    err = np.abs(qt.dequantize().astype(np.float64) - x)
    s_full = np.broadcast_to(qt.scale, x.shape).astype(np.float64)
    assert np.all(err <= s_full / 2 + _slack(x, s_full))


def test_quantize_dynamic_tokens_are_independent() -> None:
    x = np.array([[[0.01, -0.02, 0.03], [100.0, -50.0, 25.0]]], dtype=np.float32)
    qt = quantize_dynamic(x, QuantSpec.dynamic_spec(axis=2, group_size=3), "i8")
    np.testing.assert_allclose(qt.scale.ravel(), [0.03 / 127, 100.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(qt.codes[0, 0], [42, -85, 127])


def test_expand_params_layouts_and_errors() -> None:
    spec = QuantSpec.per_group(1, 4, "s")
    p = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    full = expand_params(p, spec, (2, 6))  # 6 is not a multiple of 4: the last group is short
    np.testing.assert_array_equal(full, [[1, 1, 1, 1, 2, 2], [3, 3, 3, 3, 4, 4]])
    per_axis = expand_params(np.array([1.0, 2.0, 3.0]), QuantSpec.per_axis(-1, "s"), (2, 3))
    assert per_axis.shape == (1, 3)
    with pytest.raises(QuantError, match=r"must have shape \[2, 2\], got \[2, 1\]"):
        expand_params(np.ones((2, 1)), spec, (2, 6))
    with pytest.raises(QuantError, match=r"must have shape \[3\]"):
        expand_params(np.ones(2), QuantSpec.per_axis(1, "s"), (2, 3))
    with pytest.raises(QuantError, match="one value"):
        expand_params(np.ones(2), QuantSpec.per_tensor(0.1), (2, 3))


# -- QuantSpec validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "dt", "shape", "message"), [
    (QuantSpec(axis=2, scale="s"), "i8", (4, 8), "axis 2 is out of range for a rank-2"),
    (QuantSpec(axis=-3, scale="s"), "i8", (4, 8), "axis -3 is out of range"),
    (QuantSpec(group_size=32, scale=0.5), "i8", (4, 64), "group_size needs an axis"),
    (QuantSpec(axis=1, group_size=0, scale="s"), "i4", (4, 64), "group_size must be > 0, got 0"),
    (QuantSpec(axis=1, group_size=-32, scale="s"), "i4", (4, 64), "group_size must be > 0"),
    (QuantSpec(scale=0.0), "i8", (4,), r"scale must be finite and > 0, got 0\.0"),
    (QuantSpec(scale=-0.5), "i8", (4,), "scale must be finite and > 0"),
    (QuantSpec(scale=float("nan")), "i8", (4,), r"finite and > 0, got nan"),
    (QuantSpec(scale=float("inf")), "i8", (4,), "finite and > 0"),
    (QuantSpec(scale=0.1, zero_point=200, symmetric=False), "i8", (4,), r"zero point 200 lies outside .*\[-128, 127\]"),
    (QuantSpec(scale=0.1, zero_point=-1, symmetric=False), "u4", (4,), r"outside the u4 storage range \[0, 15\]"),
    (QuantSpec(scale=0.1, zero_point=3), "i8", (4,), "symmetric spec has no zero point"),
    (QuantSpec(scale=0.1, symmetric=False), "i8", (4,), "asymmetric static spec needs a zero point"),
    (QuantSpec(scale=0.1, dynamic=True), "i8", (4,), "dynamic spec .* cannot also name"),
    (QuantSpec(zero_point="z", dynamic=True, symmetric=False), "i8", (4,), "cannot also name"),
    (QuantSpec(axis=0, scale=0.1), "i8", (4, 8), "axis spec needs a scale constant, not the literal 0.1"),
    (QuantSpec(axis=1, group_size=4, scale=0.1), "i8", (4, 8), "group spec needs a scale constant"),
    (QuantSpec(axis=0, scale="s", zero_point=3, symmetric=False), "i8", (4, 8), "needs a zero-point constant"),
    (QuantSpec(), "i8", (4,), "static spec needs a scale"),
    (QuantSpec(scale=0.1), "f32", (4,), "integer dtype, not f32"),
    (QuantSpec(scale=0.1), "bool", (4,), "integer dtype, not bool"),
    (QuantSpec(axis=1, group_size=32, scale="s"), "i4", (4, "seq"), "fixed size along axis 1"),
])
def test_quantspec_check_errors(spec: QuantSpec, dt: str, shape: tuple, message: str) -> None:
    with pytest.raises(QuantError, match=message):
        spec.check(dtypes.dtype(dt), tuple(dim(d) for d in shape))
    with pytest.raises(QuantError, match="invalid quantized type"):
        TensorType.of(dt, shape, spec)


def test_quantspec_zero_point_must_be_integer() -> None:
    with pytest.raises(QuantError, match="integer or a constant name"):
        QuantSpec(scale=0.1, zero_point=1.5, symmetric=False)
    with pytest.raises(QuantError, match="integer or a constant name"):
        QuantSpec(scale=0.1, zero_point=True, symmetric=False)
    assert QuantSpec(scale=0.1, zero_point=3.0, symmetric=False).zero_point == 3


def test_quantspec_literal_scale_is_f32() -> None:
    spec = QuantSpec.per_tensor(0.0486)
    assert spec.scale == float(np.float32(0.0486)) and spec.scale != 0.0486


def test_valid_specs_pass_and_dynamic_groups_on_symbolic_axes() -> None:
    TensorType.of("i8", [1, "seq", 576], QuantSpec.dynamic_spec(axis=2, group_size=576))
    TensorType.of("i8", [1, "seq", 576], QuantSpec.dynamic_spec(axis=1, group_size=8))  # groups over seq at run time
    TensorType.of("i4", [1536, 576], QuantSpec.per_group(1, 32, "w.scale", "w.zp"))
    TensorType.of("u8", [4], QuantSpec.per_tensor(0.5, 128))
    t = TensorType.of("i8", [4, 8], QuantSpec.per_axis(-2, "s"))
    assert t.quant is not None and t.quant.axis == 0  # the type stores the normalized axis


@pytest.mark.parametrize(("spec", "shape", "expected"), [
    (QuantSpec.per_tensor(0.1), (4, 8), ()),
    (QuantSpec.per_tensor(0.1), (), ()),
    (QuantSpec.per_axis(0, "s"), (1536, 576), (1536,)),
    (QuantSpec.per_axis(1, "s"), (1536, 576), (576,)),
    (QuantSpec.per_axis(-1, "s"), (2, 3, 5), (5,)),
    (QuantSpec.per_group(1, 32, "s"), (1536, 576), (1536, 18)),
    (QuantSpec.per_group(1, 64, "s"), (4, 100), (4, 2)),  # padded: the last group holds 36
    (QuantSpec.per_group(0, 3, "s"), (7, 5), (3, 5)),
    (QuantSpec.per_group(1, 200, "s"), (4, 100), (4, 1)),  # one group larger than the axis
    (QuantSpec.dynamic_spec(axis=2, group_size=576), (1, "seq", 576), (1, "seq", 1)),
    (QuantSpec.dynamic_spec(axis=1), (1, "seq", 576), ("seq",)),
])
def test_scale_shape(spec: QuantSpec, shape: tuple, expected: tuple) -> None:
    assert spec.scale_shape(tuple(dim(d) for d in shape)) == tuple(dim(d) for d in expected)


def test_scale_shape_errors() -> None:
    with pytest.raises(QuantError, match="out of range"):
        QuantSpec.per_axis(3, "s").scale_shape((4, 8))
    with pytest.raises(QuantError, match="not known before run time"):
        QuantSpec.dynamic_spec(axis=1, group_size=8).scale_shape((1, dim("seq"), 4))


def test_constant_refs_and_rename() -> None:
    spec = QuantSpec.per_group(1, 32, "w.scale", "w.zp")
    assert spec.constant_refs == ("w.scale", "w.zp")
    renamed = spec.rename_refs({"w.scale": "s2"})
    assert renamed.constant_refs == ("s2", "w.zp") and spec.scale == "w.scale"
    assert QuantSpec.per_tensor(0.5, 3).constant_refs == ()


# -- MSE-clipped parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis,group", [(0, None), (1, 16), (None, None)])
def test_choose_params_mse_never_worse_and_better_on_heavy_tails(symmetric: bool, axis: int | None,
                                                                 group: int | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(24, 40)).astype(np.float32)  # heavy tails: min/max wastes most of the 4-bit range
    spec0, s0, z0 = quant.choose_params(x, "i4" if symmetric else "u4", symmetric=symmetric, axis=axis,
                                        group_size=group)
    spec1, s1, z1 = quant.choose_params_mse(x, "i4" if symmetric else "u4", symmetric=symmetric, axis=axis,
                                            group_size=group)
    assert np.shape(s1) == np.shape(s0) and (z1 is None) == (z0 is None)
    dt = dtypes.dtype("i4" if symmetric else "u4")
    if z1 is not None:
        assert np.all((z1 >= dt.qmin) & (z1 <= dt.qmax))

    def err(spec: QuantSpec, s: np.ndarray, z: np.ndarray | None) -> float:
        return float(np.square(quant.quantize_spec(x, spec, dt, s, z).dequantize() - x).sum())

    assert err(spec1, s1, z1) < 0.97 * err(spec0, s0, z0)
    assert np.all(np.asarray(s1) <= np.asarray(s0) * (1 + 1e-6))  # clipping only ever shrinks the range
