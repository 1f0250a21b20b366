"""The numbers of a compile report: totals against the float model, a per-layer table, and quality on a sample.

:func:`build_report` extends the ``report.json`` that :func:`qir.backends.compile.compile_module` writes with

* ``totals``: parameters, float bytes (every constant as f32), qir stored bytes of the compiled module (codes and
  quantization parameters, :func:`qir.stored_bytes`), bits per parameter, the compression ratio;
* ``layers``: one row per weight (a constant of the float module with at least two dimensions): stored dtype and
  bits, granularity, stored bytes (with its scale and zero-point constants), and the relative weight error
  ``||W~ - W|| / ||W||`` of the dequantized weight against the float one, and for causal LMs the relative output
  error ``||x (W~ - W)^T|| / ||x W^T||`` of each linear on its real float input over 64 tokens (:func:`output_errors`);
* ``quality``: the compiled artifact run on its backend against the float PyTorch model on a small, bounded
  sample -- perplexity over ``windows`` windows of ``window`` tokens of a license text for causal LMs (default 2 x
  256, a few seconds), embedding cosine on built-in sentences for encoders. ``windows=0`` skips it;
* ``others``: earlier compiles of the same model in sibling folders (their preset, size and quality), so the
  size-vs-quality plot shows every preset tried.

:func:`summary_text` is the short text ``qir compile`` prints at the end; :mod:`qir.tools.report_html` draws the
plots and writes ``report.html``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Module

__all__ = ["DEFAULT_EVAL_WINDOW", "DEFAULT_EVAL_WINDOWS", "EVAL_TEXTS", "ReportError", "build_report",
           "default_eval_text", "layer_rows", "quality", "sibling_compiles", "summary_text", "totals"]

DEFAULT_EVAL_WINDOWS = 2
DEFAULT_EVAL_WINDOW = 256

#: Perplexity text: on every Debian machine, and Python's own license as the fallback; never fetched at run time.
#: (Calibration defaults to a different text, Apache-2.0, so the sample is not the text the model was tuned on.)
EVAL_TEXTS: tuple[Path, ...] = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt",
    Path(sys.base_prefix) / "LICENSE.txt",
)


class ReportError(QirError):
    """The report cannot be built (no text to measure on, an artifact that does not run ...)."""


def default_eval_text() -> Path | None:
    """The first of :data:`EVAL_TEXTS` that exists."""
    return next((p for p in EVAL_TEXTS if p.is_file()), None)


def _params(module: Module) -> int:
    return sum(c.type.numel() for c in module.constants.values()
               if c.type.is_static and not c.name.startswith("calib."))


def totals(float_module: Module, module: Module) -> dict[str, Any]:
    """Sizes of the compiled module against the float one (see the module docstring)."""
    from qir.serialize import stored_bytes

    params = _params(float_module)
    float_bytes = 4 * params
    qbytes = stored_bytes(module)
    return {"params": params, "float_bytes": float_bytes, "qir_bytes": qbytes,
            "bits_per_param": 8 * qbytes / params if params else float("nan"),
            "compression": float_bytes / qbytes if qbytes else float("nan")}


def _granularity(t: Any) -> str:
    q = t.quant
    if q is None:
        return "-"
    if q.axis is None:
        return "per tensor"
    if q.group_size is not None:
        return f"group {q.group_size} (axis {q.axis})"
    return f"per channel (axis {q.axis})"


def layer_rows(float_module: Module, module: Module) -> list[dict[str, Any]]:
    """One row per weight of ``float_module`` as ``module`` stores it (see the module docstring)."""
    from qir.interpreter import RunContext
    from qir.passes.merge_siblings import stacked_sources
    from qir.quant import QTensor

    ctx = RunContext(module)
    stacked = stacked_sources(float_module, module)  # q/k/v stacked by merge-siblings: each keeps its own row
    stacks: dict[str, np.ndarray] = {}
    ref_ctx = RunContext(float_module)  # the input may itself be quantized (a .qir from qir quantize): dequantize it
    params_of = {ref for m in (float_module, module) for c in m.constants.values() if c.type.quant is not None
                 for ref in c.type.quant.constant_refs}  # scales and zero points are not layers of their own
    rows: list[dict[str, Any]] = []
    for c in float_module.constants.values():
        if len(c.type.shape) < 2 or not c.type.is_static or c.name.startswith("calib.") or c.name in params_of:
            continue
        where = stacked.get(c.name)
        stored = where.stacked if where is not None else c.name
        if stored not in module.constants:
            rows.append({"name": c.name, "dtype": "-", "bits": None, "granularity": "replaced", "params":
                         c.type.numel(), "bytes": 0, "rel_error": None})
            continue
        qc = module.constant(stored)
        t = qc.type
        nbytes = t.nbytes()
        if t.quant is not None:
            for ref in t.quant.constant_refs:
                if ref in module.constants:
                    nbytes += module.constant(ref).type.nbytes()
        if where is not None:  # its share of the stack (every row costs the same)
            nbytes = nbytes * (where.end - where.start) // int(t.shape[0])  # type: ignore[arg-type]
        rel: float | None
        try:
            ref = ref_ctx.constant(c.name)
            w = ref.dequantize() if isinstance(ref, QTensor) else np.asarray(ref, dtype=np.float32)
            w = np.asarray(w, dtype=np.float32)
            if stored not in stacks:
                data = ctx.constant(stored)
                wq = data.dequantize() if isinstance(data, QTensor) else np.asarray(data, dtype=np.float32)
                if where is not None:  # a stack is dequantized once for its members (which come one after another)
                    stacks.clear()
                    stacks[stored] = wq
            if where is not None:
                wq = stacks[stored][where.start:where.end]
            denom = float(np.linalg.norm(w))
            rel = float(np.linalg.norm(wq.astype(np.float32) - w)) / denom if denom > 0 else 0.0
        except (QirError, ValueError):
            rel = None  # a layout the dequantizer does not know (e.g. a codebook): shown as n/a, never made up
        rows.append({"name": c.name, "dtype": str(t.dtype), "bits": t.dtype.bits, "granularity": _granularity(t),
                     "params": c.type.numel(), "bytes": nbytes, "rel_error": rel})
    return rows


def output_errors(float_module: Module, module: Module, feed: dict[str, np.ndarray], function: str
                  ) -> dict[str, float]:
    """Relative output error ``||x (W~ - W)^T|| / ||x W^T||`` of every ``linear`` weight on real activations.

    One float run of ``function`` on ``feed`` by the reference interpreter; ``x`` is each linear's input there
    (so every layer sees float inputs: the error its own rounding adds, not the accumulated one). Weights ``module``
    does not store in a way :class:`~qir.interpreter.RunContext` can dequantize are left out.
    """
    from qir.interpreter import Interpreter, RunContext
    from qir.passes.merge_siblings import stacked_sources
    from qir.quant import QTensor

    func = float_module.function(function)
    readers: dict[int, list[str]] = {}
    for op in func.ops:
        if op.opcode == "linear" and len(op.operands) > 1 and op.operands[1].is_constant:
            readers.setdefault(id(op.operands[0]), []).append(op.operands[1].name)
    ctx, ref_ctx = RunContext(module), RunContext(float_module)
    sums: dict[str, list[float]] = {}
    stacked = stacked_sources(float_module, module)

    dequantized: dict[str, np.ndarray] = {}  # a stack is dequantized once for all its members

    def dense(c: RunContext, name: str) -> np.ndarray:
        data = c.constant(name)
        return np.asarray(data.dequantize() if isinstance(data, QTensor) else data, dtype=np.float32)

    def stored(name: str) -> np.ndarray:
        where = stacked.get(name)
        if where is None:
            return dense(ctx, name)
        if where.stacked not in dequantized:
            dequantized.clear()  # the members of a stack read the same input, one after another: keep one stack
            dequantized[where.stacked] = dense(ctx, where.stacked)
        return dequantized[where.stacked][where.start:where.end]

    def observe(value: Any, data: Any) -> None:
        names = readers.get(id(value))
        if not names:
            return
        x = np.asarray(data.dequantize() if isinstance(data, QTensor) else data, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        for name in names:
            if name not in module.constants and name not in stacked:
                continue
            try:
                w, wq = dense(ref_ctx, name), stored(name)
            except (QirError, ValueError):
                continue
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(np.square(x @ (wq - w).T).sum())
            acc[1] += float(np.square(x @ w.T).sum())

    Interpreter(float_module).run(feed, function=function, observer=observe)
    return {name: (e / r) ** 0.5 if r > 0 else 0.0 for name, (e, r) in sums.items()}


def quality(artifact_dir: Path, imported: Any, *, text: Path | None, windows: int,
            window: int = DEFAULT_EVAL_WINDOW) -> dict[str, Any] | None:
    """Quality of the artifact in ``artifact_dir`` against the float model; None when ``windows`` is 0."""
    if windows <= 0:
        return None
    from qir.backends.compile import load_artifact
    from qir.evaluate import embedding_cosine, perplexity, torch_logits_fn
    from qir.tools.progress import Progress

    artifact = load_artifact(artifact_dir)
    if imported.kind == "causal-lm":
        text = text or default_eval_text()
        if text is None:
            raise ReportError("no perplexity text found (tried " + ", ".join(map(str, EVAL_TEXTS)) + "); give "
                              "--eval-text FILE or --eval-windows 0")
        tok = artifact.tokenizer
        with Progress(f"evaluate: perplexity, {windows} x {window} tokens, float and compiled", total=2) as bar:
            ref = perplexity(torch_logits_fn(imported.float_model().module), text, tokenizer=tok, window=window,
                             max_windows=windows)
            bar.update()
            got = perplexity(artifact.logits_fn(), text, tokenizer=tok, window=window, max_windows=windows)
            bar.update()
        return {"metric": "ppl", "float": ref.ppl, "compiled": got.ppl, "change": got.ppl / ref.ppl - 1.0,
                "text": str(text), "windows": got.windows, "window": window, "tokens": got.tokens}
    if imported.kind == "encoder":
        from qir.evaluate import DEFAULT_SENTENCES

        ref_model = imported.float_model()
        max_len = getattr(getattr(ref_model, "facts", None), "max_seq_len", None)
        with Progress("evaluate: embedding cosine vs float"):
            res = embedding_cosine(artifact.embed_fn(artifact.tokenizer, max_length=max_len),
                                   lambda s: ref_model.embed(s).numpy(), DEFAULT_SENTENCES)
        return {"metric": "cosine", "float": 1.0, "compiled": res.cosine_mean, "change": res.cosine_mean - 1.0,
                "cosine_min": res.cosine_min, "sentences": len(DEFAULT_SENTENCES)}
    return None


def sibling_compiles(parent: Path, source: str | None, exclude: Path) -> list[dict[str, Any]]:
    """Other compiles of ``source`` in ``parent``'s sub-folders that measured quality the same way."""
    out: list[dict[str, Any]] = []
    if source is None or not parent.is_dir():
        return out
    for rp in sorted(parent.glob("*/report.json")):
        if rp.parent.name == exclude.name or rp.parent.name.startswith("."):
            continue
        try:
            rep = json.loads(rp.read_text())
        except (OSError, ValueError):
            continue
        q, tot = rep.get("quality"), rep.get("totals")
        if rep.get("source") != source or not q or not tot:
            continue
        out.append({"folder": rp.parent.name, "preset": rep.get("preset") or rep.get("pipeline") or "?",
                    "target": rep.get("target"), "qir_bytes": tot["qir_bytes"], "metric": q["metric"],
                    "compiled": q["compiled"], "float": q["float"], "windows": q.get("windows"),
                    "window": q.get("window"), "text": q.get("text")})
    return out


