"""Element types of qir tensors.

A :class:`DType` says how many bits an element takes, whether it is a float,
a signed or an unsigned integer, and (for integers) its representable range.
Sub-byte integers (``i4``, ``u4``, ``i2``, ``u2``) are *logical* elements: in
memory the interpreter holds them one per byte (as ``ml_dtypes`` int4/int2
arrays); packing several to a byte happens only when they are serialized or
lowered to a backend.

The instances are module-level singletons (``f32``, ``i8``, ...); compare them
with ``==`` or ``is``. :func:`dtype` turns a name (``"i8"``) into the instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

from qir.errors import QirError

Kind = Literal["float", "int", "uint", "bool"]


@dataclass(frozen=True)
class DType:
    """An element type: ``name`` as printed in the IR, bit width and kind."""

    name: str
    bits: int
    kind: Kind

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_integer(self) -> bool:
        return self.kind in ("int", "uint")

    @property
    def is_signed(self) -> bool:
        return self.kind in ("int", "float")

    @property
    def is_subbyte(self) -> bool:
        return self.is_integer and self.bits < 8

    @property
    def qmin(self) -> int:
        """Smallest representable integer (integers only)."""
        self._require_integer("qmin")
        return -(1 << (self.bits - 1)) if self.kind == "int" else 0

    @property
    def qmax(self) -> int:
        """Largest representable integer (integers only)."""
        self._require_integer("qmax")
        return (1 << (self.bits - 1)) - 1 if self.kind == "int" else (1 << self.bits) - 1

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype the interpreter uses to hold one element."""
        return np.dtype(_NUMPY[self.name])

    def _require_integer(self, what: str) -> None:
        if not self.is_integer:
            raise QirError(f"{what} is defined only for integer dtypes, not {self.name}")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"qir.{self.name}"


f64 = DType("f64", 64, "float")
f32 = DType("f32", 32, "float")
f16 = DType("f16", 16, "float")
bf16 = DType("bf16", 16, "float")
i64 = DType("i64", 64, "int")
i32 = DType("i32", 32, "int")
i16 = DType("i16", 16, "int")
i8 = DType("i8", 8, "int")
u8 = DType("u8", 8, "uint")
i4 = DType("i4", 4, "int")
u4 = DType("u4", 4, "uint")
i2 = DType("i2", 2, "int")
u2 = DType("u2", 2, "uint")
boolean = DType("bool", 8, "bool")

ALL_DTYPES: tuple[DType, ...] = (f64, f32, f16, bf16, i64, i32, i16, i8, u8, i4, u4, i2, u2, boolean)
"""Every dtype qir knows, in the order the docs list them."""

QUANT_STORAGE_DTYPES: tuple[DType, ...] = (i32, i16, i8, u8, i4, u4, i2, u2)
"""Integer dtypes a quantized tensor may be stored in."""

_BY_NAME: dict[str, DType] = {d.name: d for d in ALL_DTYPES}

_NUMPY: dict[str, object] = {
    "f64": np.float64, "f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16,
    "i64": np.int64, "i32": np.int32, "i16": np.int16, "i8": np.int8, "u8": np.uint8,
    "i4": ml_dtypes.int4, "u4": ml_dtypes.uint4, "i2": ml_dtypes.int2, "u2": ml_dtypes.uint2,
    "bool": np.bool_,
}


def dtype(value: str | DType) -> DType:
    """Return the :class:`DType` named ``value`` (``"i8"``, ``"f32"``...); a DType passes through."""
    if isinstance(value, DType):
        return value
    try:
        return _BY_NAME[value]
    except (KeyError, TypeError):
        known = ", ".join(_BY_NAME)
        raise QirError(f"unknown dtype {value!r}; known dtypes: {known}") from None


def from_numpy(dt: np.dtype | type) -> DType:
    """The qir dtype of a numpy dtype (raises for dtypes qir does not represent)."""
    npdt = np.dtype(dt)
    for name, candidate in _NUMPY.items():
        if np.dtype(candidate) == npdt:
            return _BY_NAME[name]
    raise QirError(f"numpy dtype {npdt} has no qir equivalent")
