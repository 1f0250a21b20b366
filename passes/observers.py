"""Range observers with bounded memory: what ``calibrate`` feeds every activation it watches through.

A :class:`RangeObserver` sees one tensor per calibration batch and keeps, whatever the number of
batches, a fixed amount of state:

* the exact minimum, maximum and element count;
* the per-channel (last axis) absolute maximum, a ``[K]`` vector;
* two streaming histograms (:class:`AbsHistogram`) of the magnitudes of the positive and of the
  negative elements, ``bins`` counts each, plus the count of exact zeros.

Streaming histograms never stack activations. A histogram covers ``[0, bins * width)`` with ``width``
a power of two; when a batch holds a value beyond the covered range, the width is doubled (as many
times as needed) by merging neighbouring bins. Because the widths are powers of two, old bin edges
are new bin edges, so re-binning is exact (no count is split or interpolated), and the positive and
negative histograms can be merged into one histogram of ``|x|`` the same way.

From that state :meth:`RangeObserver.range` derives a clipping range ``(lo, hi)``:

``minmax``
    ``(min, max)`` exactly.
``percentile``
    two tails: the ``(100 - p)``-th and ``p``-th percentiles of ``x``; or, with ``symmetric``, the
    ``p``-th percentile ``t`` of ``|x|`` giving ``(-t, t)``. Linear interpolation inside a bin, so the
    result is within one bin width of ``numpy.percentile`` on the same data.
``mse``
    the threshold ``t`` on ``|x|`` that minimizes the expected squared error of symmetric int8
    quantization with step ``t / 127``: rounding noise ``step^2 / 12`` per element below ``t`` plus
    ``(|x| - t)^2`` per clipped element (bin centres), over every bin edge as a candidate.
``entropy``
    TensorRT's / ONNX Runtime's KL-divergence calibration on the ``|x|`` histogram: for each
    candidate edge ``i >= 128`` the reference distribution ``P`` is ``hist[:i]`` with the outliers
    added to its last bin, ``Q`` is ``hist[:i]`` merged into 128 levels and spread back over the
    non-empty bins of ``P``; both are smoothed (eps 1e-4) and the threshold is the edge with the least
    ``KL(P || Q)``.

The threshold methods clip both tails at ``t`` but never widen the observed range:
``(max(min, -t), min(max, t))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qir.errors import QirError

Method = Literal["minmax", "percentile", "mse", "entropy"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")
QUANTIZED_BINS = 128  # levels of |x| in int8's positive half: what the entropy method compares against
INT8_LEVELS = 127


@dataclass(frozen=True)
class Stats:
    """Calibration statistics of one value: the chosen clipping range and the per-channel |max|."""

    lo: float
    hi: float
    chmax: np.ndarray | None = None

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi))


class AbsHistogram:
    """A histogram of non-negative numbers over ``[0, bins * width)``, ``width = 2**exp``, re-binned by merging."""

    def __init__(self, bins: int) -> None:
        if bins < 2:
            raise QirError(f"a histogram needs at least 2 bins, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exp: int | None = None  # None until the first non-empty batch
        self.total = 0

    @property
    def width(self) -> float:
        return 0.0 if self.exp is None else math.ldexp(1.0, self.exp)

    @property
    def top(self) -> float:
        """The end of the covered range (every value seen is below it)."""
        return self.bins * self.width

    def _exp_for(self, vmax: float) -> int:
        e = math.ceil(math.log2(vmax / self.bins)) if vmax > 0 else -126
        while vmax >= self.bins * math.ldexp(1.0, e):  # log2 rounding; the top edge is exclusive
            e += 1
        return e

    def grow_to(self, exp: int) -> None:
        """Widen the bins to ``2**exp`` by merging groups of ``2**(exp - self.exp)`` neighbours (exact)."""
        if self.exp is None:
            self.exp = exp
            return
        if exp <= self.exp:
            return
        shift = exp - self.exp
        if shift >= 62 or (1 << shift) >= self.bins:
            merged = np.zeros(self.bins, dtype=np.int64)
            merged[0] = self.counts.sum()
        else:
            factor = 1 << shift
            sums = np.add.reduceat(self.counts, np.arange(0, self.bins, factor))
            merged = np.zeros(self.bins, dtype=np.int64)
            merged[: sums.size] = sums
        self.counts = merged
        self.exp = exp

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (non-negative, finite; any shape)."""
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        if a.size == 0:
            return
        vmax = float(a.max())
        need = self._exp_for(vmax)
        if self.exp is None or need > self.exp:
            self.grow_to(need)
        assert self.exp is not None
        idx = np.floor(np.ldexp(a, -self.exp)).astype(np.int64)  # division by a power of two: exact
        np.minimum(idx, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)
        self.total += a.size

    def merged_with(self, other: AbsHistogram) -> AbsHistogram:
        """A new histogram holding both (same bin count), at the coarser of the two widths."""
        out = AbsHistogram(self.bins)
        exps = [h.exp for h in (self, other) if h.exp is not None]
        if not exps:
            return out
        out.exp = max(exps)
        for h in (self, other):
            if h.exp is None:
                continue
            tmp = AbsHistogram(h.bins)
            tmp.counts, tmp.exp = h.counts.copy(), h.exp
            tmp.grow_to(out.exp)
            out.counts += tmp.counts
            out.total += h.total
        return out

    def quantile_at_rank(self, rank: float) -> float:
        """The value below which ``rank`` of the counted elements lie (linear inside the bin)."""
        if self.total == 0 or self.exp is None:
            return 0.0
        rank = min(max(rank, 0.0), float(self.total))
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, rank, side="left"))
        i = min(i, self.bins - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = 0.0 if inside == 0 else (rank - before) / inside
        return (i + min(max(frac, 0.0), 1.0)) * self.width


class RangeObserver:
    """Streaming statistics of one tensor-valued activation (see the module docstring)."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.pos = AbsHistogram(bins)
        self.neg = AbsHistogram(bins)
        self.chmax: np.ndarray | None = None
        self.nonfinite = 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch (any float array; NaN and Inf are counted in ``nonfinite`` and otherwise ignored)."""
        a = np.asarray(x)
        if a.dtype.kind != "f":
            a = a.astype(np.float32)
        a = a.astype(np.float32, copy=False)
        flat = a.reshape(-1)
        finite = np.isfinite(flat)
        if not finite.all():
            self.nonfinite += int(flat.size - finite.sum())
            a = np.where(np.isfinite(a), a, np.float32(0.0))
            flat = flat[finite]
        channels = a.shape[-1] if a.ndim else 1
        absval = np.abs(a).reshape(-1, channels) if a.size else np.zeros((0, channels), np.float32)
        ch = absval.max(axis=0) if absval.shape[0] else np.zeros(channels, np.float32)
        if self.chmax is None:
            self.chmax = ch.astype(np.float32)
        elif self.chmax.shape != ch.shape:
            raise QirError(f"calibration batches disagree on the channel count of an activation: "
                           f"{self.chmax.shape[0]} before, {channels} now")
        else:
            np.maximum(self.chmax, ch, out=self.chmax)
        if flat.size == 0:
            return
        self.count += flat.size
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.pos.add(flat[flat > 0])
        self.neg.add(-flat[flat < 0])
        self.zeros += int(np.count_nonzero(flat == 0))

    # -- derived numbers --------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.count == 0

    def abs_histogram(self) -> AbsHistogram:
        """One histogram of ``|x|`` (zeros in bin 0), at the coarser of the two sides' widths."""
        h = self.pos.merged_with(self.neg)
        if self.zeros:
            if h.exp is None:
                h.exp = -126
            h.counts[0] += self.zeros
            h.total += self.zeros
        return h

    def signed_percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the signed data."""
        rank = q / 100.0 * self.count
        n_neg = self.neg.total
        if rank <= n_neg and n_neg:
            return -self.neg.quantile_at_rank(n_neg - rank)
        rank -= n_neg
        if rank <= self.zeros:
            return 0.0
        return self.pos.quantile_at_rank(rank - self.zeros)

    def abs_percentile(self, q: float) -> float:
        h = self.abs_histogram()
        return h.quantile_at_rank(q / 100.0 * h.total)

    def range(self, method: str = "minmax", *, percentile: float = 99.99, symmetric: bool = False
              ) -> tuple[float, float]:
        """The clipping range ``(lo, hi)`` chosen by ``method`` (see the module docstring)."""
        if self.empty:
            raise QirError("no calibration data reached this value (every batch was empty or non-finite)")
        if method == "minmax":
            return self.min, self.max
        if method == "percentile":
            if not 0.0 < percentile <= 100.0:
                raise QirError(f"calibrate: percentile must be in (0, 100], got {percentile}")
            if symmetric:
                return self._clip(self.abs_percentile(percentile))
            lo = self.signed_percentile(100.0 - percentile)
            hi = self.signed_percentile(percentile)
            return self._inside(lo, hi)
        if method == "mse":
            h = self.abs_histogram()
            return self._clip(mse_threshold(h.counts, h.width))
        if method == "entropy":
            h = self.abs_histogram()
            return self._clip(entropy_threshold(h.counts, h.width))
        raise QirError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")

    def _clip(self, t: float) -> tuple[float, float]:
        return self._inside(-t, t)

    def _inside(self, lo: float, hi: float) -> tuple[float, float]:
        """``(lo, hi)`` moved inside ``[min, max]`` with ``lo <= hi``: interpolation inside a bin can put a
        percentile of constant data just past its one value, and a threshold below every value of one-signed
        data would otherwise give an inverted range."""
        lo = min(max(self.min, lo), self.max)
        hi = max(min(self.max, hi), lo)
        return lo, hi


def mse_threshold(counts: np.ndarray, width: float, levels: int = INT8_LEVELS) -> float:
    """The bin edge ``t`` minimizing expected symmetric-int quantization MSE of a ``|x|`` histogram."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0 or width == 0:
        return 0.0
    n = c.size
    centers = (np.arange(n) + 0.5) * width
    edges = np.arange(1, n + 1) * width  # candidate t = k * width, k = 1..n
    # Suffix sums over bins k..n-1 (the bins clipped by t = k * width).
    s0 = np.concatenate([np.cumsum(c[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((c * centers)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((c * centers * centers)[::-1])[::-1], [0.0]])
    k = np.arange(1, n + 1)
    below = c.sum() - s0[k]
    clip = s2[k] - 2.0 * edges * s1[k] + edges * edges * s0[k]
    rounding = below * (edges / levels) ** 2 / 12.0
    total = rounding + np.maximum(clip, 0.0)
    return float(edges[int(np.argmin(total))])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.size - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    out = p.astype(np.float64) + np.where(zeros, eps, -eps1)
    return None if np.any(out <= 0) else out


def entropy_threshold(counts: np.ndarray, width: float, quantized_bins: int = QUANTIZED_BINS) -> float:
    """KL-divergence (TensorRT / ONNX Runtime "entropy") threshold of a ``|x|`` histogram."""
    hist = np.asarray(counts, dtype=np.float64)
    n = hist.size
    if hist.sum() == 0 or width == 0:
        return 0.0
    if n < quantized_bins:
        raise QirError(f"calibrate{{method=entropy}} needs bins >= {quantized_bins}, got {n}")
    # Candidates stop at the last non-empty bin: a threshold past the largest value clips nothing, and the
    # result is capped at the observed maximum anyway.
    last = int(np.flatnonzero(hist)[-1]) + 1
    stop = max(quantized_bins, last)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    best_i, best_kl = stop, math.inf
    for i in range(quantized_bins, stop + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += suffix[i]
        nonzero = p != 0
        merge = i // quantized_bins
        starts = np.arange(quantized_bins) * merge
        q_bins = np.add.reduceat(sliced, starts)
        q_bins[-1] = sliced[(quantized_bins - 1) * merge:].sum()
        span = np.full(quantized_bins, merge)
        span[-1] = i - (quantized_bins - 1) * merge
        norm = np.add.reduceat(nonzero.astype(np.float64), starts)
        per = np.divide(q_bins, norm, out=np.zeros_like(q_bins), where=norm > 0)
        q = np.repeat(per, span) * nonzero
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        ps /= ps.sum()
        qs /= qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * width
