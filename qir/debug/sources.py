"""Things that compute a model and can hand over their intermediate tensors by IR value name.

:class:`TensorSource` is the protocol ``qir debug compare`` needs from each side: the names of the values it
computes (graph order), which named values each of them is computed from, and :meth:`TensorSource.stream`, which
runs the model on one feed and hands each wanted tensor to a callback as soon as it exists (so nothing has to be
kept). Two implementations live here:

* :class:`QirSource` -- a qir module run by the reference interpreter (its observer hook);
* :class:`OrtSource` -- an ``ort-*`` artifact folder run by ONNX Runtime. The lowering keeps every qir value's name
  as the ONNX value name, so the wanted names are added as extra graph outputs of a copy of the model, ``chunk``
  names per session run (ORT returns all outputs of a run together; chunks bound the memory).

* :class:`qir.debug.tvm_source.TvmSource` -- a ``tvm-*`` artifact folder: its module rebuilt so that the wanted
  bindings are outputs (one debug build, run in pieces of ``chunk`` names).

A backend with another runtime plugs in with :func:`register_artifact_source` (target-name prefix -> factory
taking the folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qir.errors import QirError

__all__ = ["ArtifactFactory", "OrtSource", "QirSource", "Sink", "TensorSource", "open_source",
           "register_artifact_source"]

Sink = Callable[[str, Any], None]

#: How the ONNX lowering names the uint8 form (codes + 128) of a symmetric int8 activation (``act_u8``).
U8_SUFFIX = "::u8"


class DebugError(QirError):
    """A comparison cannot run (unknown input kind, no shared inputs, unreadable artifact ...)."""


class TensorSource(Protocol):
    """One side of a comparison. ``kind``/``tokenizer``/``source`` describe the model (for building inputs)."""

    label: str
    kind: str
    source: str | None

    @property
    def tokenizer(self) -> Any: ...

    def input_names(self) -> list[str]:
        """The function's input names, in order."""
        ...

    def value_names(self) -> list[str]:
        """Every value the source can hand over (inputs first, then results), in graph order."""
        ...

    def inputs_of(self) -> dict[str, list[str]]:
        """For each value name, the names of the non-constant values its producer reads."""
        ...

    def stream(self, feed: dict[str, np.ndarray], wanted: set[str], sink: Sink) -> None:
        """Run on ``feed``; call ``sink(name, value)`` for every computed value whose name is in ``wanted``."""
        ...


