"""Timing helpers for the benches: one kernel call (``tvm_kernels.py``, ``tvm_gemm_mlas.py``), and one system run
alone in a fresh process (``decode_vs_llamacpp.py``, ``smollm2_tvm.py``)."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned interpreter, nothing else loaded. Thread pools that spin after their run
    (llama.cpp's, PyTorch's OpenMP) slow down every other runtime in the same process: each system is timed alone."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
