"""Model quality numbers: perplexity of causal LMs, embedding cosine similarity of encoders.

**Perplexity** (:func:`perplexity`): the text is tokenized once without special tokens (no BOS/EOS); window *i* is
``ids[W*i : W*(i+1)]`` (``W = 512``) for the first ``max_windows`` full, consecutive, non-overlapping windows (a text
shorter than one window is one shorter window); each window is an independent forward pass with no carried
context; the next-token NLL of the ``W - 1`` predictions of every window is averaged over all windows in float64 from
the FP32 logits; ``ppl = exp(mean NLL)``. ``tokens`` is the number of scored predictions.

**Cosine** (:func:`embedding_cosine`): sentence embeddings of a qir encoder against the float model's on
:data:`DEFAULT_SENTENCES` (or the lines of a text file); the mean and minimum cosine similarity.

:func:`evaluate` produces the ``qir eval --json`` dictionaries: ``{"ppl", "tokens", "bytes"}`` for causal LMs and
``{"cosine_mean", "cosine_min", "bytes"}`` for encoders, ``bytes`` being :func:`qir.stored_bytes` (all weights and
quantization parameters as stored).

The model side is a *logits function* ``tokens[1, S] (i64) -> logits[1, S, V]`` (numpy): :func:`qir_logits_fn` runs
a module's ``prefill`` (or ``main``) with the reference interpreter, :func:`torch_logits_fn` a PyTorch model, so the
same code measures both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Module

__all__ = [
    "DEFAULT_SENTENCES", "DEFAULT_WINDOW", "DEFAULT_WINDOWS", "CosineResult", "EvaluationError", "PerplexityResult",
    "embedding_cosine", "evaluate", "perplexity", "perplexity_of_ids", "qir_embed_fn", "qir_logits_fn",
    "torch_logits_fn", "window_ids",
]

DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 8

#: Varied sentences (lengths, topics, punctuation, numbers, a near-paraphrase pair) for encoder checks.
DEFAULT_SENTENCES: tuple[str, ...] = (
    "Paris is the capital of France.",
    "The capital of France is Paris.",
    "I like trains.",
    "A man is playing a guitar on the street corner while people walk by.",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to water the plants twice a week during the summer.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong stepped onto its surface.",
    "How do I reset my password if I no longer have access to my email?",
    "The stock market fell 3% today after the central bank raised interest rates.",
    "She sells sea shells by the sea shore.",
    "Neural networks can be compressed by quantizing their weights to 4 bits.",
    "It rained all day, so the football match was postponed until next Sunday.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Why?",
    "This restaurant serves the best spicy noodles I have ever eaten, and the staff are friendly too.",
)

LogitsFn = Callable[[np.ndarray], np.ndarray]
EmbedFn = Callable[[Sequence[str]], np.ndarray]


class EvaluationError(QirError):
    """An evaluation cannot run (text too short, wrong model kind, missing function ...)."""


@dataclass
class PerplexityResult:
    """Perplexity over ``windows`` windows; ``tokens`` predictions scored; per-window perplexities."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    window_ppl: list[float]


@dataclass
class CosineResult:
    """Cosine similarity of each sentence's embedding against the reference, with mean and minimum."""

    cosine_mean: float
    cosine_min: float
    cosines: list[float]


# -- perplexity ------------------------------------------------------------------------------------------------

def window_ids(ids: Sequence[int], *, window: int = DEFAULT_WINDOW, max_windows: int | None = DEFAULT_WINDOWS
               ) -> list[list[int]]:
    """The first ``max_windows`` full non-overlapping windows of ``ids`` (one shorter window if there is no full)."""
    ids = [int(i) for i in ids]
    if window < 2:
        raise EvaluationError(f"window must be at least 2 tokens, not {window}")
    if len(ids) < 2:
        raise EvaluationError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    n_full = len(ids) // window
    if n_full == 0:
        return [ids]
    if max_windows is not None:
        n_full = min(n_full, max_windows)
    return [ids[window * i: window * (i + 1)] for i in range(n_full)]


