"""Range observers (bounded-memory histograms, the four clipping methods) and the ``calibrate`` pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qir
from qir.errors import QirError
from qir.graph import Module
from qir.passes import PASSES, PassContext, PassFailedError, parse_pipeline, run_pipeline
from qir.passes.calibrate import calibration_stats, calibration_targets
from qir.passes.observers import AbsHistogram, RangeObserver, entropy_threshold, mse_threshold
from qir.printer import print_module

GOLDEN = Path(__file__).parent / "golden" / "passes"


# -- observers ----------------------------------------------------------------------------------------------------
def test_minmax_is_exact_and_batching_does_not_matter() -> None:
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((3, 7, 5)) * (i + 1)).astype(np.float32) for i in range(6)]
    many, one = RangeObserver(64), RangeObserver(64)
    for d in data:
        many.update(d)
    one.update(np.concatenate(data, axis=0))
    lo, hi = many.range("minmax")
    assert (lo, hi) == (float(min(d.min() for d in data)), float(max(d.max() for d in data)))
    assert many.range("minmax") == one.range("minmax")
    np.testing.assert_array_equal(many.chmax, np.abs(np.concatenate(data)).reshape(-1, 5).max(axis=0))
    # Re-binning is exact, so the histograms agree too, not just the extremes.
    np.testing.assert_array_equal(many.abs_histogram().counts, one.abs_histogram().counts)


def test_histogram_memory_is_bounded_and_rebinning_is_exact() -> None:
    rng = np.random.default_rng(1)
    h = AbsHistogram(128)
    seen = []
    for i in range(40):  # the range grows by 2**20 over the batches
        batch = np.abs(rng.standard_normal(1000)) * 2.0 ** (i / 2)
        h.add(batch)
        seen.append(batch)
        assert h.counts.shape == (128,)
    allv = np.concatenate(seen)
    assert h.total == allv.size == h.counts.sum()
    assert allv.max() < h.top <= 2 * 128 * allv.max() / 128 * 2  # max is covered, and at most 2 widths over
    direct = np.bincount(np.minimum(np.floor(allv / h.width).astype(np.int64), 127), minlength=128)
    np.testing.assert_array_equal(h.counts, direct)


@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 99.99])
def test_percentile_matches_numpy_within_a_bin(q: float) -> None:
    rng = np.random.default_rng(2)
    obs = RangeObserver(2048)
    chunks = [rng.standard_t(3, size=(4, 500)).astype(np.float32) for _ in range(5)]
    for c in chunks:
        obs.update(c)
    x = np.concatenate([c.reshape(-1) for c in chunks]).astype(np.float64)
    t = obs.abs_percentile(q)
    width = obs.abs_histogram().width
    assert abs(t - np.percentile(np.abs(x), q)) <= width
    lo, hi = obs.range("percentile", percentile=q)
    assert abs(hi - np.percentile(x, q)) <= obs.pos.width + 1e-12
    assert abs(lo - np.percentile(x, 100 - q)) <= obs.neg.width + 1e-12
    slo, shi = obs.range("percentile", percentile=q, symmetric=True)
    assert shi == pytest.approx(min(t, x.max())) and slo == pytest.approx(max(-t, x.min()))


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_threshold_methods_clip_heavy_tails_and_keep_uniform_ranges(method: str) -> None:
    rng = np.random.default_rng(3)
    for df in (2, 3):
        heavy = RangeObserver(2048)
        heavy.update(rng.standard_t(df, size=200_000).astype(np.float32))
        lo, hi = heavy.range(method)
        assert max(hi, -lo) < 0.8 * max(heavy.max, -heavy.min)  # the outliers are clipped away
    uniform = RangeObserver(2048)
    uniform.update(rng.uniform(-4.0, 4.0, size=200_000).astype(np.float32))
    ulo, uhi = uniform.range(method)
    assert uhi >= 0.95 * uniform.max and ulo <= 0.95 * uniform.min


def _smooth_ref(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = (p == 0).astype(np.float64)
    n_nonzero = p.size - zeros.sum()
    if n_nonzero == 0:
        return None
    return p + eps * zeros - eps * zeros.sum() / n_nonzero * (1 - zeros)


def _entropy_reference(hist: np.ndarray, width: float, nq: int = 128) -> float:
    """TensorRT / MXNet's KL calibration, written the slow, obvious way."""
    best: tuple[float, int] | None = None
    for i in range(nq, hist.size + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p != 0
        m = i // nq
        qb = [sliced[j * m:(j + 1) * m].sum() for j in range(nq)]
        qb[-1] += sliced[nq * m:].sum()
        q = np.zeros(i)
        for j in range(nq):
            s, e = j * m, (i if j == nq - 1 else (j + 1) * m)
            if nonzero[s:e].sum():
                q[s:e] = qb[j] / nonzero[s:e].sum()
        q[~nonzero] = 0
        ps, qs = _smooth_ref(p), _smooth_ref(q)
        if ps is None or qs is None or (qs <= 0).any():
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if best is None or kl < best[0]:
            best = (kl, i)
    assert best is not None
    return best[1] * width


def test_entropy_matches_the_reference_algorithm() -> None:
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_t(3, size=20_000))
    hist, edges = np.histogram(x, bins=384, range=(0.0, float(x.max()) * 1.001))
    assert entropy_threshold(hist, edges[1]) == pytest.approx(_entropy_reference(hist, edges[1]))


