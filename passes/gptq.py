"""The GPTQ solver (Frantar et al., 2022): weight rounding that compensates its own error using input statistics.

``quantize{rounding=gptq}`` uses it for every ``linear`` it turns into ``qmatmul`` (except the tied
embedding/head table, which the embedding lookup also reads and which is rounded to nearest).

Algorithm, for a weight ``W [N, K]`` fed by inputs ``x [.., K]``:

1. ``H = 2/n * sum(x^T x)`` over all ``n`` rows of every calibration feed (:class:`HessianAccumulator`;
   accumulated in float64; memory K x K per distinct input value, shared by the q/k/v projections).
2. Columns whose inputs were always 0 (``H[i, i] == 0``) are zeroed and get ``H[i, i] = 1``.
   Dampening: ``H += damp * mean(diag(H)) * I``.
3. ``U = cholesky(H^-1)`` (upper, ``H^-1 = U^T U``), computed as the Cholesky factor of the inverse
   obtained from ``H``'s own Cholesky factor.
4. Columns are processed in blocks of ``block`` (rounded to a multiple of the group size, so a group
   never straddles two blocks). Within a block, column by column::

       q      = quantize(w[:, j])        with the scale of the column's group (per channel: fixed
                                          up front from the original W; per group: computed when the
                                          group starts, from the current, error-updated weights)
       err    = (w[:, j] - dequantize(q)) / U[j, j]
       W[:, j:block_end] -= err * U[j, j:block_end]      (the rest of the block sees the error now)

   and after the block, ``W[:, block_end:] -= Err_block @ U[block, block_end:]`` (lazy batch update).

The returned codes, scales and zero points follow :mod:`qir.quant` exactly (``q = clamp(rint(w/s) + zp)``,
f32 division), so they mean what the IR says they mean.

``minimum=True`` (both solvers; unsigned codes) replaces the integer zero point by a float **minimum** per group,
llama.cpp's ``Q4_1`` convention and the spec's ``offset``: ``s = (max - min) / qmax``, ``q = clamp(rint((w - min)
/ s))``, ``w ~ s*q + min``. The range is the group's own -- not widened to contain 0, as an integer zero point
needs -- so no code is spent on values the group does not hold; the third returned array is then the minimum.
"""

from __future__ import annotations

import numpy as np

from qir import quant
from qir.dtypes import DType, dtype
from qir.errors import QirError
from qir.graph import Module
from qir.quantspec import QuantSpec

__all__ = ["SINK_WEIGHT", "HessianAccumulator", "gptq_quantize", "rtn_quantize", "sink_weight"]


SINK_WEIGHT = 16.0
"""How many times GPTQ counts the first position of each calibration sequence in ``H`` for a causal LM.

The first token of an LLM's sequence is its *attention sink*: its hidden state is an outlier (a few huge
features), and most heads put most of their attention on it, so its value vector is in nearly every attention
output. Plain GPTQ weighs it as 1 row in 512 and pushes rounding error into exactly the directions only it
excites: on SmolLM2-135M (w4a16 g128 asymmetric, 16 calibration windows of 512 tokens, ppl on 8 windows of GPL-3,
float 24.93) GPTQ was worse than round-to-nearest (32.93 vs 31.36), because of the value and output projections
(GPTQ everywhere but there: 29.07). Counting the sink row W0 times: W0=16 27.78, 64 28.52, 256 28.99, 2048 33.83.
``quantize`` / ``mixed-precision`` use this for modules with a ``decode`` function (causal LMs; ``sink=0``, the
default, means that choice) and 1 otherwise: an encoder's first position ([CLS]) was not measured to need it.
"""


def sink_weight(module: Module, option: float, owner: str) -> float:
    """The ``sink`` option resolved: ``0`` -> :data:`SINK_WEIGHT` for a causal LM (a ``decode`` function), else 1."""
    if option == 0:
        return SINK_WEIGHT if "decode" in module.functions else 1.0
    if option < 1:
        raise QirError(f"{owner}: sink must be 0 (automatic) or >= 1 (how many times GPTQ counts each calibration "
                       f"sequence's first position), got {option}")
    return float(option)


