"""``qir compile``: import a model, run a quantization preset or pipeline, write a target artifact and its report.

``qir compile [MODEL] [--target T] [--preset P | -p PIPELINE] [--calib-text FILE] [-o OUTDIR]`` writes
``OUTDIR/model.onnx`` (+ ``decode.onnx`` for causal LMs), ``target.json``, ``report.json`` and ``report.html`` with
its plots (:func:`qir.backends.compile.compile_module`, :mod:`qir.tools.report`, :mod:`qir.tools.report_html`),
then prints a short summary. With no arguments at all it compiles :data:`DEFAULT_MODEL` for :data:`DEFAULT_TARGET`
with :data:`DEFAULT_PRESET` into ``out/<model>-<target>-<preset>``. ``--show-pipeline`` prints the pipeline a preset
stands for. ``qir eval OUTDIR``, ``qir run OUTDIR`` and ``qir generate OUTDIR`` use the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qir.errors import QirError
from qir.tools import pass_cli

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRESET", "DEFAULT_TARGET", "PRESETS", "PRESET_MEANING", "add_compile_parser",
           "cmd_compile", "default_output", "parse_bind"]

#: What ``qir compile`` compiles when given no model.
DEFAULT_MODEL = "smollm2-135m"
#: The host-CPU target. One constant, so the default can move to tvm-llvm when that backend lands.
DEFAULT_TARGET = "ort-cpu"
#: The default preset. Chosen by measurement on SmolLM2-135M (GPL-3, ratio to the float model): w8a16 costs +0.45%
#: perplexity and keeps every answer we tried; w8a8 (dynamic int8 activations) costs +3.9%; the 4-bit presets more.
#: int8 weights already make the model 4x smaller, which is what the default should deliver without surprises.
DEFAULT_PRESET = "w8a16"

#: Preset name -> pass pipeline.
PRESETS: dict[str, str] = {
    "float": "",
    "w8a8": "quantize{scheme=w8a8},merge-siblings",
    "w8a8-smooth": "calibrate,fold-scales{smooth=0.5},quantize{scheme=w8a8},merge-siblings",
    "w8a16": "quantize{scheme=w8a16},merge-siblings",
    "w4a16": "quantize{scheme=w4a16,group=32,zero=float},compress-scales,merge-siblings",
    "w4a8": "quantize{scheme=w4a8,group=32,zero=float},compress-scales,merge-siblings",
    "w4a16-mixed": 'mixed-precision{budget=5.5,candidates="8,4g32,4"},dce,merge-siblings',
    "w4a16-split": 'split-vocab{hot=8192},quantize{scheme=w4a16,group=32,zero=float,overrides="*.hot=i8;*.cold=i4g32"},'
                   'compress-scales,merge-siblings',
    "npu-int8": "calibrate,quantize{scheme=w8a8,act=static,embedding=none,head=none}",
    # No re-quantization: a GGUF model keeps its own blocks (imported with keep_quantized), a .qir stays as is.
    "keep": "",
}
#: Every quantizing preset but npu-int8 ends with merge-siblings (q/k/v and gate/up as one matmul each in a decode
#: step, exactly the same results): one kernel launch instead of three or two, and short k/v GEMVs no longer leave a
#: thread idle (SmolLM2 w4a8 decode on tvm-llvm: +6%). An encoder (MiniLM) has no single-token function and is left
#: as it is. npu-int8 keeps one MatMul per projection, the graph Ascend tools expect.

#: Preset name -> what it means (``qir compile --help`` and the README's table).
PRESET_MEANING: dict[str, str] = {
    "float": "lower the float model as it is",
    "w8a8": "int8 weights per output channel, int8 activations per token at run time",
    "w8a8-smooth": "w8a8 after SmoothQuant migration (norms -> q/k/v, gate/up; up -> down) from calibration text; "
                   "needs a tokenizer or --calib-text",
    "w8a16": "int8 weights per output channel, float activations (the default: +0.45% perplexity on SmolLM2)",
    "w4a16": "int4 weights in groups of 32 with a float scale and minimum per group (llama.cpp's Q4_1 blocks), "
             "those stored as 8 bits against one fp16 pair per row (compress-scales); float activations",
    "w4a8": "w4a16's weights (Q4_1-style groups of 32, compressed scales and minimums) with int8 activations per "
            "token at run time, as llama.cpp's Q4_1 x Q8 dot product: integer dot products on tvm-llvm",
    "w4a16-mixed": "8 or 4 bits per weight tensor, chosen by Hessian-weighted sensitivity on calibration text "
                   "under a 5.5 bits/param budget",
    "w4a16-split": "w4a16, and the embedding table / tied head split by token frequency on calibration text: the "
                   "8192 most frequent rows int8, the rest 4-bit in groups of 32 (4.74 bits/param, +1.3% perplexity "
                   "on SmolLM2)",
    "npu-int8": "static per-tensor int8 activations from calibration, as Ascend-style NPUs want",
    "keep": "no re-quantization: a GGUF model keeps its own blocks (Q8_0, Q4_0, Q4_1, Q5_x, K-quants) losslessly",
}

#: Passes that read calibration data: when a pipeline has one and no --calib-text is given, a default text is used.
CALIBRATED_PASSES = frozenset({"calibrate", "mixed-precision", "outlier-split", "fold-scales", "vocab-share",
                               "split-vocab"})
#: Calibration text by default: Debian's Apache-2.0 text, else Python's license (never the perplexity text).
CALIB_TEXTS: tuple[Path, ...] = (
    Path("/usr/share/common-licenses/Apache-2.0"),
    Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt",
)


class CompileUsageError(QirError):
    """A ``qir compile`` invocation that cannot work (unknown preset, unwritable folder ...)."""


def parse_bind(text: str | None) -> dict[str, int]:
    """``"batch=1,seq=128"`` -> ``{"batch": 1, "seq": 128}``."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise QirError(f"--bind {text!r}: expected NAME=INT pairs separated by commas, e.g. seq=128") from None
        if not eq or not name.strip():
            raise QirError(f"--bind {text!r}: expected NAME=INT pairs separated by commas, e.g. seq=128")
    return out


