"""Vectorizable f32 ``exp``, ``erf`` and ``gelu`` as TIR expressions (polynomials, no library calls).

Why: TVM lowers ``tirx.exp`` / ``tirx.erf`` to LLVM's ``llvm.exp`` / ``erff``, which the x86 backend turns into one
scalar libm call per lane, so a "vectorized" softmax or GELU runs at scalar speed (GELU alone was 16% of MiniLM
w8a8 on ``tvm-llvm``). These builders take and return a ``PrimExpr`` (scalar or vector lanes alike), so they work
in TE computes and in TVMScript kernels (passed in through ``extra_vars``).

Accuracy (checked against numpy in ``tests/test_tvm_fastpath.py``): ``fast_exp`` within 2 ulp on [-87, 88]
(Cody-Waite reduction by ln 2 in two parts, then a degree-7 polynomial; inputs below -87.3 give 0 up to a tiny
normal, ``-inf`` gives exactly 0 through the callers' explicit masks); ``fast_erf`` within 3e-7 absolute (the
rational approximation Eigen and TVM's ``fast_erf`` use, clamped to [-4, 4] where erf is 1 to f32 precision).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

__all__ = ["fast_exp", "fast_erf", "gelu_erf"]

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375          # ln 2 split so that n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1, 1.0, 1.0)  # Cephes expf, highest degree first

_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)


def _c(v: float) -> Any:
    return tirx.const(v, "float32")


def _horner(x: Any, coefs: tuple[float, ...]) -> Any:
    acc = _c(coefs[0])
    for c in coefs[1:]:
        acc = acc * x + _c(c)
    return acc


def fast_exp(x: Any) -> Any:
    """``exp(x)`` for f32 ``x``: ``2^n * P(r)`` with ``x = n ln2 + r``, ``|r| <= ln2 / 2``."""
    x = tirx.max(tirx.min(x, _c(88.3762626647949)), _c(-87.3365447506))
    n = tirx.floor(x * _c(_LOG2E) + _c(0.5))
    r = x - n * _c(_LN2_HI)
    r = r - n * _c(_LN2_LO)
    p = _horner(r, _EXP_POLY)
    two_n = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return p * two_n


def fast_erf(x: Any) -> Any:
    """``erf(x)`` for f32 ``x``: an odd rational function of ``x`` on [-4, 4] (erf is +-1 in f32 outside)."""
    x = tirx.max(tirx.min(x, _c(4.0)), _c(-4.0))
    x2 = x * x
    return x * _horner(x2, _ERF_ALPHA) / _horner(x2, _ERF_BETA)


def gelu_erf(x: Any) -> Any:
    """qir's exact ``gelu``: ``0.5 * x * (1 + erf(x / sqrt 2))``."""
    return _c(0.5) * x * (_c(1.0) + fast_erf(x * _c(0.7071067811865476)))
