"""Error statistics of one tensor against a reference, accumulated over several runs.

:class:`TensorStats` keeps running sums (float64) so a tensor seen in several windows or batches is summarized
without keeping any of its arrays: signal power of the reference, power of the error, the dot product and norms
for the cosine, the largest absolute error, and for integer tensors how many elements were exactly equal.

Definitions (``a`` the reference side, ``b`` the side under test, over all elements of all runs)::

    sqnr_db     = 10 log10(sum a^2 / sum (a - b)^2)      inf when b == a everywhere
    cosine      = sum a b / sqrt(sum a^2 * sum b^2)       1 when both are all zeros
    max_abs_err = max |a - b|

Quantized runtime values (:class:`qir.quant.QTensor`) are compared by their real values (dequantized) when the
other side is float, and by their integer codes when both sides hold codes (a ``.qir`` against the ONNX artifact
lowered from it: those must be equal, element for element).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qir.quant import QTensor

__all__ = ["TensorStats", "as_arrays"]


def as_arrays(value: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """``(integer codes or None, real values)`` of a runtime value (array or :class:`QTensor`).

    For a plain integer or boolean array the codes are the array itself and the real values its float64 cast.
    """
    if isinstance(value, QTensor):
        return np.asarray(value.codes), np.asarray(value.dequantize(), dtype=np.float64)
    arr = np.asarray(value)
    if arr.dtype.kind in "iub":
        return arr, arr.astype(np.float64)
    return None, arr.astype(np.float64)


@dataclass
class TensorStats:
    """Running comparison of one named tensor; :meth:`add` one pair of runtime values per run."""

    name: str
    elements: int = 0
    signal: float = 0.0  # sum a^2
    noise: float = 0.0   # sum (a - b)^2
    dot: float = 0.0
    norm_b: float = 0.0  # sum b^2
    max_abs_err: float = 0.0
    integer: bool = False  # both sides hold integer codes
    exact_elements: int = 0
    max_code_diff: int = 0  # largest |code_a - code_b| (1: a rounding tie broken differently)
    shape_mismatch: str | None = None
    nonfinite: int = 0  # elements where either side is NaN/inf (left out of the sums)

    def add(self, a: Any, b: Any) -> None:
        qa, qb = isinstance(a, QTensor), isinstance(b, QTensor)
        codes_a, real_a = as_arrays(a)
        codes_b, real_b = as_arrays(b)
        if qa and not qb and codes_b is not None:
            # An artifact hands a quantized value over as its bare codes: read them with the .qir side's parameters.
            b = QTensor(_same_storage(codes_b, codes_a.dtype), a.scale, a.zero_point, a.spec)
            codes_b, real_b = as_arrays(b)
        elif qb and not qa and codes_a is not None:
            a = QTensor(_same_storage(codes_a, codes_b.dtype), b.scale, b.zero_point, b.spec)
            codes_a, real_a = as_arrays(a)
        if codes_a is not None and codes_b is not None:
            self.integer = True
            if codes_a.shape == codes_b.shape:
                diff = np.abs(codes_a.astype(np.int64) - codes_b.astype(np.int64))
                self.exact_elements += int(diff.size - np.count_nonzero(diff))
                if diff.size:
                    self.max_code_diff = max(self.max_code_diff, int(diff.max()))
        if real_a.shape != real_b.shape:
            self.shape_mismatch = f"{list(real_a.shape)} vs {list(real_b.shape)}"
            return
        finite = np.isfinite(real_a) & np.isfinite(real_b)
        bad = int(finite.size - np.count_nonzero(finite))
        if bad:
            self.nonfinite += bad
            real_a, real_b = real_a[finite], real_b[finite]
        err = real_a - real_b
        self.elements += int(real_a.size)
        self.signal += float(np.dot(real_a.ravel(), real_a.ravel()))
        self.noise += float(np.dot(err.ravel(), err.ravel()))
        self.dot += float(np.dot(real_a.ravel(), real_b.ravel()))
        self.norm_b += float(np.dot(real_b.ravel(), real_b.ravel()))
        if err.size:
            self.max_abs_err = max(self.max_abs_err, float(np.max(np.abs(err))))

    # -- results --------------------------------------------------------------------------------------------
    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        if self.signal == 0.0 and self.norm_b == 0.0:
            return 1.0
        den = math.sqrt(self.signal * self.norm_b)
        return self.dot / den if den > 0 else 0.0

    @property
    def nsr(self) -> float:
        """Noise-to-signal power ratio (linear): 0 when equal, inf when the reference is all zeros and b is not."""
        if self.noise == 0.0:
            return 0.0
        return math.inf if self.signal == 0.0 else self.noise / self.signal

    @property
    def exact(self) -> bool | None:
        """For integer tensors: were all elements equal? None for float tensors."""
        if not self.integer:
            return None
        return self.shape_mismatch is None and self.exact_elements == self.elements and self.nonfinite == 0


def _same_storage(codes: np.ndarray, want: np.dtype) -> np.ndarray:
    """Codes stored as int8 where the qir type is uint8 (``act_i8``: zero point moved by 128) read back as uint8."""
    if codes.dtype == want:
        return codes
    if want == np.uint8 and codes.dtype == np.int8:
        return (codes.astype(np.int16) + 128).astype(np.uint8)
    if want == np.int8 and codes.dtype == np.uint8:
        return (codes.astype(np.int16) - 128).astype(np.int8)
    return codes