def test_mse_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(6)
    hist = np.floor(1e4 * np.exp(-np.arange(300) / 15.0)) + rng.integers(0, 2, 300)
    hist[290] = 3  # a far outlier cluster
    centers = np.arange(300) + 0.5
    costs = [np.sum(hist[centers < t]) * (t / 127) ** 2 / 12
             + np.sum(hist[centers > t] * (centers[centers > t] - t) ** 2) for t in np.arange(1, 301, dtype=np.float64)]
    assert mse_threshold(hist, 1.0) == float(np.argmin(costs) + 1)
    assert mse_threshold(hist, 1.0) < 290
    assert mse_threshold(np.full(512, 100.0), 1.0) >= 0.95 * 512
    assert entropy_threshold(np.full(512, 100.0), 1.0) >= 0.95 * 512
    assert mse_threshold(np.zeros(16), 1.0) == 0.0


def test_observer_ignores_nonfinite_and_counts_zeros() -> None:
    obs = RangeObserver(32)
    obs.update(np.array([[0.0, 1.0, np.nan], [-2.0, np.inf, 0.0]], np.float32))
    assert obs.nonfinite == 2 and obs.zeros == 2 and obs.count == 4
    assert obs.range("minmax") == (-2.0, 1.0)
    assert obs.signed_percentile(50.0) == 0.0
    with pytest.raises(QirError, match="no calibration data"):
        RangeObserver(32).range("minmax")
    with pytest.raises(QirError, match="unknown calibration method"):
        obs.range("kl")


# -- the pass -----------------------------------------------------------------------------------------------------
def _mlp() -> Module:
    return qir.parse((GOLDEN / "calibrate_mlp.input.qir").read_text())


def _feeds() -> list[dict[str, np.ndarray]]:
    a = np.array([[[1.0, -2.0, 0.5, 0.0], [0.25, 0.75, -0.5, 3.0]]], np.float32)
    b = np.array([[[-1.5, 1.0, 2.0, -0.25]]], np.float32)
    return [{"x": a}, {"x": b}]


def test_calibrate_golden_and_stats() -> None:
    out = run_pipeline(_mlp(), "calibrate", context=PassContext(calibration=_feeds()))
    assert print_module(out) == (GOLDEN / "calibrate_mlp.expected.qir").read_text()
    st = calibration_stats(out, "x")
    assert st is not None and (st.lo, st.hi) == (-2.0, 3.0)
    np.testing.assert_array_equal(st.chmax, [1.5, 2.0, 2.0, 3.0])
    assert calibration_stats(out, "nope") is None
    # The statistics equal a plain float run's extremes for every watched value.
    seen: dict[str, list[np.ndarray]] = {}
    for feed in _feeds():
        qir.run(_mlp(), feed, observer=lambda v, a: seen.setdefault(v.name, []).append(np.asarray(a)))
    for name in ("x", "h", "a", "y"):
        st = calibration_stats(out, name)
        assert st is not None
        assert st.lo == min(float(a.min()) for a in seen[name]) and st.hi == max(float(a.max()) for a in seen[name])


def test_calibrate_targets_and_dce_keeps_stats(tmp_path: Path) -> None:
    m = _mlp()
    assert [v.name for v in calibration_targets(m.main)] == ["x", "h", "a", "y"]
    out = run_pipeline(m, "calibrate,dce", context=PassContext(calibration=_feeds()))
    assert "calib.main.a" in out.constants and "calib.main.a.chmax" in out.constants
    qir.save(out, tmp_path / "m.qir")  # statistics survive save/load like any constant
    back = qir.load(tmp_path / "m.qir")
    got, want = calibration_stats(back, "a"), calibration_stats(out, "a")
    assert got is not None and want is not None
    assert (got.lo, got.hi) == (want.lo, want.hi) and np.array_equal(got.chmax, want.chmax)
    # Running it again replaces the statistics instead of failing on duplicate names.
    again = run_pipeline(out, "calibrate{method=percentile,percentile=50}", context=PassContext(calibration=_feeds()))
    st = calibration_stats(again, "x")
    assert st is not None and st.hi < 3.0


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_every_method_runs_and_stays_inside_the_data(method: str) -> None:
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_t(3, size=(1, 64, 4)).astype(np.float32)} for _ in range(3)]
    out = run_pipeline(_mlp(), f"calibrate{{method={method}}}", context=PassContext(calibration=feeds))
    mm = run_pipeline(_mlp(), "calibrate", context=PassContext(calibration=feeds))
    for name in ("x", "h", "y"):
        st, ref = calibration_stats(out, name), calibration_stats(mm, name)
        assert st is not None and ref is not None
        assert ref.lo <= st.lo <= 0.0 <= st.hi <= ref.hi or (ref.lo <= st.lo <= st.hi <= ref.hi)


def test_calibrate_errors_are_actionable() -> None:
    with pytest.raises(PassFailedError, match="calibrate needs calibration data"):
        run_pipeline(_mlp(), "calibrate")
    with pytest.raises(PassFailedError, match="bins must be >= 256"):
        run_pipeline(_mlp(), "calibrate{method=entropy,bins=64}", context=PassContext(calibration=_feeds()))
    with pytest.raises(PassFailedError, match="no function @decode"):
        run_pipeline(_mlp(), "calibrate", context=PassContext(calibration=_feeds(), function="decode"))


def test_calibrate_is_a_registered_pass_with_pipeline_options() -> None:
    assert "calibrate" in PASSES
    (p,) = parse_pipeline("calibrate{method=percentile,percentile=99.9,bins=512}")
    assert (p.method, p.percentile, p.bins) == ("percentile", 99.9, 512)
    assert p.spelling() == "calibrate{method=percentile,percentile=99.9,bins=512}"
    with pytest.raises(QirError, match="not one of minmax, percentile, mse, entropy"):
        parse_pipeline("calibrate{method=kl}")
