"""``qir debug bisect``: the fewest layers to keep at higher precision so the model metric meets a bound.

1. **Sensitivity.** The pipeline runs once as given; :func:`qir.debug.compare.compare_sources` compares the
   float and the quantized module on the sample, and every quantized weight is scored by the SQNR drop of the
   op that reads it (``qmatmul`` / ``qembedding`` result): how much error that layer adds. Candidates are the
   quantized weights ordered by that score, worst first.
2. **Search.** Keeping the first ``k`` candidates at ``higher`` precision (a ``quantize`` override per weight,
   appended to the pipeline's own overrides, so they win) is assumed to improve the metric as ``k`` grows.
   ``k = 0`` is measured first; then ``k = 1, 2, 4, ...`` (galloping) until the bound is met, then a binary
   search between the last failing and the first passing ``k``. When one layer broke the model this costs two
   or three evaluations; in general ``O(log n)``.
3. **Pruning.** With a small set, each member is dropped in turn and kept out if the bound still holds (the
   ranking is a heuristic; this removes layers it over-ranked).

Each evaluation re-runs the pipeline and measures a :class:`~qir.debug.account.BoundedMetric` (perplexity on a
window or two for LLMs). The result's ``overrides`` is ready to paste into the pipeline string.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qir.debug.account import BoundedMetric
from qir.debug.compare import CompareResult, compare_sources
from qir.debug.sources import DebugError, QirSource
from qir.graph import Module
from qir.passes import PassContext, PassManager, parse_pipeline
from qir.passes.quantize import PER_TENSOR, SCHEMES, Quantize

__all__ = ["BisectResult", "Evaluation", "bisect_layers", "layer_sensitivity", "with_overrides"]


@dataclass(frozen=True)
class Evaluation:
    """One measured configuration: the weights kept at higher precision and the metric."""

    kept: tuple[str, ...]
    metric: float


@dataclass
class BisectResult:
    """The chosen weights, the override text and pipeline, and every evaluation made."""

    metric_name: str
    bound: float
    higher: str
    candidates: list[tuple[str, float]]  # (weight, SQNR drop dB), worst first
    kept: list[str]
    met: bool
    evaluations: list[Evaluation] = field(default_factory=list)
    pipeline: str = ""

    @property
    def overrides(self) -> str:
        return ";".join(f"{w}={self.higher}" for w in self.kept)

    @property
    def baseline(self) -> float:
        return self.evaluations[0].metric

    @property
    def final(self) -> float:
        kept = sorted(self.kept)
        return next(e.metric for e in reversed(self.evaluations) if sorted(e.kept) == kept)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "bound": self.bound, "higher": self.higher, "met": self.met,
                "kept": self.kept, "overrides": self.overrides, "pipeline": self.pipeline,
                "baseline": self.baseline, "final": self.final,
                "candidates": [{"weight": w, "sqnr_drop_db": d} for w, d in self.candidates],
                "evaluations": [{"kept": list(e.kept), "metric": e.metric} for e in self.evaluations]}

    def format(self, top: int = 8) -> str:
        lines = [f"sensitivity (SQNR drop of each quantized layer's output, worst first; {len(self.candidates)} "
                 "layers):"]
        lines.extend(f"  {d:8.2f} dB  {w}" for w, d in self.candidates[:top])
        lines.append(f"evaluations ({self.metric_name}, bound {self.bound:g}):")
        for e in self.evaluations:
            what = "as given" if not e.kept else (f"{len(e.kept)} layer(s) at {self.higher}: "
                                                  + ", ".join(e.kept[:4]) + (" ..." if len(e.kept) > 4 else ""))
            lines.append(f"  {e.metric:12.4f}  {what}")
        if not self.kept and self.met:
            lines.append("the pipeline as given already meets the bound; no override needed")
        elif self.met:
            lines.append(f"{len(self.kept)} layer(s) at {self.higher} bring {self.metric_name} from "
                         f"{self.baseline:.4f} to {self.final:.4f} (bound {self.bound:g}):")
            lines.append(f'overrides="{self.overrides}"')
            lines.append(f"pipeline: '{self.pipeline}'")
        else:
            lines.append(f"no set of layers at {self.higher} meets the bound: with all {len(self.kept)} the "
                         f"{self.metric_name} is {self.final:.4f}")
        return "\n".join(lines) + "\n"


def with_overrides(pipeline: str, extra: str) -> str:
    """``pipeline`` with ``extra`` (``pat=scheme;...``) appended to every ``quantize`` pass's overrides."""
    passes = parse_pipeline(pipeline)
    found = False
    for p in passes:
        if isinstance(p, Quantize):
            found = True
            if extra:
                p.overrides = ";".join(x for x in (p.overrides, extra) if x)
    if not found:
        raise DebugError(f"pipeline {pipeline!r} has no quantize pass whose layers could be kept at higher precision")
    parts = []
    for p in passes:
        s = p.spelling()
        if isinstance(p, Quantize) and p.overrides:
            s = s.replace(f"overrides={p.overrides}", f'overrides="{p.overrides}"')
        parts.append(s)
    return ",".join(parts)