class HessianAccumulator:
    """Running ``sum(x^T x)`` (float64, K x K) and row count of one input value."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.xtx = np.zeros((k, k), dtype=np.float64)
        self.rows = 0
        self.final = False  # True once hessian() has scaled xtx in place

    def add(self, x: np.ndarray, *, first_weight: float = 1.0) -> None:
        """Add the rows of ``x [..., K]``. ``first_weight``: the rows at sequence position 0 (``x[..., 0, :]`` of a
        ``[batch, seq, K]`` input) count this many times (see :data:`SINK_WEIGHT`); the row count is unchanged."""
        if self.final:
            raise QirError("GPTQ: this accumulator was already turned into a Hessian; start a new one")
        a = np.asarray(x)
        if a.shape[-1] != self.k:
            raise QirError(f"GPTQ: an input has {a.shape[-1]} features, expected {self.k}")
        rows = a.reshape(-1, self.k).astype(np.float64)
        self.xtx += rows.T @ rows
        self.rows += rows.shape[0]
        if first_weight != 1.0 and a.ndim >= 3:
            first = a[..., 0, :].reshape(-1, self.k).astype(np.float64)
            self.xtx += (first_weight - 1.0) * (first.T @ first)

    def merge(self, other: HessianAccumulator) -> None:
        if self.final or other.final:
            raise QirError("GPTQ: cannot merge an accumulator that was already turned into a Hessian")
        self.xtx += other.xtx
        self.rows += other.rows

    def hessian(self) -> np.ndarray:
        """``2/n * sum(x^T x)``, computed in place (the accumulator is spent afterwards: no second K x K copy)."""
        if not self.final:
            self.xtx *= 2.0 / max(self.rows, 1)
            self.final = True
        return self.xtx


def _params(lo: np.ndarray, hi: np.ndarray, dt: DType, symmetric: bool, minimum: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(scale, zero point)`` of each range, or ``(scale, minimum)`` with ``minimum=True`` (see the docstring)."""
    if minimum:
        return quant.params_with_minimum(lo, hi, dt)
    lo = np.minimum(lo, 0.0).astype(np.float32)
    hi = np.maximum(hi, 0.0).astype(np.float32)
    scale, zp = quant.params_from_range(lo, hi, dt, symmetric=symmetric)
    return scale.astype(np.float32), None if zp is None else zp.astype(np.int32)


def _check_clip(clip: str, minimum: bool = False) -> None:
    if clip not in ("minmax", "mse"):
        raise QirError(f"clip must be 'minmax' or 'mse', got {clip!r}")
    if clip == "mse" and minimum:
        raise QirError("clip='mse' chooses integer zero points; it does not combine with minimum=True")


