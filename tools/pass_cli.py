"""The command-line side of passes: ``qir passes``, ``qir quantize`` and the pipeline/instrument flags.

``qir quantize IN -p PIPELINE [--calib-text FILE] -o OUT.qir`` imports IN (a zoo name, a model path or a
``.qir`` file), runs the pipeline through :class:`qir.passes.PassManager` and saves the result (with the
sidecar that names the model, so ``qir eval OUT.qir`` works). ``qir dump IN -p PIPELINE
--print-after-all`` shows the IR after every pass without writing anything.

Instrument flags, as in LLVM/MLIR: ``--print-after-all``, ``--print-after NAME`` (repeatable),
``--print-changed`` (unified diff of each pass that changed the IR), ``--dump-dir DIR`` (one numbered
``.qir`` per step), ``--timing``. ``--load-pass FILE`` (repeatable) imports a user's passes first.
``--account`` measures the model after each pass that changes numerics (:mod:`qir.debug.account`); ``qir
quantize`` writes the table to ``OUT.report.json`` and ``qir compile`` into the artifact's ``report.json``, both
under ``pass_accounting``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from qir.errors import QirError


def add_pipeline_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("-p", "--pipeline", required=required, default=None,
                   help='passes to run, e.g. "calibrate{method=percentile},quantize{scheme=w8a8},dce"')
    p.add_argument("--load-pass", action="append", default=[], metavar="FILE",
                   help="a Python file that registers passes (repeatable)")
    p.add_argument("--calib-text", metavar="FILE", help="text to calibrate on (windows of --calib-seq tokens)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows / batches (default 32)")
    p.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--no-verify", action="store_true", help="do not run the verifier after each pass")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-after", action="append", default=[], metavar="NAME",
                   help="print the IR after each run of pass NAME (repeatable)")
    p.add_argument("--print-changed", action="store_true",
                   help="print a unified diff of the IR for every pass that changed it")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after each step as DIR/NN-pass.qir")
    p.add_argument("--timing", action="store_true", help="print the time each pass took")
    p.add_argument("--account", action="store_true",
                   help="measure the model (ppl on 1x256 tokens of the text, or encoder cosine) after each pass "
                        "that changes numerics; table on stderr, 'pass_accounting' in the report (qir.debug.account)")
    p.add_argument("--account-text", metavar="FILE", help="text for --account (default: --calib-text, else for "
                   "causal LMs the report's perplexity text, Debian's GPL-3)")


def run_pipeline_from_args(args: argparse.Namespace, imported: typing.Any) -> typing.Any:
    """Run ``args.pipeline`` on ``imported.module`` with the instruments and calibration the flags ask for."""
    from qir.passes import (
        DumpDir,
        FloatSnapshot,
        PassContext,
        PassManager,
        PrintAfter,
        PrintAfterAll,
        PrintChanged,
        Timing,
        load_entry_points,
        load_pass_file,
        parse_pipeline,
    )

    for f in args.load_pass:
        load_pass_file(f)
    load_entry_points()
    passes = parse_pipeline(args.pipeline or "")  # every name and option checked before anything runs
    args.float_snapshot = FloatSnapshot()  # what reports compare the quantized weights with
    instruments: list[typing.Any] = [args.float_snapshot]
    if args.print_after_all:
        instruments.append(PrintAfterAll())
    if args.print_after:
        instruments.append(PrintAfter(tuple(args.print_after)))
    if args.print_changed:
        instruments.append(PrintChanged())
    if args.dump_dir:
        instruments.append(DumpDir(Path(args.dump_dir)))
    if args.timing:
        instruments.append(Timing())
    if getattr(args, "account", False):
        from qir.debug.account import PassAccounting, bounded_metric

        text = args.account_text or args.calib_text
        if text is None and imported.kind == "causal-lm":
            from qir.tools.report import default_eval_text  # the report's perplexity text (Debian's GPL-3)

            text = default_eval_text()
        args.accounting = PassAccounting(make_metric=lambda m: bounded_metric(m, imported.kind, imported.tokenizer,
                                                                              text=text))
        instruments.append(args.accounting)
    context = PassContext()
    if args.calib_text:
        from qir.calibration_data import calibration_feeds

        func, feeds = calibration_feeds(imported.module, imported.kind, imported.tokenizer, args.calib_text,
                                        windows=args.calib_windows, seq=args.calib_seq)
        context = PassContext(calibration=feeds, function=func)
    manager = PassManager(passes, verify_each=not args.no_verify, instruments=instruments, context=context)
    return manager.run(imported.module)


def cmd_passes(args: argparse.Namespace) -> int:
    """``qir passes``: every registered pass with its one-line doc and options."""
    from qir.passes import PASSES, load_entry_points, load_pass_file

    for f in args.load_pass:
        load_pass_file(f)
    load_entry_points()
    rows = []
    for name in sorted(PASSES):
        cls = PASSES[name]
        hints = typing.get_type_hints(cls)
        opts = []
        for f in cls.options():
            default = f.default if f.default is not dataclasses.MISSING else None
            opts.append({"name": f.name, "type": _type_name(hints.get(f.name)), "default": default})
        rows.append({"name": name, "doc": cls.summary(), "options": opts})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{r['name']:18s} {r['doc']}")
        for o in r["options"]:
            print(f"{'':18s}   {o['name']}: {o['type']} = {o['default']}")
    return 0


def _type_name(hint: typing.Any) -> str:
    from qir.passes.pipeline import _type_name as name

    return name(hint)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``qir quantize IN -p PIPELINE -o OUT.qir``."""
    from qir.frontend.importer import LoadedImport, import_model, save_import

    out = Path(args.output)
    if out.suffix != ".qir":
        raise QirError(f"-o {args.output}: the output must be a .qir file")
    if not out.parent.exists():
        raise QirError(f"-o {args.output}: folder {out.parent} does not exist")
    imported = import_model(args.model)
    result = run_pipeline_from_args(args, imported)
    saved = save_import(LoadedImport(module=result, kind=imported.kind, source=imported.source,
                                     tokenizer=imported.tokenizer, options=imported.options), out)
    accounting = getattr(args, "accounting", None)
    if accounting is not None:
        report = out.with_suffix(".report.json")
        report.write_text(json.dumps({"pass_accounting": accounting.to_json()}, indent=2) + "\n")
        print(f"wrote {report}", file=sys.stderr)
    print(f"wrote {saved}", file=sys.stderr)
    return 0
