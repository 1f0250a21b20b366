"""How a quantized tensor maps its integers back to real numbers.

Convention (the ONNX / PyTorch / TVM one, used by every part of qir)::

    q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)
    x ≈ scale * (q - zero_point)

The source document (seeds/002) writes ``X_q = R(X/S) - Z`` and
``X~ = S·(X_q + Z)``; that is the same map with ``Z = -zero_point``. Its worked
example's "Z = -152" is therefore exactly qir's ``zero_point = -152``.

Granularity, decided by ``axis`` and ``group_size``:

* per tensor  (``axis=None``): one scale, a literal or a scalar constant.
* per axis    (``axis=a``): one scale per index along ``a``; the scale constant
  has shape ``[shape[a]]`` (ONNX's per-axis layout). Per output row of a
  ``[out, in]`` weight is ``axis=0``.
* per group   (``axis=a, group_size=g``): blocks of ``g`` consecutive elements
  along ``a``; the scale constant has the tensor's shape with ``shape[a]``
  replaced by ``ceil(shape[a] / g)`` (ONNX's blocked layout; a last group that
  is short is padded). Groups of 32 along the input dimension of an
  ``[out, in]`` weight are ``axis=1, group_size=32`` with scales
  ``[out, in/32]``. Per token on a ``[batch, seq, hidden]`` activation is
  ``axis=2, group_size=hidden`` (scales ``[batch, seq, 1]``).

Scale and zero point are literals for per-tensor specs and names of module
constants (``scale="w.scale"``) otherwise. A *dynamic* spec has neither: the
op that quantizes computes them at run time from the data (min/max over each
group), and the value carries them with it. Symmetric specs have no zero point
(it is 0). A scale constant may itself carry a quantized type (double
quantization: 8-bit block scales against a per-row float scale).

**Offset** (``offset=@name``, static specs with an axis only): a float constant
in the scale's layout that is *added* after scaling::

    x = scale * (q - zero_point) + offset

This is llama.cpp's "minimum" form (Q4_1, Q5_1: ``x = d*q + m``; K-quants:
``x = d*sc*q - dmin*mn``), an asymmetric map whose zero point ``-m/d`` is not
an integer. Keeping it separate from ``zero_point`` leaves the ONNX convention
of every existing spec untouched. Like a scale, an offset constant may itself
be quantized (two-level: the K-quants' 6-bit minimums against an fp16
``-dmin`` per super-block). A spec with an offset describes stored weights: it
is dequantized, never quantized into (there is no ``quantize`` to a minimum
form), so type inference of ``quantize``/``requantize`` refuses it.

**Signed scales on constants**: the scales of a *constant*'s type may be any
finite value, zero and negative included (GGUF's Q4_0 stores ``d = max/-8``,
and an all-zero block has ``d = 0``): nothing ever divides by them. Scales of
run-time values (what ``quantize`` produces) must be finite and > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from qir.dtypes import DType
from qir.errors import QuantError
from qir.shapes import Dim, Shape, SymDim, format_shape

Granularity = Literal["tensor", "axis", "group"]


@dataclass(frozen=True)
class QuantSpec:
    """Quantization parameters of a tensor type (see the module docstring)."""

    axis: int | None = None
    group_size: int | None = None
    scale: float | str | None = None
    zero_point: int | str | None = None
    symmetric: bool = True
    dynamic: bool = False
    offset: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool):
            # Literal scales are f32 values: every backend stores scales as f32 or narrower.

            object.__setattr__(self, "scale", float(np.float32(self.scale)))
        if isinstance(self.zero_point, bool) or (
            isinstance(self.zero_point, float) and not float(self.zero_point).is_integer()
        ):
            raise QuantError(f"zero point must be an integer or a constant name, got {self.zero_point!r}")
        if isinstance(self.zero_point, float):
            object.__setattr__(self, "zero_point", int(self.zero_point))

    # -- constructors -------------------------------------------------------------
    @staticmethod
    def per_tensor(scale: float, zero_point: int | None = None) -> QuantSpec:
        return QuantSpec(scale=scale, zero_point=zero_point, symmetric=zero_point is None)

    @staticmethod
    def per_axis(axis: int, scale: str, zero_point: str | None = None) -> QuantSpec:
        return QuantSpec(axis=axis, scale=scale, zero_point=zero_point, symmetric=zero_point is None)

    @staticmethod
    def per_group(axis: int, group_size: int, scale: str, zero_point: str | None = None) -> QuantSpec:
        return QuantSpec(axis=axis, group_size=group_size, scale=scale, zero_point=zero_point,
                         symmetric=zero_point is None)

    @staticmethod
    def dynamic_spec(axis: int | None = None, group_size: int | None = None, *,
                     symmetric: bool = True) -> QuantSpec:
        return QuantSpec(axis=axis, group_size=group_size, symmetric=symmetric, dynamic=True)

    # -- queries ------------------------------------------------------------------
    @property
    def granularity(self) -> Granularity:
        if self.axis is None:
            return "tensor"
        return "axis" if self.group_size is None else "group"

    @property
    def constant_refs(self) -> tuple[str, ...]:
        """Names of module constants this spec refers to (scale, zero point, offset)."""
        return tuple(r for r in (self.scale, self.zero_point, self.offset) if isinstance(r, str))

    def normalized(self, rank: int) -> QuantSpec:
        """The same spec with a non-negative axis (raises if the axis is out of range)."""
        if self.axis is None:
            return self
        if not -rank <= self.axis < rank:
            raise QuantError(f"quantization axis {self.axis} is out of range for a rank-{rank} tensor")
        return self if self.axis >= 0 else replace(self, axis=self.axis + rank)

    def scale_shape(self, shape: Shape) -> Shape:
        """The shape a scale (and zero-point) constant must have for a tensor of ``shape``."""
        spec = self.normalized(len(shape))
        if spec.axis is None:
            return ()
        size = shape[spec.axis]
        if spec.group_size is None:
            return (size,)
        return tuple(_group_count(size, spec.group_size) if i == spec.axis else d for i, d in enumerate(shape))

    def rename_refs(self, mapping: dict[str, str]) -> QuantSpec:
        """A copy whose constant references are renamed through ``mapping``."""
        scale = mapping.get(self.scale, self.scale) if isinstance(self.scale, str) else self.scale
        zp = mapping.get(self.zero_point, self.zero_point) if isinstance(self.zero_point, str) else self.zero_point
        off = mapping.get(self.offset, self.offset) if self.offset is not None else None
        return replace(self, scale=scale, zero_point=zp, offset=off)

    def check(self, dtype: DType, shape: Shape) -> None:
        """Raise :class:`QuantError` unless this spec can describe a ``dtype`` tensor of ``shape``.

        Checks what the spec alone can tell: storage dtype, axis and group size,
        literal scale finite and > 0, literal zero point inside the storage range,
        and that static/dynamic and symmetric/asymmetric are consistent. Checks that
        need the constants (their shapes and values) are the verifier's.
        """
        if not dtype.is_integer:
            raise QuantError(f"a quantized tensor must be stored in an integer dtype, not {dtype}")
        spec = self.normalized(len(shape))
        if spec.group_size is not None:
            if spec.axis is None:
                raise QuantError("group_size needs an axis: groups are consecutive elements along one axis")
            if spec.group_size <= 0:
                raise QuantError(f"group_size must be > 0, got {spec.group_size}")
            size = shape[spec.axis]
            if isinstance(size, SymDim) and not spec.dynamic:
                raise QuantError(
                    f"static per-group scales need a fixed size along axis {spec.axis}, "
                    f"but it is {size} in {format_shape(shape)}")
        if spec.offset is not None:
            if not isinstance(spec.offset, str) or not spec.offset:
                raise QuantError(f"offset must name a constant (offset=@w.min), got {spec.offset!r}")
            if spec.dynamic or spec.axis is None:
                raise QuantError("an offset (x = scale*(q - zp) + offset) needs a static spec with an axis: its "
                                 "constant has the scale's layout")
        if spec.dynamic:
            if spec.scale is not None or spec.zero_point is not None:
                raise QuantError("a dynamic spec computes scale and zero point at run time; it cannot also name them")
            return
        if spec.scale is None:
            raise QuantError("a static spec needs a scale (a literal or a constant name); use dynamic otherwise")
        if spec.symmetric and spec.zero_point is not None:
            raise QuantError("a symmetric spec has no zero point (it is 0); drop it or make the spec asymmetric")
        if not spec.symmetric and spec.zero_point is None:
            raise QuantError("an asymmetric static spec needs a zero point")
        if isinstance(spec.scale, float):
            if spec.axis is not None:
                raise QuantError(f"a {spec.granularity} spec needs a scale constant, not the literal {spec.scale!r}")
            if not math.isfinite(spec.scale) or spec.scale <= 0:
                raise QuantError(f"scale must be finite and > 0, got {spec.scale!r}")
        if isinstance(spec.zero_point, int):
            if spec.axis is not None:
                raise QuantError(f"a {spec.granularity} spec needs a zero-point constant, not the literal "
                                 f"{spec.zero_point}")
            if not dtype.qmin <= spec.zero_point <= dtype.qmax:
                raise QuantError(f"zero point {spec.zero_point} lies outside the {dtype} storage range "
                                 f"[{dtype.qmin}, {dtype.qmax}]")


def _group_count(size: Dim, group: int) -> Dim:
    if isinstance(size, int):
        return -(-size // group)
    raise QuantError(f"the number of groups of {group} along a symbolic size {size} is not known before run time")


def format_quant(spec: QuantSpec) -> str:
    """The canonical text of a spec: ``q(axis=1, group=32, scale=@w.scale, zp=@w.zp, offset=@w.min)``."""
    parts: list[str] = []
    if spec.axis is not None:
        parts.append(f"axis={spec.axis}")
    if spec.group_size is not None:
        parts.append(f"group={spec.group_size}")
    if spec.scale is not None:
        parts.append(f"scale={_format_ref_or_number(spec.scale)}")
    if spec.zero_point is not None:
        parts.append(f"zp={_format_ref_or_number(spec.zero_point)}")
    if spec.offset is not None:
        parts.append(f"offset=@{spec.offset}")
    if spec.dynamic:
        parts.append("dynamic")
        if not spec.symmetric:
            parts.append("asym")
    return "q(" + ", ".join(parts) + ")"


def _format_ref_or_number(value: float | int | str) -> str:
    if isinstance(value, str):
        return "@" + value
    if isinstance(value, float):
        return format_float(value, f32=True)
    return str(value)


def format_float(value: float, *, f32: bool = False) -> str:
    """Shortest text that parses back to the same float (``inf``, ``-inf`` and ``nan`` spelled out).

    With ``f32=True`` the value is an f32 and the text is the shortest that
    parses back to the same f32 (``0.0486``, not ``0.04859999939799309``).
    """
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if f32:

        text = str(np.float32(value))  # numpy prints the shortest text that round-trips as f32
        return text if any(c in text for c in ".en") else text + ".0"
    return repr(float(value))