def _quantize_column(w: np.ndarray, scale: np.ndarray, third: np.ndarray | None, d: DType, minimum: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Codes of one column (or block) and the values they stand for, with a zero point or a minimum."""
    if minimum:
        assert third is not None
        q = quant.quantize(w.astype(np.float32) - third, scale, None, d).astype(np.int32)
        return q, scale.astype(np.float64) * q + third
    q = quant.quantize(w.astype(np.float32), scale, third, d).astype(np.int32)
    return q, scale.astype(np.float64) * (q - (0 if third is None else third))


def rtn_quantize(w: np.ndarray, dt: str | DType, *, group: int | None, symmetric: bool, axis: int = 0,
                 minimum: bool = False, clip: str = "minmax") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest ``(codes, scale, zero_point or minimum)``: per row (``group=None``) or per group on axis 1.

    ``clip="mse"`` clips each row's / group's range for the least squared error (:func:`qir.quant.choose_params_mse`)
    instead of using its min/max.
    """
    d = dtype(dt)
    _check_clip(clip, minimum)
    if minimum:
        probe = QuantSpec(axis=axis if group is None else 1, group_size=group, dynamic=True).normalized(w.ndim)
        scale, low = quant.params_with_minimum(quant.reduce_groups(w, probe, "min"),
                                               quant.reduce_groups(w, probe, "max"), d)
        codes = quant.quantize(np.asarray(w, np.float32) - quant.expand_params(low, probe, w.shape),
                               quant.expand_params(scale, probe, w.shape), None, d)
        return codes, scale, low
    choose = quant.choose_params_mse if clip == "mse" else quant.choose_params
    if group is None:
        spec, scale, zp = choose(w, d, symmetric=symmetric, axis=axis)
    else:
        spec, scale, zp = choose(w, d, symmetric=symmetric, axis=1, group_size=group)
    codes = quant.quantize_spec(w, spec, d, scale, zp).codes
    return codes, scale, zp


def gptq_quantize(w: np.ndarray, h: np.ndarray, dt: str | DType, *, group: int | None, symmetric: bool,
                  damp: float = 0.01, block: int = 128, minimum: bool = False, clip: str = "minmax",
                  act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ ``(codes, scale, zero_point or minimum)`` of ``w [N, K]`` given ``h [K, K]`` (see the module docstring).

    ``group=None``: one scale per output row (shape ``[N]``); else per group of ``group`` input columns
    (shape ``[N, ceil(K/group)]``, the last group padded as in :mod:`qir.quant`). ``clip="mse"`` chooses each
    scale (per row up front, per group when the group starts) with :func:`qir.quant.choose_params_mse` instead of
    the min/max range: on MiniLM's linears at 4 bits per row the sentence cosine goes from 0.905 to 0.943 (RTN).
    """
    _check_clip(clip, minimum)

    def params(cur: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if clip == "mse":
            _, s, z = quant.choose_params_mse(cur.astype(np.float32), d, symmetric=symmetric, axis=0)
            return s.astype(np.float32), None if z is None else z.astype(np.int32)
        return _params(cur.min(axis=1), cur.max(axis=1), d, symmetric, minimum)

    import scipy.linalg  # only GPTQ needs it; keep `import qir.passes` light

    d = dtype(dt)
    weights = np.asarray(w, dtype=np.float64)
    if weights.ndim != 2:
        raise QirError(f"GPTQ needs a 2-D [out, in] weight, got shape {list(weights.shape)}")
    n, k = weights.shape
    hess = np.array(h, dtype=np.float64, copy=True)
    if hess.shape != (k, k):
        raise QirError(f"GPTQ: the Hessian is {list(hess.shape)}, expected [{k}, {k}]")
    if damp < 0:
        raise QirError(f"GPTQ: damp must be >= 0, got {damp}")
    if block < 1:
        raise QirError(f"GPTQ: block must be >= 1, got {block}")
    W = weights.copy()
    dead = np.diag(hess) == 0
    hess[dead, dead] = 1.0
    W[:, dead] = 0.0
    static: tuple[np.ndarray, np.ndarray | None] | None = None
    if act_order and group is not None:
        # static groups: each group's parameters from the original weights, before any column moves
        if group <= 0:
            raise QirError(f"GPTQ: group must be > 0, got {group}")
        parts = [params(W[:, g0:g0 + group]) for g0 in range(0, k, group)]
        static = (np.stack([p[0] for p in parts], axis=1),
                  None if parts[0][1] is None else np.stack([p[1] for p in parts], axis=1))  # type: ignore[misc]
    perm = np.argsort(-np.diag(hess), kind="stable") if act_order else np.arange(k)
    W = W[:, perm]
    hess = hess[np.ix_(perm, perm)]
    hess[np.diag_indices(k)] += damp * float(np.mean(np.diag(hess)))
    try:
        chol = scipy.linalg.cholesky(hess, lower=True)
        hinv = scipy.linalg.cho_solve((chol, True), np.eye(k))
        U = scipy.linalg.cholesky(hinv, lower=False)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise QirError(f"GPTQ: the input Hessian is not positive definite even after dampening ({exc}); "
                       "raise quantize's damp option (e.g. damp=0.1) or calibrate on more data") from None

    if static is not None:
        scale, zp = static
    elif group is not None:
        if group <= 0:
            raise QirError(f"GPTQ: group must be > 0, got {group}")
        block = max(1, block // group) * group
        ngroups = -(-k // group)
        scale = np.zeros((n, ngroups), dtype=np.float32)
        zp: np.ndarray | None = (np.zeros((n, ngroups), dtype=np.float32) if minimum
                                 else None if symmetric else np.zeros((n, ngroups), dtype=np.int32))
        s_col = np.ones(n, np.float32)
        z_col: np.ndarray | None = None
    else:
        scale, zp = params(W)
        s_col, z_col = scale, zp

    codes = np.zeros((n, k), dtype=np.int32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2]  # a view: updates inside the block land in W
        U1 = U[i1:i2, i1:i2]
        err_block = np.zeros((n, i2 - i1), dtype=np.float64)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:  # act-order: the column's own (static) group
                g = int(perm[col]) // group  # type: ignore[operator]
                s_col = static[0][:, g]
                z_col = None if static[1] is None else static[1][:, g]
            elif group is not None and col % group == 0:
                g = col // group
                cur = W[:, col:col + group]  # inside this block: every earlier error already applied
                s_col, z_col = params(cur)
                scale[:, g] = s_col
                if zp is not None and z_col is not None:
                    zp[:, g] = z_col
            wcol = W1[:, i]
            q, deq = _quantize_column(wcol, s_col, z_col, d, minimum)
            codes[:, col] = q
            err = (wcol - deq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            err_block[:, i] = err
        if i2 < k:
            W[:, i2:] -= err_block @ U[i1:i2, i2:]
    if act_order:
        codes[:, perm] = codes.copy()  # back to the natural column order
    return codes.astype(d.numpy), scale, zp