def build_report(report: dict[str, Any], *, artifact_dir: Path, out_dir: Path, float_module: Module,
                 module: Module, imported: Any, eval_text: Path | None, eval_windows: int,
                 eval_window: int = DEFAULT_EVAL_WINDOW) -> dict[str, Any]:
    """Add totals, layers, quality and other compiles to ``report`` (in place; also returned).

    ``artifact_dir``: where the artifact is now (the temporary folder before it is committed); ``out_dir``: where
    it will be (its parent is searched for earlier compiles of the same model).
    """
    report["totals"] = totals(float_module, module)
    report["layers"] = layer_rows(float_module, module)
    from qir.backends.compile import load_artifact

    elsewhere = getattr(load_artifact(artifact_dir), "runs_elsewhere", None)  # TVM: cross-compiled, or CUDA
    report["quality"] = None if elsewhere else quality(artifact_dir, imported, text=eval_text, windows=eval_windows,
                                                       window=eval_window)
    if report["quality"] is None:
        report["quality_note"] = ("skipped (--eval-windows 0)" if eval_windows <= 0 else
                                  f"not measured: {elsewhere}" if elsewhere else
                                  f"not measured: the model's kind is {imported.kind!r} (no tokenizer or float "
                                  f"reference known; import it with qir import to record them)")
    same = [o for o in sibling_compiles(out_dir.parent, report.get("source"), out_dir)
            if report["quality"] is None or (o["metric"] == report["quality"]["metric"]
                                              and o.get("windows") == report["quality"].get("windows")
                                              and o.get("window") == report["quality"].get("window")
                                              and o.get("text") == report["quality"].get("text"))]
    report["others"] = same
    if report["quality"] is not None and imported.kind == "causal-lm" and imported.tokenizer is not None:
        # Output error per layer on one short window (64 tokens of the perplexity text): cheap, a few seconds.
        from qir.evaluate import read_text

        text = eval_text or default_eval_text()
        ids = imported.tokenizer(read_text(text), add_special_tokens=False)["input_ids"][:64] if text else []
        fname = "prefill" if "prefill" in float_module.functions else float_module.main.name
        if len(ids) >= 2:
            from qir.tools.progress import Progress

            with Progress("report: per-layer output error (64 tokens, interpreter)"):
                errs = output_errors(float_module, module, {float_module.function(fname).inputs[0].name:
                                                            np.asarray([ids], dtype=np.int64)}, fname)
            for row in report["layers"]:
                row["output_error"] = errs.get(row["name"])
    return report


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_text(report: dict[str, Any], out_dir: Path) -> str:
    """The few lines ``qir compile`` prints about a finished compile."""
    tot = report.get("totals", {})
    what = report.get("preset") or (f"pipeline {report['pipeline']!r}" if report.get("pipeline") else "float")
    lines = [f"compiled {report.get('source') or report['module']} ({what}) for {report['target']} -> {out_dir}"]
    if tot:
        lines.append(f"  size     {_mb(tot['qir_bytes'])} of weights, {tot['bits_per_param']:.2f} bits/param "
                     f"(float {_mb(tot['float_bytes'])}, {tot['compression']:.2f}x smaller); "
                     f"artifact files {_mb(report['bytes'])}")
    q = report.get("quality")
    if q and q["metric"] == "ppl":
        lines.append(f"  quality  perplexity {q['compiled']:.3f} vs float {q['float']:.3f} ({100 * q['change']:+.2f}%) "
                     f"on {Path(q['text']).name}, {q['windows']} windows of {q['window']} tokens")
    elif q:
        lines.append(f"  quality  embedding cosine vs float: mean {q['compiled']:.4f}, min {q['cosine_min']:.4f} "
                     f"({q['sentences']} sentences)")
    else:
        lines.append(f"  quality  {report.get('quality_note', 'not measured')}")
    layers = report.get("layers") or []
    quantized = [r for r in layers if r["bits"] is not None and r["bits"] < 32]
    errs = [r for r in layers if r["rel_error"] is not None and not math.isnan(r["rel_error"])]
    if layers:
        kinds: dict[str, int] = {}
        for r in quantized:
            key = f"{r['dtype']} {r['granularity']}"
            kinds[key] = kinds.get(key, 0) + 1
        desc = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"
        worst = max(errs, key=lambda r: r["rel_error"]) if errs else None
        tail = f"; worst relative weight error {100 * worst['rel_error']:.2f}% ({worst['name']})" if worst else ""
        outs = [r for r in layers if r.get("output_error") is not None]
        if outs:
            w_out = max(outs, key=lambda r: r["output_error"])
            tail += f", output error {100 * w_out['output_error']:.2f}% ({w_out['name']})"
        lines.append(f"  layers   {len(quantized)}/{len(layers)} weights quantized: {desc}{tail}")
    if report.get("fallbacks"):
        lines.append(f"  fallback {len(report['fallbacks'])} op(s) kept in f16 (see report.json)")
    lines.append(f"  report   {out_dir / 'report.html'} (and report.json)")
    return "\n".join(lines) + "\n"
