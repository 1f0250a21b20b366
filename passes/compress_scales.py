"""The ``compress-scales`` pass: block scales and minimums stored as 8-bit integers against one fp16 scale per row.

``compress-scales{bits=8, requantize=true}``

The K-quant idea for any block format: a weight quantized in groups along its rows (``axis=1, group=g``) carries one
float scale (and, for GGUF's ``_1`` formats, one float minimum, the spec's ``offset``) per group: 32 bits per block
of 32 weights with fp16 scale and minimum, one bit per weight. This pass quantizes those constants per output row,
two-level::

    scale[r, b]  ~  row_scale[r] * sc[r, b]     sc: u8 (i8 when the row holds negative scales), row_scale: f16
    offset[r, b] ~  row_min[r] * mn[r, b]       mn: i8 (symmetric: minimums are negative as often as not)

which halves their cost (Q4_1: 5.0 -> 4.5 bits per weight, plus 32 bits per row). ``bits=4`` stores them as 4-bit
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
    const @w.scale : u8[2,2] q(axis=0, scale=@w.scale.row) = dense(...)
    const @w.scale.row : f16[2] = dense(...)
    const @w.min : i8[2,2] q(axis=0, scale=@w.min.row) = dense(...)
    const @w.min.row : f16[2] = dense(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.dtypes import dtype
from qir.errors import QirError
from qir.graph import Constant, Module
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.quant import QTensor, expand_params
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["CompressScales", "compress_row_params"]


def compress_row_params(values: np.ndarray, bits: int, *, signed: bool | None = None
                        ) -> tuple[np.ndarray, np.ndarray, str]:
    """Quantize ``values [rows, blocks]`` per row: ``(codes, row_scale f16 [rows], dtype name)``.

    Unsigned (``u8``/``u4``, ``row_scale = max / qmax``) when every value is >= 0 and ``signed`` is not True;
    otherwise symmetric signed (``max|v| / qmax``). The codes are rounded against the fp16-rounded row scale, so
    ``row_scale * codes`` is what the interpreter computes. An all-zero row gets row scale 1.
    """
    v = np.asarray(values, dtype=np.float32)
    if signed is None:
        signed = bool(np.any(v < 0))
    dt = dtype(("i" if signed else "u") + str(bits))
    amax = np.max(np.abs(v), axis=1)
    row = np.where(amax > 0, amax / np.float32(dt.qmax), np.float32(1.0)).astype(np.float32)
    row16 = row.astype(np.float16)
    # fp16 rounding may lower the row scale below max/qmax (codes would clip) or flush it to 0: nudge it up.
    tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
    row16 = np.where(row16.astype(np.float32) * dt.qmax < amax, np.nextafter(row16, np.float16(np.inf)), row16)
    row16 = np.maximum(row16, tiny).astype(np.float16)
    codes = np.clip(np.rint(v / row16.astype(np.float32)[:, None]), dt.qmin, dt.qmax)
    return codes.astype(dt.numpy), row16, dt.name


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
        from qir.interpreter import RunContext

        assert isinstance(spec.scale, str)
        old = RunContext(module).constant(c.name)
        assert isinstance(old, QTensor)
        x = old.dequantize() if self.requantize else None
        new_consts: dict[str, tuple[np.ndarray, TensorType]] = {}
        real: dict[str, np.ndarray] = {}
        for ref in (spec.scale, spec.offset):
            if ref is None:
                continue
            vals = np.asarray(module.constant(ref).numpy(), dtype=np.float32)
            codes, row, dt = compress_row_params(vals, self.bits, signed=True if ref == spec.offset else None)
            rname = module.fresh_constant_name(f"{ref}.row")
            new_consts[ref] = (codes, TensorType.of(dt, list(vals.shape), QuantSpec.per_axis(0, rname)))
            new_consts[rname] = (row, TensorType.of("f16", [vals.shape[0]]))
            real[ref] = (codes.astype(np.float32) * row.astype(np.float32)[:, None]).astype(np.float32)
        if x is not None:
            self._requantize(module, c, spec, x, real)
        for ref in (spec.scale, spec.offset):
            if ref is None:
                continue
            codes, t = new_consts[ref]
            rname = t.quant.scale if t.quant is not None else None
            assert isinstance(rname, str)
            row, rt = new_consts[rname]
            module.add_constant(rname, row, type=rt, after=ref)
            module.constant(ref).type = t
            module.constant(ref).data = codes

    @staticmethod
    def _requantize(module: Module, c: Constant, spec: QuantSpec, x: np.ndarray, real: dict[str, np.ndarray]
                    ) -> None:
        """Round the codes again against the compressed parameters (``q' = rint((x - m') / s') + zp``)."""
        from qir.interpreter import RunContext

        shape = tuple(int(d) for d in c.type.shape)
        assert isinstance(spec.scale, str)
        s = expand_params(real[spec.scale], spec, shape)
        off = expand_params(real[spec.offset], spec, shape) if spec.offset is not None else np.float32(0)
        zp = RunContext(module).params(c.type)[1]
        z = expand_params(zp, spec, shape) if zp is not None else np.float32(0)
        d = c.type.dtype
        old = np.asarray(c.numpy())
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((x - off) / s) + z
        q = np.where(s != 0, q, old.astype(np.float64))  # a block whose scale became 0: codes do not matter
        c.data = np.clip(q, d.qmin, d.qmax).astype(d.numpy)
