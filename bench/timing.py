"""Timing one kernel call for the kernel benches (``tvm_kernels.py``, ``tvm_gemm_mlas.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def kernel_ms(repeats: int, median: bool, fn: Callable[..., Any], *args: Any) -> float:
    """Milliseconds of ``fn(*args)``: the best (or, with ``median``, the median) of ``repeats`` calls after two
    warm-ups. The best by default: on a shared 2-core machine a 2-thread kernel stalls whenever either thread is
    descheduled, and the median then measures the neighbours."""
    fn(*args)
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return (statistics.median(times) if median else min(times)) * 1e3
