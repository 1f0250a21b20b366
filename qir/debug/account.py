"""Per-pass accounting: what each pass of a pipeline cost (or recovered) in model quality.

:class:`PassAccounting` is a pass-manager instrument (``--account`` on ``qir quantize`` / ``qir compile``). It
measures a :class:`BoundedMetric` on the pipeline's input module, then again after every pass that changed the
IR -- except passes that never change numerics (:data:`NUMERICS_NEUTRAL`: ``calibrate`` only adds statistics,
``dce`` / ``cse`` only remove or merge) -- and reports each measured pass's change against the previous
measurement and against the input.

The metric runs on a bounded sample so accounting stays cheap: perplexity over ``windows`` windows of ``seq``
tokens (default 1 x 256) for causal LMs; for encoders the mean cosine of sentence embeddings against the
pipeline's input module on :data:`qir.evaluate.DEFAULT_SENTENCES` (or the lines of a text file).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qir.debug.sources import DebugError
from qir.graph import Module
from qir.passes.instruments import Instrument, PassRecord

__all__ = ["NUMERICS_NEUTRAL", "BoundedMetric", "PassAccounting", "bounded_metric"]

#: Passes that change the IR but never the numbers a model computes.
NUMERICS_NEUTRAL: frozenset[str] = frozenset({"calibrate", "dce", "cse"})


@dataclass
class BoundedMetric:
    """A model-quality number measured on a small fixed sample: ``measure(module) -> float``."""

    name: str                      # "ppl" or "cosine_mean"
    lower_is_better: bool
    sample: str                    # what it runs on, in words
    measure: Callable[[Module], float]

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` at least as good as ``b``?"""
        return a <= b if self.lower_is_better else a >= b


def bounded_metric(reference: Module, kind: str, tokenizer: Any, *, text: str | Path | None = None,
                   windows: int = 1, seq: int = 256) -> BoundedMetric:
    """The accounting/bisect metric for a model of ``kind``; ``reference`` is the float module (encoders)."""
    if tokenizer is None:
        raise DebugError("measuring the model needs its tokenizer: use a zoo name or a .qir written by qir import")
    if kind == "causal-lm":
        if text is None:
            raise DebugError("measuring perplexity needs text: give --calib-text FILE (or --account-text FILE)")
        from qir.evaluate import perplexity_of_ids, qir_logits_fn, read_text

        ids = tokenizer(read_text(text), add_special_tokens=False)["input_ids"]

        def ppl(module: Module) -> float:
            return perplexity_of_ids(qir_logits_fn(module), ids, window=seq, max_windows=windows).ppl

        return BoundedMetric("ppl", True, f"perplexity on {windows} window(s) of {seq} tokens of {text}", ppl)
    if kind == "encoder":
        from qir.evaluate import DEFAULT_SENTENCES, embedding_cosine, qir_embed_fn, read_text

        sentences = list(DEFAULT_SENTENCES)
        if text is not None:
            sentences = [ln.strip() for ln in read_text(text).splitlines() if ln.strip()][: max(1, windows) * 16]
        ref = qir_embed_fn(reference, tokenizer)(sentences)

        def cosine(module: Module) -> float:
            return embedding_cosine(qir_embed_fn(module, tokenizer), lambda _s: ref, sentences).cosine_mean

        return BoundedMetric("cosine_mean", False, f"mean embedding cosine vs the input model on "
                                                   f"{len(sentences)} sentences", cosine)
    raise DebugError(f"no quality metric for a model of kind {kind!r} (causal-lm and encoder have one)")


@dataclass
class _Step:
    index: int
    spelling: str
    changed: bool
    measured: bool
    value: float | None
    seconds: float


@dataclass
class PassAccounting(Instrument):
    """Measures ``metric`` on the input and after each numerics-changing pass; prints a table at the end."""

    metric: BoundedMetric | None = None
    make_metric: Callable[[Module], BoundedMetric] | None = None  # built from the input module when first seen
    out: TextIO | None = field(default_factory=lambda: sys.stderr)
    input_value: float | None = None
    steps: list[_Step] = field(default_factory=list)

    def before_pipeline_module(self, module: Module) -> None:
        if self.metric is None:
            if self.make_metric is None:
                raise DebugError("PassAccounting needs a metric or make_metric")
            self.metric = self.make_metric(module)
        self.steps = []
        self.input_value = self.metric.measure(module)

    def after_pass_module(self, record: PassRecord, module: Module) -> None:
        assert self.metric is not None
        measured = record.changed and record.name not in NUMERICS_NEUTRAL
        t0 = time.perf_counter()
        value = self.metric.measure(module) if measured else None
        self.steps.append(_Step(record.index, record.spelling, record.changed, measured, value,
                                time.perf_counter() - t0))

    def after_pipeline(self, records: list[PassRecord]) -> None:
        if self.out is not None:
            self.out.write(self.format())

    # -- results --------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One dict per pass: the metric after it (None when not measured), change vs previous and vs input."""
        prev = self.input_value
        out = []
        for s in self.steps:
            row: dict[str, Any] = {"index": s.index, "pass": s.spelling, "changed": s.changed,
                                   "measured": s.measured, "metric": s.value}
            if s.measured and s.value is not None and prev is not None:
                row["delta"] = s.value - prev
                row["delta_pct"] = _pct(s.value, prev)
                row["vs_input_pct"] = _pct(s.value, self.input_value)
                prev = s.value
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        assert self.metric is not None
        final = next((s.value for s in reversed(self.steps) if s.measured), self.input_value)
        return {"metric": self.metric.name, "lower_is_better": self.metric.lower_is_better,
                "sample": self.metric.sample, "input": self.input_value, "final": final, "steps": self.rows()}

    def format(self) -> str:
        assert self.metric is not None
        m = self.metric
        lines = [f"// pass accounting: {m.sample} ({'lower' if m.lower_is_better else 'higher'} is better)",
                 f"//   {'step':4s}  {'pass':56s} {m.name:>12s} {'change':>10s} {'vs input':>10s}",
                 f"//   {'':4s}  {'(input)':56s} {_num(self.input_value):>12s}"]
        for r in self.rows():
            spelling = r["pass"] if len(r["pass"]) <= 56 else r["pass"][:53] + "..."
            if not r["measured"]:
                why = "no change" if not r["changed"] else "numerics unchanged"
                lines.append(f"//   {r['index'] + 1:<4d}  {spelling:56s} {'-':>12s}   ({why})")
                continue
            lines.append(f"//   {r['index'] + 1:<4d}  {spelling:56s} {_num(r['metric']):>12s} "
                         f"{_signed(r.get('delta_pct')):>10s} {_signed(r.get('vs_input_pct')):>10s}")
        return "\n".join(lines) + "\n"


def _pct(a: float, b: float | None) -> float | None:
    if b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return 100.0 * (a - b) / abs(b)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.6f}" if abs(x) < 10 else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}%"
