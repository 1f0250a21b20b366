"""``qir run`` (run a compiled artifact or a ``.qir`` file on given inputs) and ``qir targets`` (what each target is).

``qir run OUTDIR|FILE.qir (--inputs X.npz | --tokens 1,2,3) [--function F] [--json] [-o OUT.npz]``: an artifact
folder runs on its runtime (:meth:`qir.backends.compile.Artifact.run`), a ``.qir`` file on the reference
interpreter (:class:`qir.interpreter.Interpreter`). Inputs come from an ``.npz`` (arrays by input name, or
``arr_0, arr_1, ...`` in order) or, for token models, from ``--tokens`` (one ``[1, n]`` int64 row for the first
input). Each output is printed as name, dtype, shape, min/max/mean and its first values; ``--json`` prints the same
as one object; ``-o`` saves the full arrays.

``qir targets [--json]``: every target in ``backends/targets``: its runtime and providers, opset, static shapes or
not, and what it supports (the target file's ``supports`` section), with the number of rules it checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError

__all__ = ["add_run_parsers", "cmd_run", "cmd_targets", "describe_outputs", "target_rows"]


class RunUsageError(QirError):
    """``qir run`` was given inputs it cannot use."""


def _parse_tokens(text: str) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise RunUsageError(f"--tokens {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if not ids:
        raise RunUsageError("--tokens: no token ids given")
    return np.asarray([ids], dtype=np.int64)


def _load_npz(path: str, names: list[str]) -> list[np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise RunUsageError(f"--inputs {path}: no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise RunUsageError(f"--inputs {path}: not a readable .npz file ({exc})") from None
    if all(n in arrays for n in names):
        return [arrays[n] for n in names]
    ordered = [f"arr_{i}" for i in range(len(names))]
    if all(n in arrays for n in ordered):
        return [arrays[n] for n in ordered]
    raise RunUsageError(f"--inputs {path}: has {sorted(arrays)}, but the function takes {names} (name the arrays so, "
                        f"or save them in order as arr_0, arr_1, ...)")


def describe_outputs(names: list[str], outputs: list[np.ndarray], *, values: int = 8) -> list[dict[str, Any]]:
    """Name, dtype, shape, min/max/mean and the first ``values`` elements of each output."""
    rows = []
    for name, arr in zip(names, outputs):
        a = np.asarray(arr)
        row: dict[str, Any] = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
        if a.size and np.issubdtype(a.dtype, np.number):
            f = a.astype(np.float64)
            row.update(min=float(f.min()), max=float(f.max()), mean=float(f.mean()))
        row["first"] = a.reshape(-1)[:values].tolist()
        rows.append(row)
    return rows


def cmd_run(args: argparse.Namespace) -> int:
    if (args.inputs is None) == (args.tokens is None):
        raise RunUsageError("give exactly one of --inputs X.npz or --tokens 1,2,3")
    src = Path(args.model)
    if src.is_dir():
        from qir.backends.compile import load_artifact

        artifact = load_artifact(src)
        function = args.function or artifact.functions[0]
        if function not in artifact.functions:
            raise RunUsageError(f"{src}: no function {function!r}; it has {', '.join(artifact.functions)}")
        in_names = list(artifact.report["functions"][function]["inputs"])
        out_names = list(artifact.report["functions"][function]["outputs"])

        def execute(inputs: list[np.ndarray]) -> list[np.ndarray]:
            return artifact.run(inputs, function=function)
    elif src.suffix == ".qir":
        from qir.interpreter import Interpreter
        from qir.serialize import load

        if not src.is_file():
            raise RunUsageError(f"{src}: no such file")
        module = load(src)
        func = module.function(args.function) if args.function else (
            module.functions["prefill"] if "prefill" in module.functions else module.main)
        function = func.name
        in_names = [v.name for v in func.inputs]
        out_names = [v.name for v in func.outputs]
        interp = Interpreter(module)

        def execute(inputs: list[np.ndarray]) -> list[np.ndarray]:
            return [np.asarray(o) for o in interp.run(inputs, function=function)]
    else:
        raise RunUsageError(f"{src}: expected an artifact folder (qir compile -o DIR) or a .qir file")
    if args.tokens is not None:
        if len(in_names) != 1:
            raise RunUsageError(f"--tokens feeds one input, but @{function} takes {in_names}; use --inputs X.npz")
        inputs = [_parse_tokens(args.tokens)]
    else:
        inputs = _load_npz(args.inputs, in_names)
    outputs = execute(inputs)
    if args.output:
        np.savez(args.output, **{n: np.asarray(o) for n, o in zip(out_names, outputs)})
    rows = describe_outputs(out_names, outputs)
    if args.json:
        print(json.dumps({"function": function, "outputs": rows}))
        return 0
    for r in rows:
        stats = f" min {r['min']:.6g} max {r['max']:.6g} mean {r['mean']:.6g}" if "min" in r else ""
        print(f"{r['name']}: {r['dtype']}{r['shape']}{stats}  first {r['first']}")
    return 0


def target_rows() -> list[dict[str, Any]]:
    """One dict per target: name, description, runtime, providers, opset, static_shapes, supports, rules."""
    from qir.backends.target import list_targets, load_target

    rows = []
    for name in list_targets():
        t = load_target(name)
        try:
            raw = json.loads(Path(t.path).read_text())
        except (OSError, ValueError):
            raw = {}
        rows.append({"name": t.name, "description": t.description, "runtime": t.runtime,
                     "providers": list(t.providers), "opset": t.opset, "static_shapes": t.static_shapes,
                     "supports": raw.get("supports") or {}, "rules": [r.id for r in t.rules if r.severity == "error"]})
    return rows


def cmd_targets(args: argparse.Namespace) -> int:
    rows = target_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}: {r['description']}")
        print(f"  runtime {r['runtime']} ({', '.join(r['providers'])}), opset {r['opset']}, "
              f"{'static shapes only' if r['static_shapes'] else 'symbolic shapes'}")
        for key, value in r["supports"].items():
            text = "; ".join(value) if isinstance(value, list) else str(value)
            print(f"  {key:12s} {text}")
        if not r["supports"]:
            print("  (the target file declares no 'supports' section)")
        print(f"  checks       {', '.join(r['rules']) or '-'}")
    return 0


def add_run_parsers(sub: Any) -> None:
    """Add ``run`` and ``targets`` to ``qir``'s subparsers."""
    p = sub.add_parser(
        "run", help="run a compiled artifact folder or a .qir file on inputs and print the outputs",
        description="Run one function of OUTDIR (an artifact folder from qir compile, on its runtime) or FILE.qir (on "
                    "the reference interpreter) on --inputs X.npz (arrays named as the inputs, or arr_0, arr_1, ... "
                    "in order) or --tokens (token ids for the first input, as one [1, n] row). Prints each output's "
                    "dtype, shape, min/max/mean and first values.",
        epilog="examples:\n  qir run out/smollm2-135m-ort-cpu-w8a16 --tokens 504,3458,282,4649 --json\n"
               "  qir run out/demo/tiny-w4.qir --inputs x.npz -o y.npz\n\n"
               "exit codes: 0 ok, 2 bad usage or input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="OUTDIR_OR_QIR")
    p.add_argument("--inputs", metavar="X.npz", help="input arrays")
    p.add_argument("--tokens", metavar="IDS", help="token ids, e.g. 1,2,3 (models with one token input)")
    p.add_argument("--function", help="which function (default: the artifact's first / prefill / main)")
    p.add_argument("-o", "--output", metavar="OUT.npz", help="save the outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "targets", help="list the compilation targets and what each supports",
        description="Every target qir compile knows: runtime and execution providers, ONNX opset, static or "
                    "symbolic shapes, the quantized dtypes and granularities it runs, its op set, and the rules "
                    "qir checks before lowering (backends/targets/<name>.json holds each rule with its source).",
        epilog="examples:\n  qir targets\n  qir targets --json\n\nexit codes: 0 ok",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_targets)
