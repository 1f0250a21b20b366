"""Quantization arithmetic: the formulas every part of qir (and every backend) follows.

Convention (ONNX / PyTorch / TVM)::

    q  = clamp(round(x / scale) + zero_point, qmin, qmax)
    x~ = scale * (q - zero_point)

``round`` is round-half-to-even (``numpy.rint``), as in ONNX ``QuantizeLinear``.
The division is done in f32 (``x`` and ``scale`` are cast to f32 first), so the
integer codes are identical on every backend. The source document (seeds/002)
writes ``X_q = R(X/S) - Z``, ``X~ = S·(X_q + Z)``: the same map with
``Z = -zero_point``.

Parameters broadcast against ``x`` the numpy way in the plain functions
(:func:`quantize`, :func:`dequantize`). The spec-based forms take parameters in
the layout a :class:`~qir.quantspec.QuantSpec` stores them (a scalar, ``[n]``
along ``axis``, or one entry per group) and expand them with
:func:`expand_params`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.dtypes import DType, dtype
from qir.errors import QuantError
from qir.quantspec import QuantSpec

ROUNDING = "half-to-even"
"""The rounding mode of :func:`quantize`, written down for backends to follow."""


def _as_f32(a: np.ndarray | float) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int | None,
             dt: str | DType) -> np.ndarray:
    """``clamp(rint(x / scale) + zero_point, qmin, qmax)`` stored as ``dt`` (``"i8"``, ``qir.u4``...).

    ``scale`` and ``zero_point`` broadcast against ``x``; ``zero_point`` may be any
    integer (``None`` means 0), even one outside the storage range.
    """
    d = dtype(dt)
    if not d.is_integer:
        raise QuantError(f"can only quantize to an integer dtype, not {d}")
    s = _as_f32(scale)
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise QuantError("scale must be finite and > 0 everywhere")
    q = np.rint(_as_f32(x) / s).astype(np.float64)
    if zero_point is not None:
        q = q + np.asarray(zero_point, dtype=np.float64)
    q = np.nan_to_num(q, nan=0.0)
    return np.clip(q, d.qmin, d.qmax).astype(d.numpy)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int | None = None) -> np.ndarray:
    """``scale * (q - zero_point)`` in f32 (``zero_point`` ``None`` means 0)."""
    qi = np.asarray(q).astype(np.int32)
    if zero_point is not None:
        qi = qi - np.asarray(zero_point, dtype=np.int32)
    return (qi.astype(np.float32) * _as_f32(scale)).astype(np.float32)


def expand_params(param: np.ndarray | float | int, spec: QuantSpec, shape: tuple[int, ...]) -> np.ndarray:
    """Turn a parameter stored in ``spec``'s layout into an array that broadcasts against ``shape``.

    per tensor: a scalar; per axis: ``[n]`` reshaped to ``n`` along ``axis``;
    per group: each entry repeated ``group_size`` times along ``axis`` (a short last group is cut).
    """
    p = np.asarray(param)
    spec = spec.normalized(len(shape))
    if spec.axis is None:
        if p.size != 1:
            raise QuantError(f"a per-tensor parameter must hold one value, got shape {list(p.shape)}")
        return p.reshape(())
    axis = spec.axis
    if spec.group_size is None:
        if p.shape != (shape[axis],):
            raise QuantError(f"a per-axis parameter for axis {axis} of {list(shape)} must have shape "
                             f"[{shape[axis]}], got {list(p.shape)}")
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return p.reshape(view)
    g = spec.group_size
    want = tuple(-(-s // g) if i == axis else s for i, s in enumerate(shape))
    if p.shape != want:
        raise QuantError(f"a per-group parameter (axis {axis}, group {g}) for {list(shape)} must have shape "
                         f"{list(want)}, got {list(p.shape)}")
    rep = np.repeat(p, g, axis=axis)
    return np.take(rep, np.arange(shape[axis]), axis=axis)


@dataclass(frozen=True)
class QTensor:
    """A quantized array at run time: integer codes plus the parameters that give them meaning.

    ``scale``, ``zero_point`` and ``offset`` are in the spec's storage layout
    (see :func:`expand_params`); for dynamic specs the quantizing op computed
    them. ``offset`` (f32, the spec's ``offset=@...``) is added after scaling.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    spec: QuantSpec
    offset: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def scale_full(self) -> np.ndarray:
        return expand_params(self.scale, self.spec, self.shape)

    def zero_point_full(self) -> np.ndarray | None:
        if self.zero_point is None:
            return None
        return expand_params(self.zero_point, self.spec, self.shape)

    def offset_full(self) -> np.ndarray | None:
        if self.offset is None:
            return None
        return expand_params(self.offset, self.spec, self.shape)

    def dequantize(self) -> np.ndarray:
        x = dequantize(self.codes, self.scale_full(), self.zero_point_full())
        if self.offset is not None:
            # One f32 add after the f32 product: GGUF's ``d*q + m`` (and ``d*q - dm``) bit for bit.
            x = (x + np.asarray(self.offset_full(), dtype=np.float32)).astype(np.float32)
        return x


def quantize_spec(x: np.ndarray, spec: QuantSpec, dt: str | DType, scale: np.ndarray | float,
                  zero_point: np.ndarray | int | None = None) -> QTensor:
    """Quantize ``x`` with parameters in ``spec``'s layout; returns a :class:`QTensor`."""
    shape = tuple(np.shape(x))
    s = np.asarray(scale, dtype=np.float32)
    z = None if zero_point is None else np.asarray(zero_point, dtype=np.int32)
    codes = quantize(x, expand_params(s, spec, shape), None if z is None else expand_params(z, spec, shape), dt)
    return QTensor(codes, s, z, spec)


def reduce_groups(x: np.ndarray, spec: QuantSpec, fn: str) -> np.ndarray:
    """min or max of ``x`` over each quantization group, in the spec's parameter layout."""
    x = np.asarray(x, dtype=np.float32)
    red = np.min if fn == "min" else np.max
    if spec.axis is None:
        return np.asarray(red(x) if x.size else 0.0, dtype=np.float32)
    axis = spec.normalized(x.ndim).axis
    assert axis is not None
    others = tuple(i for i in range(x.ndim) if i != axis)
    if spec.group_size is None:
        return red(x, axis=others) if others else x.copy()
    g = spec.group_size
    n = x.shape[axis]
    ngroups = -(-n // g)
    pad = ngroups * g - n
    if pad:
        # Pad the last group with a copy of its own edge element so it does not change min/max.
        edge = np.take(x, [n - 1], axis=axis)
        x = np.concatenate([x] + [edge] * pad, axis=axis)
    new_shape = list(x.shape[:axis]) + [ngroups, g] + list(x.shape[axis + 1:])
    return red(x.reshape(new_shape), axis=axis + 1)


def _floor_scale(scale: np.ndarray) -> np.ndarray:
    """Raise scales below the smallest normal f32 to it.

    A range narrower than ~1e-36 gives a scale that underflows to a subnormal or 0:
    0 divides by zero, and backends that flush subnormals to zero do the same. The
    floored scale still bounds the error by scale/2 (the whole range is below it).
    """
    return np.maximum(scale, np.finfo(np.float32).tiny).astype(np.float32)


def params_from_range(lo: np.ndarray | float, hi: np.ndarray | float, dt: str | DType, *,
                      symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale and zero point that map ``[lo, hi]`` onto ``dt``'s range (raw arrays, no validation of zp).

    Symmetric: ``scale = max(|lo|, |hi|) / qmax`` and no zero point. Asymmetric:
    ``scale = (hi - lo) / (qmax - qmin)`` and ``zero_point = qmin - round(lo / scale)``.
    A range of width 0 gets scale 1 (and maps its single value exactly when it is 0).
    For the source document's X (range [1.2, 13.6], i8) this gives S = 0.048627
    and zero point -153 (the slide truncates to -152).
    """
    d = dtype(dt)
    lo = np.asarray(lo, dtype=np.float32)
    hi = np.asarray(hi, dtype=np.float32)
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise QuantError("cannot choose quantization parameters for data with NaN or Inf")
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.where(amax > 0, amax / np.float32(d.qmax), np.float32(1.0)).astype(np.float32)
        return _floor_scale(scale), None
    width = (hi - lo).astype(np.float32)
    scale = _floor_scale(np.where(width > 0, width / np.float32(d.qmax - d.qmin), np.float32(1.0)).astype(np.float32))
    zp = (d.qmin - np.rint(lo / scale)).astype(np.int64)
    return scale, zp


def params_with_minimum(lo: np.ndarray | float, hi: np.ndarray | float, dt: str | DType
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and float minimum mapping ``[lo, hi]`` onto an unsigned ``dt``'s codes: ``x ~ scale * q + lo``.

    The GGUF ``Q4_1`` convention (a spec with ``offset=`` and no zero point): ``scale = (hi - lo) / qmax`` over
    the range's own extent -- not widened to contain 0 -- and the minimum ``lo`` itself (f32). A range of width 0
    gets scale 1 and maps its single value exactly (code 0).
    """
    d = dtype(dt)
    if d.is_signed:
        raise QuantError(f"a float minimum needs unsigned codes (x = scale*q + min, q >= 0), not {d}; use u{d.bits}")
    lo = np.asarray(lo, dtype=np.float32)
    hi = np.asarray(hi, dtype=np.float32)
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise QuantError("cannot choose quantization parameters for data with NaN or Inf")
    width = (hi - lo).astype(np.float32)
    scale = _floor_scale(np.where(width > 0, width / np.float32(d.qmax), np.float32(1.0)).astype(np.float32))
    return scale.astype(np.float32), lo.copy()


def choose_params(x: np.ndarray, dt: str | DType, *, symmetric: bool = True, axis: int | None = None,
                  group_size: int | None = None, include_zero: bool = True,
                  scale_name: str | None = None, zero_point_name: str | None = None,
                  ) -> tuple[QuantSpec, np.ndarray, np.ndarray | None]:
    """Min/max quantization parameters of ``x`` for ``dt`` at the granularity asked for.

    Returns ``(spec, scale, zero_point)``: the spec (per-tensor specs hold the
    parameters as literals; others name the constants ``scale_name`` /
    ``zero_point_name``, default ``"scale"`` / ``"zero_point"``) and the parameter
    arrays in the spec's layout.

    ``include_zero`` (default) widens each range to contain 0, so real 0 is exact
    and the zero point lies inside the storage range, as every backend needs. With
    ``include_zero=False`` the range is the data's own; if a zero point then falls
    outside the storage range the request is impossible and raises, saying so.
    """
    d = dtype(dt)
    if not d.is_integer:
        raise QuantError(f"can only quantize to an integer dtype, not {d}")
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise QuantError("cannot choose quantization parameters for an empty tensor")
    if not np.all(np.isfinite(x)):
        raise QuantError("cannot choose quantization parameters: the tensor holds NaN or Inf")
    probe = QuantSpec(axis=axis, group_size=group_size, symmetric=symmetric, dynamic=True)
    probe = probe.normalized(x.ndim)
    lo = reduce_groups(x, probe, "min")
    hi = reduce_groups(x, probe, "max")
    if include_zero or symmetric:
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
    scale, zp = params_from_range(lo, hi, d, symmetric=symmetric)
    if zp is not None and (np.any(zp < d.qmin) or np.any(zp > d.qmax)):
        bad = int(zp.flat[int(np.argmax((zp < d.qmin) | (zp > d.qmax)))])
        raise QuantError(
            f"the data range excludes 0, so the exact min/max mapping needs zero point {bad}, outside the {d} "
            f"storage range [{d.qmin}, {d.qmax}] (scale {float(np.ravel(scale)[0]):.6g}); use include_zero=True, "
            "or qir.quant.params_from_range for the raw parameters")
    zp_arr = None if zp is None else zp.astype(np.int32)
    if probe.axis is None:
        spec = QuantSpec(scale=float(scale), zero_point=None if zp_arr is None else int(zp_arr),
                         symmetric=symmetric)
    else:
        spec = QuantSpec(axis=probe.axis, group_size=group_size, scale=scale_name or "scale",
                         zero_point=None if symmetric else (zero_point_name or "zero_point"), symmetric=symmetric)
    return spec, scale.astype(np.float32), zp_arr


def quantize_dynamic(x: np.ndarray, spec: QuantSpec, dt: str | DType) -> QTensor:
    """What a dynamic ``quantize`` op does at run time: min/max per group, then quantize."""
    d = dtype(dt)
    x = np.asarray(x, dtype=np.float32)
    probe = spec.normalized(x.ndim)
    if x.size == 0:
        shape = probe.scale_shape(x.shape) if probe.axis is not None else ()
        return QTensor(x.astype(d.numpy), np.ones(shape, np.float32),
                       None if probe.symmetric else np.zeros(shape, np.int32), probe)
    finite = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    lo = np.minimum(reduce_groups(finite, probe, "min"), 0.0)
    hi = np.maximum(reduce_groups(finite, probe, "max"), 0.0)
    scale, zp = params_from_range(lo, hi, d, symmetric=probe.symmetric)
    zp_arr = None if zp is None else np.clip(zp, d.qmin, d.qmax).astype(np.int32)
    return quantize_spec(x, probe, d, scale, zp_arr)