def _window_nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """NLL (float64) of each next token: ``logits[0, t]`` predicts ``ids[t + 1]``."""
    lg = np.asarray(logits)
    if lg.ndim != 3 or lg.shape[0] != 1 or lg.shape[1] != len(ids):
        raise EvaluationError(f"expected logits [1, {len(ids)}, vocab], got shape {lg.shape}")
    x = lg[0, :-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)))
    target = np.asarray(ids[1:], dtype=np.int64)
    return lse - x[np.arange(len(target)), target]


def perplexity_of_ids(logits_fn: LogitsFn, ids: Sequence[int], *, window: int = DEFAULT_WINDOW,
                      max_windows: int | None = DEFAULT_WINDOWS) -> PerplexityResult:
    """Perplexity of ``logits_fn`` over the windows of ``ids`` (see the module docstring)."""
    nlls: list[np.ndarray] = []
    for w in window_ids(ids, window=window, max_windows=max_windows):
        nlls.append(_window_nll(logits_fn(np.asarray([w], dtype=np.int64)), w))
    allnll = np.concatenate(nlls)
    mean = float(allnll.mean())
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=int(allnll.size), windows=len(nlls),
                            window_ppl=[math.exp(float(n.mean())) for n in nlls])


def perplexity(model: Module | LogitsFn | Any, text: str | Path, *, tokenizer: Any | None = None,
               window: int = DEFAULT_WINDOW, max_windows: int | None = DEFAULT_WINDOWS) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, or a :class:`~pathlib.Path` to read).

    ``model``: a qir Module (its ``prefill`` or ``main`` is run by the reference interpreter), an import result (its
    module and tokenizer are used), or a logits function.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise EvaluationError("perplexity needs a tokenizer (pass tokenizer=)")
    if isinstance(text, Path):
        text = read_text(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return perplexity_of_ids(_as_logits_fn(model), ids, window=window, max_windows=max_windows)


def qir_logits_fn(module: Module, function: str | None = None) -> LogitsFn:
    """Logits of a qir module by the reference interpreter: output 0 of ``prefill`` (or ``main``)."""
    from qir.interpreter import Interpreter

    if function is None:
        function = "prefill" if "prefill" in module.functions else None
    interp = Interpreter(module)
    fname = function

    def fn(tokens: np.ndarray) -> np.ndarray:
        return np.asarray(interp.run([tokens], function=fname)[0])

    return fn


def torch_logits_fn(model: Any) -> LogitsFn:
    """Logits of a PyTorch causal LM (``model(input_ids, use_cache=False).logits``) or ``model(tokens)[0]``."""
    import torch

    def fn(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            try:
                out = model(input_ids=t, use_cache=False)
                logits = out.logits
            except TypeError:
                out = model(t)
                logits = out[0] if isinstance(out, tuple | list) else out
        return logits.float().numpy()

    return fn


def _as_logits_fn(model: Any) -> LogitsFn:
    if isinstance(model, Module):
        return qir_logits_fn(model)
    inner = getattr(model, "module", None)
    if isinstance(inner, Module):
        return qir_logits_fn(inner)
    if callable(model):
        return model
    raise EvaluationError(f"cannot compute logits with {type(model).__name__}")


# -- encoders --------------------------------------------------------------------------------------------------

def qir_embed_fn(module: Module, tokenizer: Any, *, max_length: int | None = None,
                 function: str | None = None) -> EmbedFn:
    """Sentence embeddings from a qir encoder (inputs ``input_ids``, ``attention_mask``) by the interpreter."""
    from qir.interpreter import Interpreter

    interp = Interpreter(module)

    def fn(texts: Sequence[str]) -> np.ndarray:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.asarray(enc["attention_mask"], dtype=np.int64)
        return np.asarray(interp.run([ids, mask], function=function)[0])

    return fn


def embedding_cosine(embed: EmbedFn, reference: EmbedFn,
                     sentences: Sequence[str] = DEFAULT_SENTENCES) -> CosineResult:
    """Cosine similarity, sentence by sentence, of ``embed(sentences)`` against ``reference(sentences)``."""
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise EvaluationError("no sentences to embed")
    a = np.asarray(embed(sentences), dtype=np.float64)
    b = np.asarray(reference(sentences), dtype=np.float64)
    if a.shape != b.shape:
        raise EvaluationError(f"embedding shapes differ: {a.shape} vs reference {b.shape}")
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return CosineResult(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), cosines=[float(c) for c in cos])


# -- qir eval --------------------------------------------------------------------------------------------------

def read_text(path: str | Path) -> str:
    """A text file's contents (UTF-8, undecodable bytes replaced); a clear error when it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise EvaluationError(f"cannot read text file {p}: {exc.strerror or exc}") from None


def evaluate(imported: Any, *, text: str | Path | None = None, window: int = DEFAULT_WINDOW,
             max_windows: int | None = DEFAULT_WINDOWS, reference: Any | None = None) -> dict[str, float | int]:
    """The ``qir eval --json`` numbers for an import result (:class:`qir.frontend.importer.LoadedImport`).

    Causal LM: ``{"ppl", "tokens", "bytes"}`` over the text file ``text`` (required). Encoder:
    ``{"cosine_mean", "cosine_min", "bytes"}`` against the float model (``reference``: a ``LoadedModel``; loaded
    from the import's source when not given) on :data:`DEFAULT_SENTENCES` or the non-empty lines of ``text``.
    """
    from qir.serialize import stored_bytes

    module: Module = imported.module
    return evaluate_functions(
        imported.kind, tokenizer=imported.tokenizer, nbytes=stored_bytes(module),
        logits_fn=lambda: qir_logits_fn(module),
        embed_fn=lambda max_len: qir_embed_fn(module, imported.tokenizer, max_length=max_len),
        reference=(lambda: reference) if reference is not None else imported.float_model,
        text=text, window=window, max_windows=max_windows)


def evaluate_artifact(artifact: Any, *, text: str | Path | None = None, window: int = DEFAULT_WINDOW,
                      max_windows: int | None = DEFAULT_WINDOWS) -> dict[str, float | int]:
    """The same numbers for a compiled artifact folder (``qir.backends.compile.load_artifact``)."""

    def reference() -> Any:
        from qir.models import load_model

        return load_model(artifact.source)

    return evaluate_functions(
        artifact.kind, tokenizer=artifact.tokenizer, nbytes=int(artifact.bytes),
        logits_fn=artifact.logits_fn,
        embed_fn=lambda max_len: artifact.embed_fn(artifact.tokenizer, max_length=max_len),
        reference=reference, text=text, window=window, max_windows=max_windows)


def evaluate_functions(kind: str, *, tokenizer: Any, nbytes: int, logits_fn: Callable[[], LogitsFn],
                       embed_fn: Callable[[int | None], EmbedFn], reference: Callable[[], Any],
                       text: str | Path | None, window: int, max_windows: int | None) -> dict[str, float | int]:
    """Shared by :func:`evaluate` and :func:`evaluate_artifact`: whatever runs the model, the same metric."""
    if kind == "causal-lm":
        if text is None:
            raise EvaluationError("perplexity of a causal LM needs a text file (--text FILE)")
        res = perplexity(logits_fn(), Path(text), tokenizer=tokenizer, window=window, max_windows=max_windows)
        return {"ppl": res.ppl, "tokens": res.tokens, "bytes": nbytes}
    if kind == "encoder":
        sentences: Sequence[str] = DEFAULT_SENTENCES
        if text is not None:
            sentences = [line.strip() for line in read_text(text).splitlines() if line.strip()]
        ref = reference()
        max_len = getattr(getattr(ref, "facts", None), "max_seq_len", None)
        res_c = embedding_cosine(embed_fn(max_len), lambda s: ref.embed(s).numpy(), sentences)
        return {"cosine_mean": res_c.cosine_mean, "cosine_min": res_c.cosine_min, "bytes": nbytes}
    raise EvaluationError(f"cannot evaluate a model of kind {kind!r}")
