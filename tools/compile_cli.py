"""``qir compile``: import a model, run a quantization pipeline, and write a target artifact folder.

``qir compile MODEL --target T [--preset P | -p PIPELINE] [--calib-text FILE] [--bind seq=128] [--fallback]
-o OUTDIR`` writes ``OUTDIR/model.onnx`` (+ ``decode.onnx`` for causal LMs), ``target.json`` and ``report.json``
(:func:`qir.backends.compile.compile_module`). ``--show-pipeline`` prints the pipeline a preset stands for.
``qir eval OUTDIR`` reads the folder with :func:`qir.backends.compile.load_artifact`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qir.errors import QirError
from qir.tools import pass_cli

__all__ = ["PRESETS", "add_compile_parser", "cmd_compile", "parse_bind"]

#: Preset name -> pass pipeline.
PRESETS: dict[str, str] = {
    "float": "",
    "w8a8": "quantize{scheme=w8a8}",
    "w8a16": "quantize{scheme=w8a16}",
    "w4a16": "quantize{scheme=w4a16,group=32}",
    "npu-int8": "calibrate,quantize{scheme=w8a8,act=static,embedding=none,head=none}",
}


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


def _pipeline(args: argparse.Namespace) -> str:
    if args.preset and args.pipeline:
        raise QirError("give either --preset or -p PIPELINE, not both")
    if args.preset:
        return PRESETS[args.preset]
    return args.pipeline or ""


def cmd_compile(args: argparse.Namespace) -> int:
    from qir.backends.compile import compile_module

    pipeline = _pipeline(args)
    if args.show_pipeline:
        print(pipeline)
        return 0
    if args.model is None or args.output is None:
        raise QirError("qir compile needs MODEL and -o OUTDIR (or --show-pipeline)")
    from qir.frontend.importer import import_model

    imported = import_model(args.model, max_seq=args.max_seq)
    module = imported.module
    if pipeline:
        args.pipeline = pipeline
        module = pass_cli.run_pipeline_from_args(args, imported)
    meta: dict[str, Any] = {"source": imported.source, "kind": imported.kind, "pipeline": pipeline,
                            **{k: v for k, v in imported.options.items() if k == "max_seq"}}
    result = compile_module(module, args.target, Path(args.output), bind=parse_bind(args.bind),
                            fallback=args.fallback, check=not args.no_check, meta=meta)
    rep = result.report
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"compiled @{rep['module']} for {rep['target']} -> {result.out_dir} ({rep['bytes']:,} bytes)")
    for fname, info in rep["functions"].items():
        if "onnx_ops" not in info:  # a TVM artifact: one library for every function
            print(f"  @{fname}: {info['file']}; inputs {', '.join(info['inputs'])}; matmuls: {rep.get('kernels')}")
            continue
        ops = ", ".join(f"{k} {v}" for k, v in list(info["onnx_ops"].items())[:8])
        print(f"  @{fname}: {info['file']} {info['bytes']:,} bytes; ONNX ops: {ops}, ...")
    for fb in rep["fallbacks"]:
        print(f"  fallback: {fb}")
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for w in rep["warnings"]:
        by_rule.setdefault(w["rule"], []).append(w)
    for rule, ws in by_rule.items():
        print(f"  warning [{rule}] {len(ws)} op(s), e.g. {ws[0]['where']}: {ws[0]['message']} (all in report.json)",
              file=sys.stderr)
    return 0


def add_compile_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compile`` subcommand to ``qir``'s subparsers."""
    p = sub.add_parser(
        "compile", help="compile a model for a target (ort-cpu, ort-ascend) into an artifact folder",
        description="Import MODEL (zoo name, model path, .qir ...), run a quantization preset or pipeline, lower it "
                    "to ONNX for --target and write OUTDIR/model.onnx (+ decode.onnx), target.json, report.json. "
                    "Targets that a module breaks refuse with every offending op, the rule and the fix.",
        epilog="examples:\n  qir compile minilm-l6 --target ort-cpu --preset w8a8 -o out/minilm-w8a8\n"
               "  qir compile minilm-l6 --target ort-ascend --preset npu-int8 --calib-text FILE "
               "--bind batch=1,seq=128 -o out/minilm-npu\n  qir compile --preset npu-int8 --show-pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("--target", default="ort-cpu", help="ort-cpu (default), ort-ascend, tvm-llvm, tvm-arm or tvm-cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named pipeline (see --show-pipeline)")
    p.add_argument("-o", "--output", metavar="OUTDIR")
    p.add_argument("--show-pipeline", action="store_true", help="print the pipeline and exit")
    p.add_argument("--bind", metavar="NAME=INT,...", help="fix symbolic sizes (static-shape targets need it)")
    p.add_argument("--fallback", action="store_true",
                   help="keep ops that break a target rule in f16 (listed in report.json) instead of refusing")
    p.add_argument("--max-seq", type=int, default=None, help="as for qir import, when MODEL is traced here")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker (full check)")
    p.add_argument("--json", action="store_true", help="print report.json")
    pass_cli.add_pipeline_arguments(p, required=False)
    p.set_defaults(func=cmd_compile)
    return p
