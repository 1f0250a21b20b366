"""``qir debug``: the numerics debugger on the command line (a thin layer over :mod:`qir.debug`).

* ``qir debug compare A B [--calib-text FILE | --inputs FILE.npz] [--windows N] [--seq S] [--json]``
  A and B: a float or quantized ``.qir``, a zoo name, or an artifact folder (``ort-*``, ``tvm-llvm``). Every tensor
  both compute is compared by IR value name (SQNR dB, cosine, max abs error); ``worst`` is where the error jumps most.
* ``qir debug bisect MODEL -p PIPELINE --metric-max X [--higher w8a16] [--calib-text FILE]``: the fewest
  layers to keep at higher precision so the metric (perplexity; ``--metric-min`` for an encoder's cosine) meets
  the bound; prints the ``overrides="..."`` to paste.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qir.errors import QirError

__all__ = ["add_debug_parser"]


def _feeds(args: argparse.Namespace, src: Any) -> list[dict[str, Any]]:
    from qir.debug.compare import default_feeds, load_npz_feed

    if args.inputs and args.calib_text:
        raise QirError("give either --inputs FILE.npz or --calib-text FILE, not both")
    if args.inputs:
        return load_npz_feed(args.inputs, src.input_names())
    return default_feeds(src, text=args.calib_text, windows=args.windows, seq=args.seq)


def cmd_compare(args: argparse.Namespace) -> int:
    from qir.debug.compare import compare_sources
    from qir.debug.sources import open_source

    a = open_source(args.a, chunk=args.chunk)
    b = open_source(args.b, chunk=args.chunk)
    # Inputs are built with whichever side knows its tokenizer (a bare .qir without sidecar does not).
    maker = a if a.kind != "unknown" else b
    feeds = _feeds(args, maker)
    result = compare_sources(a, b, feeds, memory_budget=args.memory_mb << 20)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        sys.stdout.write(result.format(top=args.top, all_tensors=args.all))
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    from qir.debug.account import bounded_metric
    from qir.debug.bisect import bisect_layers
    from qir.debug.compare import default_feeds
    from qir.debug.sources import QirSource
    from qir.frontend.importer import import_model
    from qir.passes import parse_pipeline

    if (args.metric_max is None) == (args.metric_min is None):
        raise QirError("give exactly one bound: --metric-max X (perplexity) or --metric-min X (encoder cosine)")
    imported = import_model(args.model)
    metric = bounded_metric(imported.module, imported.kind, imported.tokenizer, text=args.calib_text,
                            windows=args.windows, seq=args.seq)
    bound = args.metric_max if args.metric_max is not None else args.metric_min
    if metric.lower_is_better != (args.metric_max is not None):
        flag = "--metric-max" if metric.lower_is_better else "--metric-min"
        raise QirError(f"the metric of this model is {metric.name} ({'lower' if metric.lower_is_better else 'higher'}"
                       f" is better): give the bound with {flag}")
    feeds = default_feeds(QirSource.from_import(imported), text=args.calib_text, windows=args.windows, seq=args.seq)
    context = None
    if any(p.name == "calibrate" or getattr(p, "rounding", "rtn") == "gptq" for p in parse_pipeline(args.pipeline)):
        from qir.calibration_data import calibration_feeds
        from qir.passes import PassContext

        if not args.calib_text:
            raise QirError("this pipeline calibrates: give --calib-text FILE")
        func, cfeeds = calibration_feeds(imported.module, imported.kind, imported.tokenizer, args.calib_text,
                                         windows=args.calib_windows, seq=args.seq)
        context = PassContext(calibration=cfeeds, function=func)
    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    result = bisect_layers(imported.module, args.pipeline, metric, bound, feeds=feeds, higher=args.higher,
                           context=context, log=log)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        sys.stdout.write(result.format())
    return 0 if result.met else 1


def add_debug_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``qir debug`` (with ``compare`` and ``bisect``) to ``qir``'s subparsers."""
    p = sub.add_parser("debug", help="find where accuracy is lost: compare tensors, bisect layers",
                       description="The numerics debugger: 'compare' two models or artifacts tensor by tensor, "
                                   "'bisect' the fewest layers to keep at higher precision.")
    dsub = p.add_subparsers(dest="debug_command", metavar="SUBCOMMAND", required=True)

    c = dsub.add_parser(
        "compare", help="compare every intermediate tensor of two models / artifacts, matched by IR value name",
        description="Run A (the reference) and B on the same inputs and compare every tensor both compute, matched "
                    "by IR value name: SQNR dB, cosine, max abs error, and the SQNR drop against the tensor's inputs. "
                    "'worst' is the tensor whose drop is largest: where the error jumps. A and B: a .qir file, a zoo "
                    "name, or an artifact folder of qir compile (ort-cpu, ort-ascend, tvm-llvm).",
        epilog="examples:\n  qir debug compare smol.qir smol-bad.qir --calib-text /usr/share/common-licenses/GPL-3\n"
               "  qir debug compare minilm.qir out/minilm-ort --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--calib-text", metavar="FILE", help="text to run on (LM windows; encoder: one sentence a line)")
    c.add_argument("--inputs", metavar="FILE.npz", help="arrays by input name instead of text")
    c.add_argument("--windows", type=int, default=1, help="LM windows / encoder batches of 8 (default 1)")
    c.add_argument("--seq", type=int, default=256, help="tokens per LM window (default 256)")
    c.add_argument("--json", action="store_true", help='one object: {"tensors": [...] (graph order), "worst": name}')
    c.add_argument("--top", type=int, default=15, help="rows of the ranked table (default 15)")
    c.add_argument("--all", action="store_true", help="list every matched tensor in graph order")
    c.add_argument("--chunk", type=int, default=64,
                   help="artifact tensors fetched per ONNX Runtime run, or per piece of a TVM debug build "
                        "(default 64)")
    c.add_argument("--memory-mb", type=int, default=512,
                   help="A's tensors waiting for B's stay in memory up to this, then spill to disk (default 512)")
    c.set_defaults(func=cmd_compare)

    b = dsub.add_parser(
        "bisect", help="the fewest layers to keep at higher precision to meet a metric bound",
        description="Run PIPELINE on MODEL, rank its quantized layers by the error each adds (compare against "
                    "the float model), then search for the fewest of them to keep at --higher precision so that "
                    "perplexity <= --metric-max (or an encoder's mean cosine >= --metric-min) on a bounded sample "
                    "(--windows x --seq tokens of --calib-text). Prints the overrides to paste into the pipeline. "
                    "Exit 1 when no set meets the bound.",
        epilog='example:\n  qir debug bisect smol.qir -p "quantize{scheme=w8a16,overrides=\\"'
               '*.layers.3.mlp.down_proj.weight=w2a16:tensor\\"}" --metric-max 30 '
               "--calib-text /usr/share/common-licenses/GPL-3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", metavar="MODEL")
    b.add_argument("-p", "--pipeline", required=True, help="the pipeline to repair (must contain quantize)")
    b.add_argument("--metric-max", type=float, help="bound for perplexity (causal LMs)")
    b.add_argument("--metric-min", type=float, help="bound for mean cosine against float (encoders)")
    b.add_argument("--higher", default="w8a16", help="scheme for the layers kept (default w8a16; none = float)")
    b.add_argument("--calib-text", metavar="FILE", help="text the metric (and any calibration) runs on")
    b.add_argument("--calib-windows", type=int, default=8, help="calibration windows when the pipeline calibrates")
    b.add_argument("--windows", type=int, default=1, help="metric windows (default 1)")
    b.add_argument("--seq", type=int, default=256, help="tokens per window (default 256)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bisect)
    return p
