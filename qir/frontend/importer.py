"""``qir.import_model``: bring any supported model into qir, whatever it is given as.

=====================================  ========================================================================
``name_or_path``                       route
=====================================  ========================================================================
zoo name (``smollm2-135m``, ...)       :func:`qir.models.load_model`, then the wrapper for its kind and the tracer
HF folder (``config.json``), ``.gguf``  the same (kind from the config's architectures; GGUF = causal LM)
``.qir``                               :func:`qir.load`; model family and tokenizer from the sidecar ``X.json``
``.pt2`` (``torch.export.save``)       :func:`qir.frontend.pt2.import_pt2`
``.onnx``                              :func:`qir.frontend.onnx_import.import_onnx`
=====================================  ========================================================================

Causal LMs become one module with ``prefill`` and ``decode`` (:mod:`qir.frontend.causal_lm`); encoders one ``main``
giving sentence embeddings (:mod:`qir.frontend.encoder`).

**Sidecar**: ``qir import MODEL -o X.qir`` (:func:`save_import`) writes ``X.qir`` + ``X.safetensors`` and a small
``X.json`` = ``{"source": MODEL, "kind": "causal-lm" | "encoder", "max_seq": ...}``. Loading ``X.qir`` reads it
to find the tokenizer (and, for encoders, the float model to compare against). Without a sidecar, the module name is
tried as a zoo name.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qir.atomic import write_text_atomic
from qir.errors import QirError
from qir.graph import Module

__all__ = [
    "LoadedImport", "ModelImportError", "import_loaded", "import_model", "read_sidecar", "save_import", "sidecar_path",
]


class ModelImportError(QirError):
    """A model could not be imported (unknown format, missing frontend, unreadable sidecar ...)."""


@dataclass
class LoadedImport:
    """An imported model: the qir module, its kind, where it came from, and its tokenizer (if known)."""

    module: Module
    kind: str                          # "causal-lm", "encoder", or "unknown" (.pt2 / .onnx without metadata)
    source: str                        # zoo name or path it came from
    tokenizer: Any | None = None
    loaded: Any | None = None          # the qir.models.LoadedModel, when the float model was loaded
    options: dict[str, Any] = field(default_factory=dict)

    def float_model(self) -> Any:
        """The float PyTorch model this came from (``LoadedModel``), loading it from ``source`` if needed."""
        if self.loaded is None:
            from qir.models import load_model

            self.loaded = load_model(self.source)
        return self.loaded


def sidecar_path(qir_path: str | os.PathLike[str]) -> Path:
    """``X.json`` next to ``X.qir``."""
    return Path(qir_path).with_suffix(".json")


def read_sidecar(qir_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``X.qir`` as a dict, or None when there is none."""
    p = sidecar_path(qir_path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{p}: unreadable sidecar ({exc}); delete it or re-run qir import") from None
    if not isinstance(data, dict) or "source" not in data or "kind" not in data:
        raise ModelImportError(f"{p}: sidecar lacks 'source' and 'kind'; re-run qir import")
    return data


def save_import(imported: LoadedImport, path: str | os.PathLike[str]) -> Path:
    """Save the module to ``path`` (``.qir`` + ``.safetensors``) and write the sidecar ``.json``; returns it."""
    from qir.serialize import save

    p = Path(path)
    if p.suffix != ".qir":
        raise ModelImportError(f"{p}: the output file must end in .qir")
    save(imported.module, p)
    side = sidecar_path(p)
    write_text_atomic(side, json.dumps({"source": imported.source, "kind": imported.kind, **imported.options},
                                       indent=2) + "\n")
    return side


def _tokenizer_for(source: str) -> Any:
    """The tokenizer of a zoo model or model path, without loading its weights when a saved tokenizer exists."""
    from qir.models import resolve_model

    spec = resolve_model(source)
    if spec is not None:
        from qir.models import cache_dir, model_files
        from qir.models.zoo import _import_transformers, _quiet_and_offline

        with _quiet_and_offline():
            tf = _import_transformers(need_gguf=False)
            if spec.gguf_file:  # the loader keeps the converted GGUF tokenizer per transformers version
                folder: Path | None = cache_dir() / spec.name / f"tokenizer-transformers-{tf.__version__}"
            else:
                try:
                    folder = model_files(spec.name, download=False)
                except QirError:
                    folder = None
            if folder is not None and (folder / "tokenizer.json").is_file():
                try:
                    return tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                except (OSError, ValueError):
                    pass
    from qir.models import load_model

    return load_model(source).tokenizer


def _optional_frontend(module_name: str, func: str, path: Path) -> Any:
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ModelImportError(f"{path}: importing {path.suffix} files needs {module_name}.{func}, which this qir "
                               f"does not have yet") from None
        raise
    fn = getattr(mod, func, None)
    if fn is None:
        raise ModelImportError(f"{path}: {module_name} has no {func}()")
    return fn


def import_model(name_or_path: str | os.PathLike[str], *, max_seq: int | None = None, name: str | None = None,
                 download: bool = True, keep_quantized: bool = False) -> LoadedImport:
    """Import a model into qir (see the module docstring for what ``name_or_path`` may be).

    ``max_seq``: the decode graph's cache slots for causal LMs (default 1024) / the longest sequence for encoders
    (default 512). ``name``: the module's name (default: the model's name). ``keep_quantized``: for a GGUF model
    (file or zoo name), keep the file's own quantized blocks instead of float weights, losslessly
    (:mod:`qir.frontend.gguf_keep`). Raises a ``QirError`` subclass with an actionable message on any failure.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if keep_quantized and suffix in (".qir", ".pt2", ".onnx"):
        raise ModelImportError(f"{path}: --keep-quantized applies to GGUF models (a .gguf file or a zoo model "
                               f"shipped as GGUF), not to {suffix} files")
    if suffix == ".qir":
        return _import_qir(path)
    if suffix == ".pt2":
        module = _optional_frontend("qir.frontend.pt2", "import_pt2", path)(path, name=name)
        return LoadedImport(module=module, kind="unknown", source=str(path))
    if suffix == ".onnx":
        module = _optional_frontend("qir.frontend.onnx_import", "import_onnx", path)(path, name=name)
        return LoadedImport(module=module, kind="unknown", source=str(path))

    from qir.models import load_model, resolve_model

    loaded = load_model(text, download=download)
    spec = resolve_model(text) if isinstance(name_or_path, str) else None
    source = spec.name if spec is not None else str(path.resolve())
    imported = import_loaded(loaded, source=source, max_seq=max_seq, name=name)
    if keep_quantized:
        keep_quantization(imported)
    return imported


def keep_quantization(imported: LoadedImport) -> Any:
    """Swap an imported GGUF model's float weights for the file's quantized blocks; returns the ``KeepReport``."""
    from qir.frontend.gguf_keep import keep_gguf_quantization

    loaded = imported.loaded
    src = Path(getattr(loaded, "source", "") or "")
    if loaded is None or getattr(loaded.facts, "source_format", "") != "gguf" or src.suffix != ".gguf":
        raise ModelImportError(f"{imported.source}: --keep-quantized needs a GGUF model; this one was loaded from "
                               f"{src or 'an unknown source'}")
    report = keep_gguf_quantization(imported.module, src)
    imported.options["keep_quantized"] = True
    imported.options["gguf_kept"] = report.summary()
    return report


def import_loaded(loaded: Any, *, source: str | None = None, max_seq: int | None = None,
                  name: str | None = None) -> LoadedImport:
    """Import an already loaded :class:`qir.models.LoadedModel` (what :func:`import_model` does after loading)."""
    mod_name = _module_name(name or loaded.name)
    if loaded.kind == "causal-lm":
        from qir.frontend.causal_lm import DEFAULT_MAX_SEQ, import_causal_lm

        seq = max_seq or DEFAULT_MAX_SEQ
        module = import_causal_lm(loaded, max_seq=seq, name=mod_name)
    elif loaded.kind == "encoder":
        from qir.frontend.encoder import import_encoder

        seq = max_seq or 512
        module = import_encoder(loaded, max_seq=seq, name=mod_name)
    else:
        raise ModelImportError(f"cannot import a model of kind {loaded.kind!r}")
    return LoadedImport(module=module, kind=loaded.kind, source=source or loaded.name, tokenizer=loaded.tokenizer,
                        loaded=loaded, options={"max_seq": seq})


def _module_name(text: str) -> str:
    import re

    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", text).lstrip(".-")
    return cleaned or "model"


def _import_qir(path: Path) -> LoadedImport:
    from qir.models import resolve_model
    from qir.serialize import load

    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    module = load(path)
    side = read_sidecar(path)
    if side is None:
        spec = resolve_model(module.name)
        if spec is None:
            return LoadedImport(module=module, kind="unknown", source=str(path))
        side = {"source": spec.name, "kind": spec.kind}
    source = str(side["source"])
    options = {k: v for k, v in side.items() if k not in ("source", "kind")}
    kind = str(side["kind"])
    # A sidecar of kind "unknown" names the file the module came from (qir quantize of a bare .qir), not a model
    # with a tokenizer: there is nothing to load from it.
    tokenizer = None if kind == "unknown" else _tokenizer_for(source)
    return LoadedImport(module=module, kind=kind, source=source, tokenizer=tokenizer, options=options)