def _preset_name(args: argparse.Namespace) -> str | None:
    """The preset in effect: --preset, else none with -p, else the default (float for a .qir file)."""
    if args.preset and args.pipeline:
        raise CompileUsageError("give either --preset or -p PIPELINE, not both")
    if args.preset:
        if args.preset not in PRESETS:
            raise CompileUsageError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
        return str(args.preset)
    if args.pipeline is not None:
        return None
    # A .qir file may come from `qir quantize` already: lower it as it is unless a preset is asked for.
    model = args.model or DEFAULT_MODEL
    return "float" if str(model).endswith(".qir") else DEFAULT_PRESET


def _model_stem(model: str) -> str:
    p = Path(model)
    return p.stem if p.suffix else (p.name or "model")


def default_output(model: str, target: str, preset: str | None) -> Path:
    """``out/<model>-<target>-<preset>`` (``custom`` for a -p pipeline)."""
    return Path("out") / f"{_model_stem(model)}-{target}-{preset or 'custom'}"


def _check_writable(out: Path) -> None:
    """Fail before the slow steps when ``out`` cannot be created (the compile itself writes atomically)."""
    if out.exists() and not out.is_dir():
        raise CompileUsageError(f"-o {out}: exists and is not a folder")
    parent = out.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CompileUsageError(f"-o {out}: cannot write in {existing} (permission denied); choose another folder")


def _calib_default(pipeline: str) -> str | None:
    """The default calibration text when ``pipeline`` has a pass that reads calibration data, else None."""
    from qir.passes import parse_pipeline

    if not any(p.name in CALIBRATED_PASSES or getattr(p, "rounding", None) == "gptq"
               for p in parse_pipeline(pipeline)):
        return None
    return next((str(p) for p in CALIB_TEXTS if p.is_file()), None)


