"""``compile_module``: a qir module to a target artifact folder; ``load_artifact``: run such a folder.

An artifact folder holds::

    model.onnx          the module's main function (``main``, or ``prefill`` for causal LMs)
    decode.onnx         ``decode`` (and one ``<function>.onnx`` per further function)
    weights.onnx.data   the weights of all functions, stored once, when there are several functions (prefill and
                        decode read the same file through ONNX external data)
    model.onnx.data     external initializer data of a single-function model past protobuf's 2 GB limit
    target.json         the target profile it was compiled for (rules with their sources)
    report.json         bytes, ONNX ops by kind per function, qir ops by kind, fallbacks, warnings, notes

It is written atomically: into a temporary folder next to ``out_dir`` that is renamed into place at the end, so
a failed compile leaves no half-written folder (and an earlier artifact stays intact).

:func:`load_artifact` gives an :class:`Artifact` whose ``logits_fn`` / ``embed_fn`` have the call shapes of
:func:`qir.evaluate.qir_logits_fn` / :func:`qir.evaluate.qir_embed_fn`, running ONNX Runtime instead of the
reference interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qir.atomic import deferred_signals, fsync_dir
from qir.backends.onnx.legality import Violation, check_lowered, check_module, fallback_candidates, refusal_message
from qir.backends.onnx.lower import LowerOptions, lower_function
from qir.backends.target import Target, load_target
from qir.errors import QirError
from qir.graph import Module

__all__ = ["Artifact", "CompileError", "CompileResult", "compile_module", "load_artifact", "function_files"]

EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph itself


class CompileError(QirError):
    """A module cannot be compiled for a target (legality refusal, lowering failure, unwritable folder)."""


@dataclass
class CompileResult:
    """What :func:`compile_module` wrote."""

    out_dir: Path
    files: dict[str, str]
    report: dict[str, Any]
    violations: list[Violation] = field(default_factory=list)


def function_files(module: Module) -> dict[str, str]:
    """ONNX file name per function: the main one is ``model.onnx``."""
    names = list(module.functions)
    main = "main" if "main" in names else ("prefill" if "prefill" in names else names[0])
    return {f: ("model.onnx" if f == main else f"{f}.onnx") for f in names}


def _options(target: Target, bind: dict[str, int] | None, fallback: set[str]) -> LowerOptions:
    lo = target.lowering_options()
    return LowerOptions(qmatmul=lo.get("qmatmul", "integer"), int4=lo.get("int4", "nbits"),
                        act_u8=bool(lo.get("act_u8", True)), act_i8=bool(lo.get("act_i8", False)),
                        contrib_ops=bool(lo.get("contrib_ops", True)), opset=target.opset,
                        bind=tuple(sorted((bind or {}).items())), fallback_float=frozenset(fallback))


SHARED_DATA = "weights.onnx.data"
SHARED_MIN_BYTES = 1024   # smaller initializers stay inside their .onnx file
SHARED_ALIGN = 4096       # page-aligned offsets let ONNX Runtime memory-map the data


def _tensor_key(t: onnx.TensorProto) -> tuple[Any, ...]:
    return (t.data_type, tuple(t.dims), hashlib.blake2b(t.raw_data, digest_size=16).digest())


def _save_all(models: dict[str, onnx.ModelProto], folder: Path) -> dict[str, int]:
    """Write each model as ``folder/<file>``; return the bytes each one reads (its file plus its external data).

    One function alone is saved self-contained (external data only past protobuf's 2 GB limit). Several functions
    (a causal LM's ``prefill`` and ``decode``) hold the same weights: every initializer of at least
    ``SHARED_MIN_BYTES`` is written once into ``weights.onnx.data`` and each model points into it (ONNX external
    data: location, offset, length), so the artifact stores the weights once instead of once per function.
    """
    sizes: dict[str, int] = {}
    if len(models) == 1:
        (name, model), = models.items()
        path = folder / name
        if sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_LIMIT:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
        sizes[name] = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(name))
        return sizes
    placed: dict[tuple[Any, ...], tuple[int, int]] = {}
    with open(folder / SHARED_DATA, "wb") as data:
        for name, model in models.items():
            external = 0
            for t in model.graph.initializer:
                if len(t.raw_data) < SHARED_MIN_BYTES:
                    continue
                key = _tensor_key(t)
                if key not in placed:
                    offset = -(-data.tell() // SHARED_ALIGN) * SHARED_ALIGN
                    data.seek(offset)
                    data.write(t.raw_data)
                    placed[key] = (offset, len(t.raw_data))
                offset, length = placed[key]
                external += length
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", SHARED_DATA), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save_model(model, str(folder / name))
            sizes[name] = (folder / name).stat().st_size + external
    return sizes


def compile_module(module: Module, target: str | Target, out_dir: str | os.PathLike[str], *,
                   bind: dict[str, int] | None = None, fallback: bool = False, check: bool = True,
                   meta: dict[str, Any] | None = None,
                   finish: Callable[[Path, dict[str, Any]], None] | None = None) -> CompileResult:
    """Lower every function of ``module`` for ``target`` and write the artifact folder ``out_dir``.

    ``bind``: fixed values for symbolic sizes (``{"seq": 128}``; needed by static-shape targets). ``fallback``:
    ops that break a target rule are kept in f16 (and listed in the report) instead of refusing. ``check``: run
    ``onnx.checker`` (full check with shape inference). ``meta``: extra report entries (source model, kind,
    pipeline). ``finish(folder, report)``: called once the files are written but before the folder is moved into
    place (e.g. to evaluate the artifact and add to the report, which is then written again), so an interrupted
    report never leaves a folder that looks complete. Raises :class:`CompileError` listing every violation when the
    module does not fit the target.
    """
    tgt = target if isinstance(target, Target) else load_target(target)
    if tgt.runtime == "tvm":  # TVM targets: model.so + params (qir.backends.tvm.compile)
        from qir.backends.tvm.compile import compile_tvm

        return compile_tvm(module, tgt, out_dir, meta=meta, finish=finish)
    violations = check_module(module, tgt, bind=bind)
    errors = [v for v in violations if v.severity == "error"]
    fb: set[str] = set()
    if errors and fallback:
        fb = fallback_candidates(errors)
        errors = [v for v in errors if not (v.fallback and v.op in fb)]
    if errors:
        raise CompileError(refusal_message(tgt, errors))
    opts = _options(tgt, bind, fb)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = function_files(module)
        funcs: dict[str, Any] = {}
        models: dict[str, onnx.ModelProto] = {}
        fallbacks: list[str] = []
        notes: list[str] = []
        from qir.tools.progress import progress

        for fname, fileName in progress(files.items(), f"compile for {tgt.name}"):
            lowered = lower_function(module, fname, options=opts)
            post = check_lowered(lowered.model, tgt, fname)
            bad = [v for v in post if v.severity == "error"]
            if bad:
                raise CompileError(refusal_message(tgt, bad))
            violations.extend(post)
            if check:
                try:
                    onnx.checker.check_model(lowered.model, full_check=True)
                except Exception as exc:  # noqa: BLE001 - onnx raises several types
                    raise CompileError(f"@{fname}: the lowered ONNX model fails onnx.checker: {exc}") from None
            models[fileName] = lowered.model
            g = lowered.model.graph
            funcs[fname] = {
                "file": fileName,
                "initializer_bytes": sum(len(t.raw_data) for t in g.initializer),
                "inputs": [i.name for i in g.input], "outputs": [o.name for o in g.output],
                "onnx_ops": dict(Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
                                         for n in g.node).most_common()),
                "qir_ops": dict(Counter(op.opcode for op in module.function(fname).ops).most_common()),
            }
            fallbacks.extend(lowered.fallbacks)
            notes.extend(lowered.notes)
        for fname, nbytes in zip(funcs, _save_all(models, tmp).values(), strict=True):
            funcs[fname]["bytes"] = nbytes
        del models
        from qir.serialize import stored_bytes

        report = {
            "module": module.name, "target": tgt.name, "opset": opts.opset,
            "bind": dict(opts.bind), "bytes": sum(f.stat().st_size for f in tmp.iterdir()),
            "qir_stored_bytes": stored_bytes(module), "functions": funcs,
            "fallbacks": fallbacks, "warnings": [v.to_json() for v in violations if v.severity == "warning"],
            "notes": sorted(set(notes)), "lowering": {k: (sorted(v) if isinstance(v, frozenset) else v)
                                                      for k, v in opts.__dict__.items()},
            **(meta or {}),
        }
        (tmp / "target.json").write_text(json.dumps(tgt.to_json(), indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if finish is not None:
            finish(tmp, report)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        old = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; the artifact is an ordinary folder
        # Two renames when an older artifact is replaced: signals wait until both are done (one held back
        # is raised as the block ends, after the commit), and a failed second rename puts the older
        # artifact back. The older artifact is deleted whatever happens after the commit.
        try:
            with deferred_signals():
                if out.exists():
                    old = out.parent / f".{out.name}.old-{os.getpid()}"
                    out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:
                    if old is not None:
                        old.rename(out)
                        old = None
                    raise
                fsync_dir(out.parent)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(out, {f: str(out / n) for f, n in files.items()}, report, violations)


class Artifact:
    """A compiled artifact folder opened with ONNX Runtime (sessions are created on first use)."""

    def __init__(self, out_dir: str | os.PathLike[str], *, threads: int | None = None) -> None:
        self.path = Path(out_dir)
        rp = self.path / "report.json"
        if not rp.is_file():
            raise CompileError(f"{self.path}: not a qir artifact folder (no report.json); run qir compile first")
        try:
            self.report: dict[str, Any] = json.loads(rp.read_text())
            self.target = load_target(self.path / "target.json")
        except (OSError, ValueError) as exc:
            raise CompileError(f"{self.path}: unreadable artifact ({exc})") from None
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None

    @property
    def kind(self) -> str:
        return str(self.report.get("kind", "unknown"))

    @property
    def source(self) -> str | None:
        return self.report.get("source")

    @property
    def functions(self) -> list[str]:
        return list(self.report["functions"])

    @property
    def bytes(self) -> int:
        return int(self.report["bytes"])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.source is None:
                raise CompileError(f"{self.path}: the report names no source model, so there is no tokenizer")
            from qir.frontend.importer import _tokenizer_for

            self._tokenizer = _tokenizer_for(self.source)
        return self._tokenizer

    def load(self) -> None:
        """Load everything a run needs now (the runtime sessions), so that the first run's time is the run's."""
        for fname in self.report["functions"]:
            self.session(fname)

    def session(self, function: str | None = None) -> Any:
        from qir.backends.onnx.runtime import choose_providers, make_session

        fname = function or next(iter(self.report["functions"]))
        if fname not in self.report["functions"]:
            raise CompileError(f"{self.path}: no function {fname!r} (has {', '.join(self.functions)})")
        if fname not in self._sessions:
            info = self.report["functions"][fname]
            self._sessions[fname] = make_session(self.path / info["file"],
                                                 providers=choose_providers(self.target.providers),
                                                 threads=self.threads,
                                                 session_config=dict(self.target.session_config))
        return self._sessions[fname]

    def run(self, inputs: Sequence[np.ndarray] | dict[str, np.ndarray], *, function: str | None = None
            ) -> list[np.ndarray]:
        """Run a function on inputs (a list in input order or a dict by name), like :func:`qir.interpreter.run`."""
        from qir.backends.onnx.runtime import run_session

        sess = self.session(function)
        if not isinstance(inputs, dict):
            names = [i.name for i in sess.get_inputs()]
            if len(inputs) != len(names):
                raise CompileError(f"the function takes {len(names)} inputs {names}, got {len(inputs)}")
            inputs = dict(zip(names, inputs))
        return run_session(sess, {k: np.asarray(v) for k, v in inputs.items()})

    def logits_fn(self, function: str | None = None) -> Any:
        """``tokens[1, S] -> logits[1, S, V]`` (output 0 of ``prefill`` / ``main``), as :func:`qir_logits_fn`."""
        fname = function

        def fn(tokens: np.ndarray) -> np.ndarray:
            return self.run([np.asarray(tokens, dtype=np.int64)], function=fname)[0]

        return fn

    def embed_fn(self, tokenizer: Any | None = None, *, max_length: int | None = None,
                 function: str | None = None) -> Any:
        """Sentence embeddings (inputs ``input_ids``, ``attention_mask``), as :func:`qir_embed_fn`."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        # An artifact compiled with static shapes (--bind batch=1,seq=128) takes exactly those sizes: pad each
        # batch to the bound sequence length and feed at most the bound batch at a time (the mask hides padding).
        dims = self.session(function).get_inputs()[0].shape
        static_batch = dims[0] if isinstance(dims[0], int) else None
        static_seq = dims[1] if len(dims) > 1 and isinstance(dims[1], int) else None

        def run_batch(texts: list[str]) -> np.ndarray:
            if static_seq is not None:
                enc = tok(texts, padding="max_length", truncation=True, max_length=static_seq, return_tensors="np")
            else:
                enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            mask = np.asarray(enc["attention_mask"], dtype=np.int64)
            return self.run([ids, mask], function=function)[0]

        def fn(texts: Sequence[str]) -> np.ndarray:
            texts = list(texts)
            step = static_batch or len(texts) or 1
            return np.concatenate([run_batch(texts[i:i + step]) for i in range(0, len(texts), step)], axis=0)

        return fn


def load_artifact(out_dir: str | os.PathLike[str], *, threads: int | None = None) -> Artifact:
    """Open a folder written by :func:`compile_module` (or ``qir compile``): ONNX Runtime or TVM, by target.json."""
    tj = Path(out_dir) / "target.json"
    try:
        runtime = json.loads(tj.read_text()).get("runtime") if tj.is_file() else None
    except (OSError, ValueError):
        runtime = None
    if runtime == "tvm":
        from qir.backends.tvm.compile import TvmArtifact

        return TvmArtifact(out_dir, threads=threads)
    return Artifact(out_dir, threads=threads)
