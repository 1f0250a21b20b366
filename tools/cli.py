"""The ``qir`` command line: a thin layer over the library calls.

Subcommands (each is a documented library call first):

* ``qir dump FILE``      canonical text of a ``.qir`` file (``qir.printer.print_module``)
* ``qir diff A B``       unified diff of two canonical texts; exit 0 equal, 1 different
* ``qir verify FILE``    run the verifier, list every problem (``qir.verifier.check``)
* ``qir ops``            the op registry: names, operands, attributes, one-line docs
* ``qir demo``           build, quantize, verify, save, reload and run a small model end to end

Exit codes: 0 success, 1 "different" (diff) or "invalid" (verify), 2 bad usage or bad input.
Errors print one message, no traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qir.errors import QirError

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2


def _read_module(path: str):
    """Parse a ``.qir`` file's text; weights are not needed to print or diff."""
    from qir.parser import parse_file

    p = Path(path)
    if not p.exists():
        raise QirError(f"{path}: no such file")
    if p.is_dir():
        raise QirError(f"{path}: is a folder, expected a .qir file")
    return parse_file(p)


def cmd_dump(args: argparse.Namespace) -> int:
    from qir.printer import print_module

    module = _read_module(args.file)
    if args.summary:
        sys.stdout.write(summarize(module))
    else:
        sys.stdout.write(print_module(module))
    return EXIT_OK


def summarize(module) -> str:
    """A one-screen summary: functions, ops by kind, constants and their stored bytes."""
    from collections import Counter

    lines = [f"module @{module.name}"]
    total_bytes = 0
    params = 0
    for c in module.constants.values():
        if c.type.is_static:
            params += c.type.numel()
            total_bytes += c.type.nbytes()
    lines.append(f"  constants: {len(module.constants)}  elements: {params:,}  stored bytes: {total_bytes:,}")
    for f in module.functions.values():
        counts = Counter(op.opcode for op in f.ops)
        lines.append(f"  func @{f.name}: {len(f.inputs)} inputs, {len(f.ops)} ops, {len(f.outputs)} outputs")
        for opcode, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:6d}  {opcode}")
    return "\n".join(lines) + "\n"


def cmd_diff(args: argparse.Namespace) -> int:
    from qir.printer import print_module

    a = print_module(_read_module(args.a)).splitlines(keepends=True)
    b = print_module(_read_module(args.b)).splitlines(keepends=True)
    if a == b:
        return EXIT_OK
    sys.stdout.writelines(difflib.unified_diff(a, b, fromfile=args.a, tofile=args.b, n=args.context))
    return EXIT_DIFFERENT


def cmd_verify(args: argparse.Namespace) -> int:
    from qir.verifier import check

    module = _read_module(args.file)
    problems = check(module)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_DIFFERENT
    print(f"{args.file}: ok")
    return EXIT_OK


def cmd_ops(args: argparse.Namespace) -> int:
    from qir.ops import all_ops

    for name, d in sorted(all_ops().items()):
        if name.startswith("test."):
            continue
        attrs = ", ".join(a.name if a.required else f"{a.name}={a.default!r}" for a in d.attrs)
        sig = f"{name}({', '.join(d.operands)})" + (f" {{{attrs}}}" if attrs else "")
        print(f"{sig:60s} {d.doc}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from qir.demo import run_demo

    return run_demo(out_dir=Path(args.out), quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qir", description="qir: a compiler for quantized neural networks.",
        epilog="examples:\n  qir demo -o out/demo\n  qir dump out/demo/tiny-w4.qir\n"
               "  qir diff out/demo/tiny-f32.qir out/demo/tiny-w4.qir",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("dump", help="print the canonical text of a .qir file")
    p.add_argument("file")
    p.add_argument("--summary", action="store_true", help="ops by kind, constants and bytes instead of the text")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("diff", help="unified diff of two .qir files (exit 0 equal, 1 different)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context (default 3)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("verify", help="check a .qir file against every IR rule (exit 1 if invalid)")
    p.add_argument("file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("ops", help="list the registered ops")
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("demo", help="build, quantize, save, reload and run a small model; print a report")
    p.add_argument("-o", "--out", default="out/demo", help="folder for the demo's files (default out/demo)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except QirError as exc:
        if args.debug:
            raise
        print(f"qir {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
