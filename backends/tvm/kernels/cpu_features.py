"""What a TVM ``llvm`` target's CPU can do, as the kernels' schedules need it.

The answer comes from LLVM for the TARGET's ``mtriple``/``mcpu``/``mattr`` (never from the build
machine): a library compiled for ``znver3`` must not contain AVX-512 even when built on a Zen 4/5 host,
and a cross-compiled AArch64 library has nothing to do with the host at all. A target with no ``mcpu``
is generic x86-64 (SSE2 only): the schedules still apply, with 128-bit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set facts the schedules branch on."""

    arch: str  # "x86", "aarch64" or "other"
    avx2: bool
    avx512: bool  # avx512f + avx512bw: 512-bit vectors with byte/word ops
    vnni: bool  # AVX512-VNNI: vpdpbusd (u8 x s8 -> s32, four-way)
    dotprod: bool  # AArch64 +dotprod: sdot/udot
    f32_lanes: int  # f32 elements in one native vector register

    @property
    def int8_path(self) -> str:
        """The int8 dot-product kernel these features select: ``vnni``, ``sdot`` or ``generic``."""
        if self.vnni:
            return "vnni"
        if self.dotprod:
            return "sdot"
        return "generic"


def _has(feature: str, target: tvm.target.Target) -> bool:
    try:
        return bool(codegen.llvm_cpu_has_features(feature, target))
    except tvm.TVMError:  # feature unknown to this triple's LLVM backend
        return False


def features_of(target: tvm.target.Target) -> CpuFeatures | None:
    """The CPU features of an ``llvm`` target, or ``None`` for any other kind (CUDA, ...)."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        dot = _has("dotprod", target)
        return CpuFeatures("aarch64", False, False, False, dot, 4)
    if triple.startswith(("x86_64", "i686", "i386")):
        avx2 = _has("avx2", target)
        avx512 = _has("avx512f", target) and _has("avx512bw", target)
        vnni = avx512 and _has("avx512vnni", target)
        lanes = 16 if avx512 else 8 if avx2 else 4
        return CpuFeatures("x86", avx2, avx512, vnni, False, lanes)
    return CpuFeatures("other", False, False, False, False, 4)
