"""The ``compress-scales`` pass: block scales and minimums stored as 8-bit integers against one fp16 scale per row.

``compress-scales{bits=8, requantize=true}``

The K-quant idea for any block format: a weight quantized in groups along its rows (``axis=1, group=g``) carries one
float scale (and, for GGUF's ``_1`` formats, one float minimum, the spec's ``offset``) per group: 32 bits per block
of 32 weights with fp16 scale and minimum, one bit per weight. This pass quantizes those constants per output row,
two-level::

    scale[r, b]  ~  scale.row[r] * sc[r, b] + scale.base[r]     sc: u8, scale.row and scale.base: f16
    offset[r, b] ~  min.row[r] * mn[r, b] + min.base[r]         mn: u8

asymmetric over each row's own range (the per-row spec carries an ``offset`` too), which halves their cost (Q4_1:
5.0 -> 4.5 bits per weight, plus 64 bits per row and parameter). ``bits=4`` stores them as 4-bit
instead. With ``requantize=true`` (default) the weight's codes are rounded again against the new parameters, from
the values they stood for before (``x = s*q + m`` -> ``q' = rint((x - m')/s')`` clamped): the codes absorb part of
the parameter error. Weights whose scale constant is already quantized (K-quants), is per tensor / per row, or is
shared with another tensor are left alone.

Before::

    const @w : u4[2,64] q(axis=1, group=32, scale=@w.scale, offset=@w.min) = dense(...)
    const @w.scale : f16[2,2] = dense(...)
    const @w.min : f16[2,2] = dense(...)

After ``compress-scales``::

    const @w : u4[2,64] q(axis=1, group=32, scale=@w.scale, offset=@w.min) = dense(...)
    const @w.scale : u8[2,2] q(axis=0, scale=@w.scale.row, offset=@w.scale.base) = dense(...)
    const @w.scale.row : f16[2] = dense(...)
    const @w.scale.base : f16[2] = dense(...)
    const @w.min : u8[2,2] q(axis=0, scale=@w.min.row, offset=@w.min.base) = dense(...)
    const @w.min.row : f16[2] = dense(...)
    const @w.min.base : f16[2] = dense(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.dtypes import DType, dtype
from qir.errors import QirError
from qir.graph import Constant, Module
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.quant import QTensor, expand_params
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["CompressScales", "compress_constant", "compressed_values", "compress_row_params"]


def compress_row_params(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Quantize ``values [rows, blocks]`` per row over the row's own range: ``(codes, row_scale, row_base, dtype)``.

    ``values ~ row_scale * codes + row_base`` with unsigned ``bits``-bit codes and fp16 ``row_scale``/``row_base``
    (the base is the row minimum rounded to fp16, the scale ``(max - base) / qmax`` rounded up to fp16 so no code
    clips). Asymmetric over the actual range: block scales of one row span [0.01, 0.2], not [-0.2, 0.2], so this
    spends every code where the values are. Codes are rounded against the fp16 parameters, i.e. against what the
    interpreter computes (``f32(scale * code) + base``). A constant row gets scale 1 and codes 0.
    """
    v = np.asarray(values, dtype=np.float32)
    dt = dtype(f"u{bits}")
    base = np.min(v, axis=1).astype(np.float16)
    base = np.where(base.astype(np.float32) > np.min(v, axis=1), np.nextafter(base, np.float16(-np.inf)), base)
    span = np.max(v, axis=1) - base.astype(np.float32)
    scale = np.where(span > 0, span / np.float32(dt.qmax), np.float32(1.0)).astype(np.float16)
    # fp16 rounding may lower the scale below span/qmax (the top code would clip) or flush it to 0: nudge it up.
    scale = np.where(scale.astype(np.float32) * dt.qmax < span, np.nextafter(scale, np.float16(np.inf)), scale)
    scale = np.maximum(scale, np.float16(np.finfo(np.float16).smallest_subnormal)).astype(np.float16)
    codes = np.clip(np.rint((v - base.astype(np.float32)[:, None]) / scale.astype(np.float32)[:, None]),
                    dt.qmin, dt.qmax)
    return codes.astype(dt.numpy), scale, base.astype(np.float16), dt.name


