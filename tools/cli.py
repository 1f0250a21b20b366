"""The ``qir`` command line: a thin layer over the library calls.

Subcommands (each is a documented library call first):

* ``qir dump FILE``      canonical text of a ``.qir`` file (``qir.printer.print_module``)
* ``qir diff A B``       unified diff of two canonical texts; exit 0 equal, 1 different
* ``qir verify FILE``    run the verifier, list every problem (``qir.verifier.check``)
* ``qir ops``            the op registry: names, operands, attributes, one-line docs
* ``qir demo``           build, quantize, verify, save, reload and run a small model end to end
* ``qir import MODEL``   trace a zoo model / HF folder / .gguf / .pt2 / .onnx into a ``.qir`` file
                         (``qir.import_model`` + ``qir.frontend.importer.save_import``)
* ``qir eval MODEL``     perplexity (causal LMs) or embedding cosine vs the float model (encoders)
                         (``qir.evaluate.evaluate``)

* ``qir compile [MODEL]`` import, quantize (preset or pipeline), lower for a target, report (``qir.tools.compile_cli``)
* ``qir generate OUTDIR|MODEL`` stream text from a compiled artifact (its runtime) or a model (the interpreter)
* ``qir run OUTDIR|FILE.qir`` run one function on inputs; ``qir targets`` the targets and what they support
  (``qir.tools.run_cli``)

Exit codes: 0 success, 1 "different" (diff) or "invalid" (verify), 2 bad usage or bad input, 130 interrupted.
Errors print one message, no traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qir.atomic import terminate_raises
from qir.errors import QirError
from qir.tools import pass_cli
from qir.tools.compile_cli import add_compile_parser
from qir.tools.debug_cli import add_debug_parser
from qir.tools.run_cli import add_run_parsers

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

    if args.pipeline is not None:
        # Run the pipeline (instruments print as it goes); the result is printed, nothing is written.
        from qir.frontend.importer import import_model
        from qir.tools.pass_cli import run_pipeline_from_args

        module = run_pipeline_from_args(args, import_model(args.file))
    else:
        module = _read_module(args.file)
    if args.summary:
        sys.stdout.write(summarize(module))
    elif args.format == "dot":
        from qir.tools.dot import module_to_dot

        sys.stdout.write(module_to_dot(module))
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


def import_summary(imported, out: Path | None) -> str:
    """One screen about an imported model: source, parameters and bytes, functions, ops by kind per function."""
    from collections import Counter

    from qir.serialize import stored_bytes

    module = imported.module
    params = sum(c.type.numel() for c in module.constants.values() if c.type.is_static)
    where = f" -> {out} (+ {out.with_suffix('.safetensors').name}, {out.with_suffix('.json').name})" if out else ""
    lines = [f"imported {imported.source} ({imported.kind}) as module @{module.name}{where}",
             f"  parameters: {params:,} in {len(module.constants)} constants   stored bytes: "
             f"{stored_bytes(module):,}"]
    if "gguf_kept" in imported.options:  # quantization parameters are not parameters of the model
        refs = module.spec_references()
        weights = sum(c.type.numel() for n, c in module.constants.items() if c.type.is_static and n not in refs)
        lines.append(f"  GGUF: {imported.options['gguf_kept']}; {8 * stored_bytes(module) / weights:.3f} bits per "
                     f"parameter ({weights:,} parameters)")
    funcs = list(module.functions.values())
    lines.append("  functions: " + "  ".join(
        f"@{f.name} ({len(f.inputs)} in, {len(f.outputs)} out, {len(f.ops)} ops)" for f in funcs))
    counts = {f.name: Counter(op.opcode for op in f.ops) for f in funcs}
    total: Counter[str] = Counter()
    for c in counts.values():
        total.update(c)
    lines.append("  ops by kind     " + "".join(f"{'@' + f.name:>10s}" for f in funcs))
    for opcode, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {opcode:14s}" + "".join(f"{counts[f.name][opcode]:10d}" for f in funcs))
    return "\n".join(lines) + "\n"


def cmd_import(args: argparse.Namespace) -> int:
    from qir.frontend.importer import import_model, save_import

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix != ".qir":
        raise QirError(f"{out}: the output file must end in .qir")
    imported = import_model(args.model, max_seq=args.max_seq, keep_quantized=args.keep_quantized)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_import(imported, out)
    sys.stdout.write(import_summary(imported, out))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from qir.generate import generate

    if args.temperature < 0:
        raise QirError(f"--temperature must be >= 0, not {args.temperature}")
    if Path(args.model).is_dir():
        # A compiled artifact folder (qir compile -o DIR): prefill/decode run on the artifact's runtime.
        from qir.backends.compile import load_artifact
        from qir.backends.runner import ArtifactRunner

        artifact = load_artifact(args.model)
        runner: object = ArtifactRunner(artifact)
        tokenizer = artifact.tokenizer
        engine = f"{artifact.report.get('target', '?')} artifact, {artifact.report.get('preset') or 'custom'}"
    else:
        from qir.frontend.importer import import_model

        imported = import_model(args.model, max_seq=args.max_seq)
        if imported.kind != "causal-lm":
            raise QirError(f"{args.model}: generation needs a causal LM with prefill and decode functions "
                           f"(this is {imported.kind!r})")
        runner, tokenizer, engine = imported, imported.tokenizer, "reference interpreter"
    stream = None if args.quiet else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = generate(runner, args.prompt, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                      chat=False if args.raw else None, on_text=stream, temperature=args.temperature,
                      seed=args.seed)
    if args.quiet:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    n = len(result.token_ids)
    decode_s = max(result.seconds - result.prefill_seconds, 1e-9)
    print(f"[{len(result.prompt_ids)} prompt tokens, prefill {result.prefill_seconds:.2f} s; {n} new tokens, "
          f"{max(n - 1, 0) / decode_s:.1f} tokens/s decode ({engine})]", file=sys.stderr)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from qir.evaluate import evaluate
    from qir.frontend.importer import import_model

    if args.text is not None and not Path(args.text).is_file():
        raise QirError(f"{args.text}: no such text file")
    if Path(args.model).is_dir():
        # A compiled artifact folder (qir compile -o DIR): run it on its backend, same metric and keys.
        from qir.backends.compile import load_artifact
        from qir.evaluate import evaluate_artifact

        result = evaluate_artifact(load_artifact(args.model), text=args.text, window=args.window,
                                   max_windows=args.windows)
        _print_eval(result, args.json)
        return EXIT_OK
    imported = import_model(args.model, max_seq=args.max_seq)
    if imported.kind not in ("causal-lm", "encoder"):
        raise QirError(f"{args.model}: model family unknown; evaluate a .qir written by 'qir import' (it keeps the "
                       f"source model in the sidecar .json) or a zoo name / model path")
    result = evaluate(imported, text=args.text, window=args.window, max_windows=args.windows)
    _print_eval(result, args.json)
    return EXIT_OK


def _print_eval(result: dict[str, float | int], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:12s} {value:.10g}" if isinstance(value, float) else f"{key:12s} {value:,}")


EXIT_CODES = "exit codes: 0 ok, 2 bad usage or input (one line on stderr; --debug shows the traceback)"


def _epilog(*examples: str, exits: str = EXIT_CODES) -> str:
    return "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qir", description="qir: a compiler for quantized neural networks.",
        epilog=_epilog("qir compile                  # SmolLM2-135M for this CPU -> out/smollm2-135m-ort-cpu-w8a16",
                       'qir generate out/smollm2-135m-ort-cpu-w8a16 --prompt "What is the capital of France?"',
                       "qir demo -o out/demo", "qir dump out/demo/tiny-w4.qir",
                       "qir diff out/demo/tiny-f32.qir out/demo/tiny-w4.qir",
                       exits="exit codes: 0 ok; 1 'different' (diff) or 'invalid' (verify); 2 bad usage or input "
                             "(one line on stderr, --debug for the traceback); 130 interrupted"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("dump", help="print the canonical text of a .qir file (after a pipeline with -p)",
                       description="Print FILE's canonical text. With -p PIPELINE, FILE (a .qir file or any model "
                                   "qir import takes) is run through the pipeline first, with the instrument flags "
                                   "(--print-after-all, --print-changed, ...); nothing is written.",
                       epilog=_epilog("qir dump out/demo/tiny-w4.qir", "qir dump --summary out/demo/tiny-w4.qir",
                                      "qir dump --format dot out/demo/tiny-w4.qir > tiny.dot && dot -Tsvg tiny.dot "
                                      "-o tiny.svg", 'qir dump out/smol.qir -p "quantize{scheme=w8a16}" '
                                      "--print-changed"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--summary", action="store_true", help="ops by kind, constants and bytes instead of the text")
    p.add_argument("--format", choices=("text", "dot"), default="text",
                   help="text (default): the canonical .qir text; dot: a Graphviz graph per function")
    pass_cli.add_pipeline_arguments(p, required=False)
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("quantize", help="run a pass pipeline on a model and write the result",
                       description="Import MODEL (a zoo name, a model path or a .qir file), run PIPELINE and write "
                                   "OUT.qir (+ .safetensors and the .json sidecar naming the model).",
                       epilog='example:\n  qir quantize smollm2-135m -p "calibrate,quantize{scheme=w8a8},dce" '
                              "--calib-text /usr/share/common-licenses/Apache-2.0 -o smol-w8a8.qir\n\n" + EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT.qir")
    pass_cli.add_pipeline_arguments(p, required=True)
    p.set_defaults(func=pass_cli.cmd_quantize)

    p = sub.add_parser("passes", help="list the registered passes with their options",
                       epilog=_epilog("qir passes", "qir passes --json", "qir passes --load-pass mypasses.py"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--load-pass", action="append", default=[], metavar="FILE",
                   help="a Python file that registers passes (repeatable)")
    p.set_defaults(func=pass_cli.cmd_passes)

    p = sub.add_parser("diff", help="unified diff of two .qir files (exit 0 equal, 1 different)",
                       epilog=_epilog("qir diff out/demo/tiny-f32.qir out/demo/tiny-w4.qir",
                                      "qir diff -U 0 a.qir b.qir", exits="exit codes: 0 equal, 1 different, 2 bad "
                                      "usage or input"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context (default 3)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("verify", help="check a .qir file against every IR rule (exit 1 if invalid)",
                       epilog=_epilog("qir verify out/demo/tiny-w4.qir", exits="exit codes: 0 valid, 1 invalid (every "
                                      "problem listed on stderr), 2 bad usage or unreadable file"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("ops", help="list the registered ops", epilog=_epilog("qir ops", "qir ops | grep ^q"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("demo", help="build, quantize, save, reload and run a small model; print a report",
                       epilog=_epilog("qir demo -o out/demo"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="out/demo", help="folder for the demo's files (default out/demo)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "import", help="import a model into qir and print a summary (ops by kind, parameters, bytes)",
        description="Trace MODEL (a zoo name such as smollm2-135m or minilm-l6, a Hugging Face folder, a .gguf, "
                    ".pt2 or .onnx file) into qir. Causal LMs get two functions, prefill and decode (static KV "
                    "cache of --max-seq slots); encoders one, main (sentence embeddings). With -o X.qir it writes "
                    "X.qir, X.safetensors (weights) and X.json, a sidecar recording the source model and its kind, "
                    "which 'qir eval X.qir' reads to find the tokenizer and the float model.",
        epilog=_epilog("qir import smollm2-135m -o out/smol.qir", "qir import minilm-l6 -o out/minilm.qir",
                       "qir import path/to/model.gguf --max-seq 256 -o out/m.qir"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", help="write the module to this .qir file (and its .safetensors and .json)")
    p.add_argument("--max-seq", type=int, default=None,
                   help="decode cache slots for causal LMs (default 1024); longest sequence for encoders (512)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="GGUF models: keep the file's own quantized blocks (Q8_0, Q4_0, Q4_1, Q5_x, Q4_K, Q5_K, "
                        "Q6_K) losslessly instead of dequantizing to float; other quantized types are refused")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate text with a compiled artifact folder or a causal LM",
                       description="Generate from OUTDIR (a folder written by qir compile: prefill/decode run on its "
                                   "runtime) or from MODEL (a zoo name, a model path, or a .qir written by 'qir "
                                   "import' or 'qir quantize': its qir prefill/decode functions run on the "
                                   "reference interpreter). Tokens stream to stdout; prompt tokens, prefill time "
                                   "and decode tokens/s go to stderr at the end. The chat template is applied when "
                                   "the tokenizer has one, unless --raw. Greedy unless --temperature > 0.",
                       epilog='examples:\n  qir generate out/smollm2-135m-ort-cpu-w8a16 --prompt "What is the '
                              'capital of France?"\n  qir generate out/smollm2-135m-ort-cpu-w8a16 --prompt "Tell a '
                              'story" --max-new-tokens 64 --temperature 0.7 --seed 1\n'
                              '  qir generate smollm2-135m --prompt "What is the capital of France?"   # interpreter'
                              "\n\nexit codes: 0 ok, 2 bad usage or input",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="OUTDIR_OR_MODEL")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same text)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("-q", "--quiet", action="store_true", help="print the text at the end instead of streaming")
    p.add_argument("--max-seq", type=int, default=None, help="decode cache slots when MODEL is traced here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval", help="perplexity of a causal LM, or embedding cosine of an encoder against the float model",
        description="Evaluate MODEL_OR_QIR (a zoo name / model path, traced first, or a .qir written by 'qir "
                    "import', whose sidecar X.json names the source model). Causal LMs: perplexity over --text "
                    "FILE in windows of --window tokens (the first --windows of them) -> ppl, tokens, bytes. "
                    "Encoders: cosine similarity of the qir embeddings against the float model's on a built-in "
                    "set of 16 sentences, or the lines of --text -> cosine_mean, cosine_min, bytes. bytes is the "
                    "stored size of all weights and quantization parameters. An artifact folder from qir compile "
                    "runs on its runtime with the same metric and keys.",
        epilog=_epilog("qir eval out/smol.qir --text /usr/share/common-licenses/GPL-3 --json",
                       "qir eval out/smollm2-135m-ort-cpu-w8a16 --text /usr/share/common-licenses/GPL-3 --windows 2",
                       "qir eval out/minilm.qir --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_QIR")
    p.add_argument("--text", help="text file: perplexity text (causal LM) or one sentence per line (encoder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    p.add_argument("--max-seq", type=int, default=None, help="as for qir import, when MODEL is traced here")
    p.set_defaults(func=cmd_eval)

    add_compile_parser(sub)
    add_debug_parser(sub)
    add_run_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    from qir.tools.progress import set_quiet

    set_quiet(bool(getattr(args, "quiet", False)))
    try:
        with terminate_raises():  # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed
            return func(args)
    except QirError as exc:
        if args.debug:
            raise
        print(f"qir {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a file or folder the user named cannot be read or written: their input, not a bug
        if args.debug:
            raise
        print(f"qir {args.command}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
