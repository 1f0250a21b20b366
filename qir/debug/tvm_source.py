"""A ``tvm-*`` artifact folder as a :class:`~qir.debug.sources.TensorSource` for ``qir debug compare``.

``model.so`` fuses ops, so its intermediates cannot be read; instead the artifact's own module is rebuilt
(:class:`qir.backends.tvm.debug_build.DebugBuild`: ``module.qir`` + ``params.safetensors``, lowered again for the
recorded target and checked against the recorded Relax hash) and compiled once, cut into pieces that each return
``chunk`` wanted bindings; the weights are the artifact's ``params.safetensors``. The values the artifact computes
are the qir values its lowering emitted under a name (``report.json`` ``functions.<f>.names``); a quantized value
is handed over as its integer codes, which the comparison reads with the other side's scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qir.debug.sources import DebugError, QirSource, Sink

__all__ = ["TvmSource"]


class TvmSource:
    """The ``prefill`` (causal LMs) or first function of a TVM artifact, rebuilt to hand over intermediates."""

    def __init__(self, folder: str | Path, *, chunk: int = 64, label: str | None = None) -> None:
        from qir.backends.compile import load_artifact
        from qir.backends.tvm.debug_build import DebugBuild
        from qir.errors import QirError

        self.folder = Path(folder)
        try:
            self.artifact = load_artifact(self.folder)
            self.build = DebugBuild(self.folder)
        except QirError as exc:
            raise DebugError(str(exc)) from None
        self.kind = self.artifact.kind
        self.source = self.artifact.source
        self.label = label or str(folder)
        self.chunk = max(1, int(chunk))
        funcs = self.artifact.report["functions"]
        self.function = "prefill" if "prefill" in funcs else next(iter(funcs))
        # The qir function gives the graph (reads, weights); the artifact computes the values it has a name for.
        self._graph = QirSource(self.build.module, kind=self.kind, function=self.function)
        self._named = funcs[self.function].get("names", {})

    @property
    def tokenizer(self) -> Any:
        return self.artifact.tokenizer

    def input_names(self) -> list[str]:
        return self._graph.input_names()

    def value_names(self) -> list[str]:
        return [n for n in self._graph.value_names() if n in self._named]

    def inputs_of(self) -> dict[str, list[str]]:
        return self._graph.inputs_of()

    def constants_of(self) -> dict[str, list[str]]:
        return self._graph.constants_of()

    def stream(self, feed: dict[str, np.ndarray], wanted: set[str], sink: Sink) -> None:
        inputs = set(self.input_names())
        names = [n for n in self.value_names() if n in wanted]
        for n in names:
            if n in inputs:
                sink(n, np.asarray(feed[n]))
        self.build.stream(self.function, feed, [n for n in names if n not in inputs], sink, chunk=self.chunk)