def cmd_compile(args: argparse.Namespace) -> int:
    from qir.backends.compile import compile_module
    from qir.backends.target import load_target

    preset = _preset_name(args)
    pipeline = PRESETS[preset] if preset is not None else args.pipeline
    if args.show_pipeline:
        print(pipeline)
        return 0
    model = args.model or DEFAULT_MODEL
    target = load_target(args.target)  # an unknown target fails here, listing the known ones, before any work
    out = Path(args.output) if args.output else default_output(model, target.name, preset)
    _check_writable(out)
    if args.eval_windows < 0 or args.eval_window < 2:
        raise CompileUsageError("--eval-windows must be >= 0 and --eval-window >= 2")
    eval_text = Path(args.eval_text) if args.eval_text else None
    if eval_text is not None and not eval_text.is_file():
        raise CompileUsageError(f"--eval-text {eval_text}: no such text file")
    from qir.passes import load_entry_points, load_pass_file, parse_pipeline

    for f in args.load_pass:
        load_pass_file(f)
    args.load_pass = []  # loaded once, here: the pipeline run below must not register them a second time
    load_entry_points()
    parse_pipeline(pipeline or "")  # unknown passes and options fail before the model is imported
    if args.calib_text is not None and not Path(args.calib_text).is_file():
        raise CompileUsageError(f"--calib-text {args.calib_text}: no such text file")
    if not args.quiet and not args.json:
        print(f"compiling {model} for {target.name} with {f'preset {preset}' if preset else 'pipeline'} "
              f"{pipeline!r} -> {out}", file=sys.stderr)

    from qir.frontend.importer import import_model

    keep = args.preset == "keep" and Path(model).suffix.lower() not in (".qir", ".pt2", ".onnx")
    imported = import_model(model, max_seq=args.max_seq, keep_quantized=keep)
    if args.calib_text is None and imported.tokenizer is not None:
        args.calib_text = _calib_default(pipeline)
    float_module = imported.module
    module = float_module
    if pipeline:
        args.pipeline = pipeline
        module = pass_cli.run_pipeline_from_args(args, imported)
        # Per-layer errors compare with the float weights as they entered quantization (smoothing rescales them).
        float_module = args.float_snapshot.reference(float_module)
    meta: dict[str, Any] = {"source": imported.source, "kind": imported.kind, "preset": preset,
                            "pipeline": pipeline,
                            **{k: v for k, v in imported.options.items() if k == "max_seq"}}
    if getattr(args, "accounting", None) is not None:
        meta["pass_accounting"] = args.accounting.to_json()
    if args.calib_text:
        meta["calib_text"] = str(args.calib_text)

    def finish(folder: Path, report: dict[str, Any]) -> None:
        from qir.tools.report import build_report
        from qir.tools.report_html import write_html_report

        build_report(report, artifact_dir=folder, out_dir=out, float_module=float_module, module=module,
                     imported=imported, eval_text=eval_text, eval_windows=args.eval_windows,
                     eval_window=args.eval_window)
        write_html_report(report, folder)

    result = compile_module(module, target, out, bind=parse_bind(args.bind), fallback=args.fallback,
                            check=not args.no_check, meta=meta, finish=finish)
    rep = result.report
    if args.json:
        print(json.dumps(rep))
        return 0
    from qir.tools.report import summary_text

    for fname, info in rep["functions"].items():
        if "onnx_ops" not in info:  # a TVM artifact: one library for every function
            print(f"  @{fname}: {info['file']}; inputs {', '.join(info['inputs'])}; matmuls: {rep.get('kernels')}")
            continue
        ops = ", ".join(f"{k} {v}" for k, v in list(info["onnx_ops"].items())[:6])
        print(f"  @{fname}: {info['file']} {info['bytes']:,} bytes; ONNX ops: {ops}, ...")
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for w in rep["warnings"]:
        by_rule.setdefault(w["rule"], []).append(w)
    for rule, ws in by_rule.items():
        print(f"  warning [{rule}] {len(ws)} op(s), e.g. {ws[0]['where']}: {ws[0]['message']} (all in report.json)",
              file=sys.stderr)
    sys.stdout.write(summary_text(rep, result.out_dir))
    return 0


