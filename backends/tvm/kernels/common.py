"""Small helpers shared by the kernel builders: dims that may be dynamic, the f32 GEMM register tile."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx

from qir.backends.tvm.kernels.cpu_features import CpuFeatures

Dim = int | tirx.Var


def is_static_one(m: Dim) -> bool:
    """True when ``m`` is the literal 1 (a decode step): such kernels get the GEMV schedule."""
    return isinstance(m, int) and m == 1


def check_dims(op: str, **dims: Dim) -> None:
    """Reject non-positive static dims early, with the name of the dim (TVM's own error is obscure)."""
    for name, d in dims.items():
        if isinstance(d, int) and d <= 0:
            raise ValueError(f"{op}: {name} must be a positive int or a tvm.tir.Var, got {d}")
        if not isinstance(d, int | tirx.Var):
            raise ValueError(f"{op}: {name} must be an int or a tvm.tir.Var, got {type(d).__name__}")


@dataclass(frozen=True)
class F32Tile:
    """Register tile of an f32 GEMM: ``mr`` rows x ``nr`` columns of accumulators.

    ``nr`` is two vectors wide, ``mr`` fills about half the vector registers with accumulators (16
    on AVX-512's 32 zmm, 8-12 on 16-register ISAs), leaving room for the B vectors and broadcasts.
    """

    mr: int
    nr: int


def f32_tile(feat: CpuFeatures) -> F32Tile:
    if feat.arch == "x86" and feat.avx512:
        return F32Tile(mr=8, nr=32)
    if feat.arch == "x86" and feat.avx2:
        return F32Tile(mr=4, nr=16)
    return F32Tile(mr=4, nr=8)


def target_of(target: tvm.target.Target | str | dict) -> tvm.target.Target:
    """Accept a ``Target``, a target dict or a target string."""
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
