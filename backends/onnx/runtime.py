"""Running lowered models with ONNX Runtime: providers chosen from what is installed, artifacts loaded by folder.

:func:`available_providers` asks the installed ``onnxruntime`` (the CANN provider appears only with the
``onnxruntime-cann`` wheel; it is never required). :func:`make_session` builds an ``InferenceSession`` for a target
with its session settings, optionally writing the ORT-optimized graph (``optimized_model_filepath``) so the fused
kernels can be inspected (:func:`optimized_op_counts`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError

__all__ = ["RuntimeBackendError", "available_providers", "choose_providers", "make_session",
           "optimized_op_counts", "run_session"]


class RuntimeBackendError(QirError):
    """ONNX Runtime could not load or run an artifact."""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        raise RuntimeBackendError("onnxruntime is not installed (pip install onnxruntime)") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime offers."""
    return list(_ort().get_available_providers())


def choose_providers(wanted: tuple[str, ...] | list[str]) -> list[str]:
    """The target's providers that are installed, in the target's order; CPU is always last as the fallback."""
    have = set(available_providers())
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def make_session(model: str | os.PathLike[str] | bytes, *, providers: list[str] | None = None,
                 threads: int | None = None, session_config: dict[str, str] | None = None,
                 optimized_path: str | os.PathLike[str] | None = None, level: str = "all") -> Any:
    """An ``InferenceSession`` on ``model`` (a path or serialized bytes).

    ``threads``: intra-op threads (None: ORT's default). ``session_config``: ``add_session_config_entry`` pairs.
    ``optimized_path``: where ORT writes the graph after its optimizations. ``level``: ``"all"``, ``"extended"``,
    ``"basic"`` or ``"none"``.
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        where = "the model" if isinstance(model, bytes) else str(model)
        raise RuntimeBackendError(f"onnxruntime cannot load {where}: {exc}") from None


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on ``feeds`` (by input name); raises :class:`RuntimeBackendError` naming the inputs."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise RuntimeBackendError(f"the model takes inputs {names}; missing {missing}")
    try:
        return list(session.run(None, {n: feeds[n] for n in names}))
    except Exception as exc:  # noqa: BLE001
        raise RuntimeBackendError(f"onnxruntime failed: {exc}") from None


def optimized_op_counts(model_path: str | os.PathLike[str], **session_kw: Any) -> dict[str, int]:
    """Op types (``domain:op`` for contrib ops) in the graph ORT runs after its optimizations."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(model_path, optimized_path=out, **session_kw)
        m = onnx.load(str(out), load_external_data=False)
    return dict(Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                        for n in m.graph.node).most_common())