def layer_sensitivity(float_module: Module, quant_module: Module, feeds: list[dict[str, Any]],
                      *, function: str | None = None) -> tuple[list[tuple[str, float]], CompareResult]:
    """``[(float weight name, SQNR drop dB)]`` of every quantized weight, worst first, and the comparison."""
    result = compare_sources(QirSource(float_module, function=function),
                             QirSource(quant_module, function=function), feeds)
    drops = {t.name: t.drop_db for t in result.tensors}
    func = quant_module.function(function or ("prefill" if "prefill" in quant_module.functions else None))
    scores: dict[str, float] = {}
    for op in func.ops:
        if op.opcode == "qmatmul":
            w = op.operands[1]
        elif op.opcode == "qembedding":
            w = op.operands[0]
        else:
            continue
        name = w.name if w.name in float_module.constants else w.name.removesuffix(".q")
        if name not in float_module.constants:
            continue
        d = drops.get(op.result.name, math.nan)
        scores[name] = max(scores.get(name, -math.inf), d if not math.isnan(d) else -math.inf)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    return ranked, result


def bisect_layers(float_module: Module, pipeline: str, metric: BoundedMetric, bound: float, *,
                  feeds: list[dict[str, Any]], higher: str = "w8a16", context: PassContext | None = None,
                  prune_limit: int = 8, log: Callable[[str], None] | None = None) -> BisectResult:
    """Find the fewest quantized weights to keep at ``higher`` so that ``metric`` meets ``bound``."""
    if higher != "none" and higher.removesuffix(PER_TENSOR) not in SCHEMES:
        raise DebugError(f"--higher {higher!r}: use one of {', '.join(SCHEMES)} or none (keep float)")
    with_overrides(pipeline, "")  # fails early when there is no quantize pass
    ctx = context or PassContext()

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    def build(kept: tuple[str, ...]) -> Module:
        extra = ";".join(f"{w}={higher}" for w in kept)
        return PassManager(with_overrides(pipeline, extra), context=ctx).run(float_module)

    evaluations: list[Evaluation] = []
    cache: dict[tuple[str, ...], float] = {}

    def measure(kept: tuple[str, ...], module: Module | None = None) -> float:
        key = tuple(sorted(kept))
        if key not in cache:
            value = metric.measure(module if module is not None else build(kept))
            cache[key] = value
            evaluations.append(Evaluation(kept, value))
            say(f"  {metric.name} {value:.4f} with {len(kept)} layer(s) at {higher}")
        return cache[key]

    def ok(value: float) -> bool:
        return metric.better(value, bound) and math.isfinite(value)

    quant = build(())
    say("ranking layers by the error they add ...")
    candidates, _ = layer_sensitivity(float_module, quant, feeds)
    base = measure((), quant)
    del quant
    res = BisectResult(metric.name, bound, higher, candidates, [], ok(base), evaluations,
                       with_overrides(pipeline, ""))
    if res.met:
        return res
    names = [w for w, _ in candidates]
    n = len(names)
    lo, hi, k = 0, None, 1
    while k < n:
        if ok(measure(tuple(names[:k]))):
            hi = k
            break
        lo, k = k, k * 2
    if hi is None:
        if not ok(measure(tuple(names))):
            res.kept = names
            res.met = False
            res.pipeline = with_overrides(pipeline, res.overrides)
            return res
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(measure(tuple(names[:mid]))):
            hi = mid
        else:
            lo = mid
    kept = names[:hi]
    if 1 < len(kept) <= prune_limit:
        for w in list(kept):
            trial = tuple(x for x in kept if x != w)
            if ok(measure(trial)):
                kept = list(trial)
    res.kept = kept
    res.met = True
    res.pipeline = with_overrides(pipeline, res.overrides)
    return res
