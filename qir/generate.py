"""Text generation (greedy or sampled) through a causal LM's ``prefill`` and ``decode`` functions.

The module (see :mod:`qir.frontend.causal_lm`) is run by the reference interpreter: ``prefill`` on the prompt gives
the logits and the caches ``[1, n_kv, P, hd]``; the caches are zero-padded to the decode graph's ``max_seq`` slots;
then each ``decode`` step takes the last token and its position and returns the next logits and the updated caches.
Generation stops at the tokenizer's EOS (unless ``stop_at_eos=False``) or after ``max_new_tokens``.

    >>> imp = qir.import_model("smollm2-135m")
    >>> out = qir.generate(imp, "What is the capital of France?", max_new_tokens=32)
    >>> out.text, out.tokens_per_second

Any object with ``prefill(tokens) -> (logits, caches)`` and ``decode(token, position, caches) -> (logits, caches)``
(numpy in and out) can stand in for the interpreter (:class:`StepRunner`), e.g. to compare with PyTorch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from qir.errors import QirError
from qir.graph import Module

__all__ = ["GenerationResult", "InterpreterRunner", "StepRunner", "generate", "generate_ids", "prompt_ids"]


class GenerationError(QirError):
    """The module cannot generate (no prefill/decode functions, prompt too long, ...)."""


class StepRunner(Protocol):
    """What generation needs: a prefill over the prompt and a static-cache decode step."""

    max_seq: int

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def decode(self, token: np.ndarray, position: np.ndarray,
               caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...


class InterpreterRunner:
    """Runs a module's ``prefill`` / ``decode`` functions with the reference interpreter."""

    def __init__(self, module: Module) -> None:
        from qir.interpreter import Interpreter

        for fn in ("prefill", "decode"):
            if fn not in module.functions:
                raise GenerationError(f"module @{module.name} has no function @{fn}; generation needs a causal LM "
                                      f"imported with prefill and decode (qir import MODEL)")
        self.module = module
        self.interpreter = Interpreter(module)
        decode = module.functions["decode"]
        if len(decode.inputs) < 3:
            raise GenerationError("@decode must take token, position and the caches")
        cache_t = decode.inputs[2].type
        if not cache_t.is_static or len(cache_t.shape) != 4:
            raise GenerationError(f"@decode's caches must be static 4-d tensors, not {cache_t}")
        self.max_seq = int(cache_t.shape[2])

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = self.interpreter.run([tokens], function="prefill")
        return np.asarray(outs[0]), [np.asarray(o) for o in outs[1:]]

    def decode(self, token: np.ndarray, position: np.ndarray,
               caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = self.interpreter.run([token, position, *caches], function="decode")
        return np.asarray(outs[0]), [np.asarray(o) for o in outs[1:]]


@dataclass
class GenerationResult:
    """The prompt's ids, the generated ids and text, and how long it took."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    seconds: float
    prefill_seconds: float
    stopped_at_eos: bool
    per_token_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second, prefill included."""
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt``: through the chat template (with the generation prompt) when the tokenizer has one
    and ``chat`` is not False, else the plain tokenization without special tokens."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if chat:
        if not has_template:
            raise GenerationError("chat=True but the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def _as_runner(model: Any) -> StepRunner:
    if isinstance(model, Module):
        return InterpreterRunner(model)
    inner = getattr(model, "module", None)
    if isinstance(inner, Module):
        return InterpreterRunner(inner)
    if hasattr(model, "prefill") and hasattr(model, "decode"):
        return model
    raise GenerationError(f"cannot generate with {type(model).__name__}: pass a qir Module, an import result, or "
                          f"an object with prefill() and decode()")


def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> int:
    """The next token: argmax when ``temperature`` is 0, else a sample from ``softmax(logits / temperature)``."""
    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate_ids(model: Module | StepRunner | Any, ids: Sequence[int], *, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None,
                 on_token: Callable[[int], None] | None = None, temperature: float = 0.0,
                 seed: int | None = None) -> tuple[list[int], bool, float, list[float]]:
    """Ids after ``ids``; returns (new ids, stopped at EOS, prefill seconds, seconds per decode step).

    Greedy when ``temperature`` is 0 (the default); otherwise sampled from the softmax at that temperature with a
    ``numpy`` generator seeded by ``seed`` (the same seed gives the same text).
    """
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, not {temperature}")
    rng = np.random.default_rng(seed) if temperature > 0 else None
    runner = _as_runner(model)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    n = len(ids)
    if n == 0:
        raise GenerationError("the prompt is empty")
    if n + max_new_tokens > runner.max_seq:
        raise GenerationError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the decode graph's "
                              f"cache of {runner.max_seq} slots; re-import with a larger --max-seq")
    t0 = time.perf_counter()
    logits, caches = runner.prefill(np.asarray([list(ids)], dtype=np.int64))
    prefill_s = time.perf_counter() - t0
    caches = [_pad_cache(c, runner.max_seq) for c in caches]
    out: list[int] = []
    steps: list[float] = []
    next_id = _choose(logits[0, -1], temperature, rng)
    position = n
    stopped = False
    while True:
        out.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if next_id in eos:
            stopped = True
            break
        if len(out) >= max_new_tokens:
            break
        t1 = time.perf_counter()
        logits, caches = runner.decode(np.asarray([[next_id]], dtype=np.int64), np.asarray([position], np.int64),
                                       caches)
        steps.append(time.perf_counter() - t1)
        next_id = _choose(logits[0, -1], temperature, rng)
        position += 1
    return out, stopped, prefill_s, steps


def _pad_cache(c: np.ndarray, slots: int) -> np.ndarray:
    """Zero-pad a ``[1, n_kv, P, hd]`` prefill cache to ``slots`` positions along axis 2."""
    if c.ndim != 4:
        raise GenerationError(f"expected a [1, n_kv, seq, head_dim] cache, got shape {c.shape}")
    if c.shape[2] == slots:
        return c
    padded = np.zeros(c.shape[:2] + (slots,) + c.shape[3:], dtype=c.dtype)
    padded[:, :, : c.shape[2]] = c
    return padded


def generate(model: Module | StepRunner | Any, prompt: str | Sequence[int], *, tokenizer: Any | None = None,
             max_new_tokens: int = 32, chat: bool | None = None, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None, temperature: float = 0.0,
             seed: int | None = None) -> GenerationResult:
    """Generation for ``prompt`` (text, or token ids) through ``model``'s prefill/decode functions: greedy, or
    sampled when ``temperature`` > 0 (reproducible with ``seed``).

    ``model``: a qir Module with ``prefill``/``decode``, the result of :func:`qir.import_model` (its tokenizer is
    used when ``tokenizer`` is not given), or a :class:`StepRunner`. Text prompts go through the chat template when
    the tokenizer has one (``chat=None``) — pass ``chat=False`` for raw text. ``on_text`` receives each new
    token's text as it is produced (streaming).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer (pass tokenizer=, or token ids)")
        ids = prompt_ids(tokenizer, prompt, chat=chat)
    else:
        ids = [int(i) for i in prompt]
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos and tokenizer is not None else None
    callback = None
    if on_text is not None:
        if tokenizer is None:
            raise GenerationError("on_text needs a tokenizer")

        def callback(tok: int) -> None:
            on_text(tokenizer.decode([tok], skip_special_tokens=True))

    t0 = time.perf_counter()
    new, stopped, prefill_s, steps = generate_ids(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                                  on_token=callback, temperature=temperature, seed=seed)
    seconds = time.perf_counter() - t0
    shown = new[:-1] if stopped else new  # the EOS itself is not part of the text
    text = tokenizer.decode(shown) if tokenizer is not None else ""
    return GenerationResult(prompt_ids=ids, token_ids=new, text=text, seconds=seconds, prefill_seconds=prefill_s,
                            stopped_at_eos=stopped, per_token_seconds=steps)