@register_pass
@dataclass
class CompressScales(Pass):
    """Store per-group block scales and minimums as 8-bit codes against a per-row fp16 scale (two-level)."""

    name = "compress-scales"
    bits: int = 8
    requantize: bool = True

    def run(self, module: Module) -> None:
        if self.bits not in (4, 8):
            raise QirError(f"compress-scales: bits must be 4 or 8, got {self.bits}")
        refs = module.spec_references()
        for c in list(module.constants.values()):
            spec = c.type.quant
            if not self._eligible(module, c, spec, refs):
                continue
            assert spec is not None and isinstance(spec.scale, str)
            self._compress(module, c, spec)

    @staticmethod
    def _eligible(module: Module, c: Constant, spec: QuantSpec | None, refs: dict[str, list[str]]) -> bool:
        if spec is None or spec.dynamic or spec.group_size is None or c.type.rank != 2 or spec.axis != 1:
            return False
        for ref in (spec.scale, spec.offset):
            if ref is None:
                continue
            if not isinstance(ref, str) or ref not in module.constants:
                return False
            p = module.constants[ref]
            if p.type.quant is not None or not p.type.dtype.is_float or len(refs.get(ref, [])) != 1:
                return False
        return True

    def _compress(self, module: Module, c: Constant, spec: QuantSpec) -> None:
        compress_constant(module, c, spec, self.bits, self.requantize)


def _compressed_params(values: dict[str, np.ndarray], spec: QuantSpec, bits: int
                       ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, str, np.ndarray]]:
    """For each of the spec's scale / offset arrays: ``(codes, row, base, dtype, the values they stand for)``."""
    out = {}
    for ref in (spec.scale, spec.offset):
        if not isinstance(ref, str):
            continue
        codes, row, base, dt = compress_row_params(values[ref], bits)
        rows = QTensor(codes, row.astype(np.float32), None, QuantSpec(axis=0, scale="r", offset="b"),
                       base.astype(np.float32))
        out[ref] = (codes, row, base, dt, rows.dequantize())
    return out


def _requantized(x: np.ndarray, spec: QuantSpec, real: dict[str, np.ndarray], zp: np.ndarray | None,
                 old: np.ndarray, d: DType) -> np.ndarray:
    """The codes rounded again against the compressed parameters (``q' = rint((x - m') / s') + zp``)."""
    shape = tuple(old.shape)
    assert isinstance(spec.scale, str)
    s = expand_params(real[spec.scale], spec, shape)
    off = expand_params(real[spec.offset], spec, shape) if isinstance(spec.offset, str) else np.float32(0)
    z = expand_params(zp, spec, shape) if zp is not None else np.float32(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((x - off) / s) + z
    q = np.where(s != 0, q, old.astype(np.float64))  # a block whose scale became 0: codes do not matter
    return np.clip(q, d.qmin, d.qmax).astype(d.numpy)


def compressed_values(qt: QTensor, dt: DType | str, bits: int = 8, requantize: bool = True) -> np.ndarray:
    """What a per-group :class:`QTensor` (f32 ``scale``, optional ``offset``) dequantizes to once ``compress-scales``
    has stored its parameters as ``bits``-bit codes: the same arithmetic as the pass, on arrays (``mixed-precision``
    uses it to measure the rounding that will be stored)."""
    spec = QuantSpec(axis=1, group_size=qt.spec.group_size, scale="s",
                     offset="m" if qt.offset is not None else None, zero_point=qt.spec.zero_point)
    values = {"s": np.asarray(qt.scale, np.float32)}
    if qt.offset is not None:
        values["m"] = np.asarray(qt.offset, np.float32)
    real = {k: v[4] for k, v in _compressed_params(values, spec, bits).items()}
    codes = qt.codes
    if requantize:
        codes = _requantized(qt.dequantize(), spec, real, qt.zero_point, np.asarray(qt.codes), dtype(dt))
    return QTensor(codes, real["s"], qt.zero_point, spec, real.get("m")).dequantize()


def compress_constant(module: Module, c: Constant, spec: QuantSpec, bits: int = 8, requantize: bool = True) -> None:
    """Compress the block scale (and minimum) of the per-group quantized constant ``c`` in place (see the module
    docstring); the caller checks that it is eligible (``CompressScales._eligible``)."""
    from qir.interpreter import RunContext

    assert isinstance(spec.scale, str)
    old = RunContext(module).constant(c.name)
    assert isinstance(old, QTensor)
    values = {ref: np.asarray(module.constant(ref).numpy(), dtype=np.float32)
              for ref in (spec.scale, spec.offset) if isinstance(ref, str)}
    parts = _compressed_params(values, spec, bits)
    if requantize:
        zp = RunContext(module).params(c.type)[1]
        c.data = _requantized(old.dequantize(), spec, {k: v[4] for k, v in parts.items()}, zp,
                              np.asarray(c.numpy()), c.type.dtype)
    for ref, (codes, row, base, dt, _) in parts.items():
        rname = module.fresh_constant_name(f"{ref}.row")
        bname = module.fresh_constant_name(f"{ref}.base")
        module.add_constant(bname, base, type=TensorType.of("f16", [row.shape[0]]), after=ref)
        module.add_constant(rname, row, type=TensorType.of("f16", [row.shape[0]]), after=ref)
        module.constant(ref).type = TensorType.of(dt, list(codes.shape), QuantSpec(axis=0, scale=rname, offset=bname))
        module.constant(ref).data = codes
