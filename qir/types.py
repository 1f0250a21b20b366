"""Tensor types: element dtype, shape (ints or symbolic sizes) and an optional quantization spec.

``TensorType`` is frozen and hashable; passes build new types with
:meth:`TensorType.with_quant`, :meth:`TensorType.with_shape` and friends. Its
``str`` is the canonical IR text (``i4[1536,576] q(axis=1, group=32, scale=@w.scale)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from qir.dtypes import DType, dtype
from qir.errors import QirError, QuantError
from qir.quantspec import QuantSpec, format_quant
from qir.shapes import Dim, Shape, dim, format_shape, is_static


@dataclass(frozen=True)
class TensorType:
    """``dtype[shape]`` plus, for quantized tensors, the :class:`QuantSpec` that gives its meaning."""

    dtype: DType
    shape: Shape
    quant: QuantSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(dim(d) for d in self.shape))
        if self.quant is not None:
            try:
                q = self.quant.normalized(len(self.shape))
                q.check(self.dtype, self.shape)
            except QuantError as exc:
                raise QuantError(f"invalid quantized type {self.dtype}{format_shape(self.shape)}: {exc}") from None
            object.__setattr__(self, "quant", q)

    @staticmethod
    def of(dt: str | DType, shape: Iterable[int | str | Dim], quant: QuantSpec | None = None) -> TensorType:
        """Convenience constructor: ``TensorType.of("f32", [1, "seq", 576])``."""
        return TensorType(dtype(dt), tuple(dim(d) for d in shape), quant)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    @property
    def is_static(self) -> bool:
        return is_static(self.shape)

    def numel(self) -> int:
        """Element count (raises for symbolic shapes)."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise QirError(f"{self} has a symbolic size; its element count is not a number")
            n *= d
        return n

    def nbytes(self) -> int:
        """Bytes of the stored elements, sub-byte elements packed (scales not included)."""
        return (self.numel() * self.dtype.bits + 7) // 8

    def with_quant(self, quant: QuantSpec | None) -> TensorType:
        return replace(self, quant=quant)

    def with_dtype(self, dt: str | DType) -> TensorType:
        return replace(self, dtype=dtype(dt))

    def with_shape(self, shape: Iterable[int | str | Dim]) -> TensorType:
        return replace(self, shape=tuple(dim(d) for d in shape))

    def __str__(self) -> str:
        return format_type(self)


def format_type(t: TensorType) -> str:
    """Canonical text of a type."""
    text = f"{t.dtype.name}{format_shape(t.shape)}"
    if t.quant is not None:
        text += " " + format_quant(t.quant)
    return text