class QirSource:
    """A qir module's function (``prefill`` for causal LMs, else ``main``) on the reference interpreter."""

    def __init__(self, module: Any, *, kind: str = "unknown", tokenizer: Any = None, source: str | None = None,
                 function: str | None = None, label: str | None = None) -> None:
        self.module = module
        if function is None:
            function = "prefill" if "prefill" in module.functions else module.main.name
        self.function = module.function(function)
        self.kind = kind
        self._tokenizer = tokenizer
        self.source = source
        self.label = label or f"@{module.name}"

    @classmethod
    def from_import(cls, imported: Any, label: str | None = None) -> QirSource:
        return cls(imported.module, kind=imported.kind, tokenizer=imported.tokenizer, source=imported.source,
                   label=label)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def input_names(self) -> list[str]:
        return [v.name for v in self.function.inputs]

    def value_names(self) -> list[str]:
        return [v.name for v in self.function.inputs] + [r.name for op in self.function.ops for r in op.results]

    def inputs_of(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {v.name: [] for v in self.function.inputs}
        for op in self.function.ops:
            reads = [v.name for v in op.operands if not v.is_constant]
            for r in op.results:
                out[r.name] = reads
        return out

    def constants_of(self) -> dict[str, list[str]]:
        """For each op result, the constants (weights) its op reads: to name a layer in reports."""
        return {r.name: [v.name for v in op.operands if v.is_constant] for op in self.function.ops
                for r in op.results}

    def stream(self, feed: dict[str, np.ndarray], wanted: set[str], sink: Sink) -> None:
        from qir.interpreter import Interpreter

        def observe(value: Any, data: Any) -> None:
            if value.name in wanted:
                sink(value.name, data)

        Interpreter(self.module).run(feed, function=self.function.name, observer=observe)


class OrtSource:
    """The main function of an ``ort-*`` artifact folder (``model.onnx``) on ONNX Runtime."""

    def __init__(self, folder: str | Path, *, chunk: int = 64, threads: int | None = None,
                 label: str | None = None) -> None:
        import onnx

        from qir.backends.compile import load_artifact

        self.artifact = load_artifact(folder, threads=threads)
        self.folder = Path(folder)
        self.kind = self.artifact.kind
        self.source = self.artifact.source
        self.label = label or str(folder)
        self.chunk = max(1, int(chunk))
        self.threads = threads
        fname = next(iter(self.artifact.report["functions"]))
        self._model = onnx.load(str(self.folder / self.artifact.report["functions"][fname]["file"]))
        g = self._model.graph
        self._inits = {t.name for t in g.initializer}
        self._inputs = [i.name for i in g.input if i.name not in self._inits]
        # The values that stand for qir values: graph inputs, value_info (every lowered op result) and outputs.
        # Helper tensors of a lowering are named "<result>::<what>" and are not qir values.
        self._infos = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
        # One exception: with ``act_u8`` a symmetric int8 activation ``%x.q`` only exists as ``x.q::u8`` (the same
        # codes + 128, for MatMulInteger's U8S8 kernels); it stands for ``x.q`` and is handed over as int8.
        self._tensor: dict[str, str] = {}  # qir value name -> ONNX tensor name
        for n in self._infos:
            if n in self._inits:
                continue
            if "::" not in n:
                self._tensor.setdefault(n, n)
            elif n.endswith(U8_SUFFIX) and "::" not in n[: -len(U8_SUFFIX)]:
                self._tensor.setdefault(n[: -len(U8_SUFFIX)], n)
        value_of = {t: v for v, t in self._tensor.items()}
        self._producer: dict[str, Any] = {o: node for node in g.node for o in node.output}
        order = list(self._inputs)
        seen = set(order)
        for node in g.node:
            for o in node.output:
                if o in value_of and value_of[o] not in seen:
                    order.append(value_of[o])
                    seen.add(value_of[o])
        self._names = order
        self._named = set(order)
        self._value_of = value_of

    @property
    def tokenizer(self) -> Any:
        return self.artifact.tokenizer

    def input_names(self) -> list[str]:
        return list(self._inputs)

    def value_names(self) -> list[str]:
        return list(self._names)

    def inputs_of(self) -> dict[str, list[str]]:
        memo: dict[str, list[str]] = {}

        def reads(tensor: str, depth: int = 0) -> list[str]:
            # The named values a tensor is computed from, looking through helper tensors of the lowering.
            if tensor in memo:
                return memo[tensor]
            node = self._producer.get(tensor)
            found: list[str] = []
            if node is not None and depth < 10_000:
                for i in node.input:
                    if not i or i in self._inits:
                        continue
                    v = self._value_of.get(i)
                    for n in ([v] if v in self._named else reads(i, depth + 1)):
                        if n not in found:
                            found.append(n)
            memo[tensor] = found
            return found

        return {n: ([] if n in self._inputs else reads(self._tensor[n])) for n in self._names}

    def stream(self, feed: dict[str, np.ndarray], wanted: set[str], sink: Sink) -> None:
        from qir.backends.onnx.runtime import choose_providers, make_session, run_session

        names = [n for n in self._names if n in wanted]
        for n in names:
            if n in self._inputs:
                sink(n, np.asarray(feed[n]))
        rest = [n for n in names if n not in self._inputs]
        feeds = {k: np.asarray(v) for k, v in feed.items() if k in self._inputs}
        for start in range(0, len(rest), self.chunk):
            part = rest[start:start + self.chunk]
            model = self._with_outputs(part)
            sess = make_session(model.SerializeToString(), providers=choose_providers(self.artifact.target.providers),
                                threads=self.threads, session_config=dict(self.artifact.target.session_config))
            outs = run_session(sess, feeds)
            order = [o.name for o in sess.get_outputs()]
            values = dict(zip(order, outs))
            del outs
            for n in part:
                t = self._tensor[n]
                value = values.pop(t)
                if t.endswith(U8_SUFFIX) and value.dtype == np.uint8:
                    value = (value.astype(np.int16) - 128).astype(np.int8)
                sink(n, value)

    def _with_outputs(self, names: Iterable[str]) -> Any:
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(self._model)
        del m.graph.output[:]
        for n in names:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(self._infos[self._tensor[n]])
            m.graph.output.append(vi)
        return m


ArtifactFactory = Callable[[Path], TensorSource]


def _tvm_source(folder: Path, *, chunk: int = 64, label: str | None = None) -> TensorSource:
    from qir.debug.tvm_source import TvmSource  # imports TVM: only when a TVM artifact is opened

    return TvmSource(folder, chunk=chunk, label=label)


#: The built-in sources take ``chunk`` and ``label`` too (registered factories take the folder only).
_BUILTIN_SOURCES: dict[str, Callable[..., TensorSource]] = {"ort-": OrtSource, "tvm-": _tvm_source}
_ARTIFACT_SOURCES: dict[str, ArtifactFactory] = dict(_BUILTIN_SOURCES)


def register_artifact_source(target_prefix: str, factory: ArtifactFactory) -> None:
    """Artifact folders whose ``report.json`` target starts with ``target_prefix`` open with ``factory(folder)``."""
    _ARTIFACT_SOURCES[target_prefix] = factory


def open_source(spec: str, *, chunk: int = 64, label: str | None = None) -> TensorSource:
    """A source for ``spec``: an artifact folder (by its report's target), else anything ``qir import`` takes."""
    p = Path(spec)
    if p.is_dir() and (p / "report.json").is_file():
        try:
            target = str(json.loads((p / "report.json").read_text()).get("target", ""))
        except (OSError, ValueError) as exc:
            raise DebugError(f"{spec}: unreadable report.json ({exc})") from None
        for prefix, factory in _ARTIFACT_SOURCES.items():
            if target.startswith(prefix):
                if factory is _BUILTIN_SOURCES.get(prefix):
                    return _BUILTIN_SOURCES[prefix](p, chunk=chunk, label=label)
                return factory(p)
        raise DebugError(f"{spec}: an artifact for target {target!r}, which qir debug cannot run yet (it runs "
                         f"{', '.join(p + '*' for p in _ARTIFACT_SOURCES)})")
    from qir.frontend.importer import import_model

    return QirSource.from_import(import_model(spec), label=label or spec)
