"""A test helper shared by the backend tests: add a weight to a module quantized with ``qir.quant``'s rules."""

from __future__ import annotations

import numpy as np

import qir
from qir import quant
from qir.types import TensorType


def add_quantized_weight(m: qir.Module, name: str, w: np.ndarray, dt: str, **kw: object) -> qir.graph.Value:
    """``w`` as codes of ``dt`` (options as :func:`qir.quant.choose_params`), with its scale and zero point
    constants (``<name>.scale``, ``<name>.zp``) when the spec is not per tensor; returns the codes constant."""
    spec, scale, zp = quant.choose_params(w, dt, scale_name=f"{name}.scale", zero_point_name=f"{name}.zp", **kw)
    codes = quant.quantize_spec(w, spec, dt, scale, zp).codes
    if spec.axis is not None:
        m.add_constant(f"{name}.scale", scale)
        if zp is not None:
            m.add_constant(f"{name}.zp", zp.astype(qir.dtypes.dtype(dt).numpy))
    return m.add_constant(name, codes, type=TensorType.of(dt, codes.shape, spec))