def _presets_help() -> str:
    return "\n".join(f"  {name:12s} {PRESET_MEANING[name]}\n  {'':12s} pipeline: {PRESETS[name] or '(none)'}"
                     for name in PRESETS)


def add_compile_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compile`` subcommand to ``qir``'s subparsers."""
    from qir.backends.target import list_targets

    p = sub.add_parser(
        "compile", help="compile a model for a target into an artifact folder with a report",
        description=f"Import MODEL (zoo name, HF folder, .gguf, .pt2, .onnx or .qir; default {DEFAULT_MODEL}), run a "
                    f"quantization preset or pipeline, lower it for --target (default {DEFAULT_TARGET}, the host "
                    f"CPU) and write OUTDIR (default out/<model>-<target>-<preset>): model.onnx (+ decode.onnx), "
                    f"target.json, report.json and report.html with plots: sizes and quality against the float "
                    f"model, a per-layer table. Targets that a module breaks refuse with every offending op, the "
                    f"rule and the fix. The folder is written atomically: an interrupted compile leaves none.\n\n"
                    f"The default preset is {DEFAULT_PRESET}: on SmolLM2-135M it costs +0.45% perplexity against "
                    f"float (w8a8: +3.9%) and the model answers as the float one does, at a quarter of the size. "
                    f"A .qir file is lowered as it is (it may come from qir quantize) unless --preset is given.\n\n"
                    f"presets:\n{_presets_help()}",
        epilog="examples:\n  qir compile        # smollm2-135m, ort-cpu, w8a16 -> out/smollm2-135m-ort-cpu-w8a16"
               "\n  qir compile minilm-l6 --target ort-cpu --preset w8a8 -o out/minilm-w8a8\n"
               "  qir compile smollm2-135m --target ort-cpu --preset keep -o out/smollm2-gguf   (GGUF blocks as is)\n"
               "  qir compile minilm-l6 --target ort-ascend --preset npu-int8 --calib-text FILE "
               "--bind batch=1,seq=128 -o out/minilm-npu\n  qir compile --preset npu-int8 --show-pipeline\n\n"
               "exit codes: 0 compiled, 2 bad usage or the model does not fit the target (message says why)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", help=f"what to compile (default {DEFAULT_MODEL})")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"one of {', '.join(list_targets())} (default {DEFAULT_TARGET}; qir targets lists them)")
    p.add_argument("--preset", metavar="P", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="artifact folder (default out/<model>-<target>-<preset>)")
    p.add_argument("--show-pipeline", action="store_true", help="print the preset's pipeline and exit")
    p.add_argument("--bind", metavar="NAME=INT,...", help="fix symbolic sizes (static-shape targets need it)")
    p.add_argument("--fallback", action="store_true",
                   help="keep ops that break a target rule in f16 (listed in report.json) instead of refusing")
    p.add_argument("--max-seq", type=int, default=None, help="as for qir import, when MODEL is traced here")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker (full check)")
    p.add_argument("--eval-windows", type=int, default=2,
                   help="report: perplexity windows (causal LMs) to measure against float; 0 skips (default 2)")
    p.add_argument("--eval-window", type=int, default=256, help="report: tokens per window (default 256)")
    p.add_argument("--eval-text", metavar="FILE", help="report: perplexity text (default Debian's GPL-3 text)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    pass_cli.add_pipeline_arguments(p, required=False)
    p.set_defaults(func=cmd_compile)
    return p
