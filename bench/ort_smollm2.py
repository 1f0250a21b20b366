"""SmolLM2-135M on ONNX Runtime CPU: qir ``ort-cpu`` / ``ort-ascend`` against ONNX Runtime's own quantizers.

One run, one machine, the same exported model for everyone: qir lowers the float SmolLM2 prefill graph to ONNX
(``qir compile --preset float``); the peers quantize *that* file with ONNX Runtime's tools:

* ``ort-quantize_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights, dynamic
  per-tensor uint8 activations: ``DynamicQuantizeMatMul``), the peer of qir's w8a8;
* ``ort-matmulnbits``: ``MatMulNBitsQuantizer`` (4-bit, block 32, asymmetric, RTN): the peer of qir's w4a16.

qir's own rows are ``qir compile`` artifacts (``float``, ``w8a8``, ``w8a16``, ``w4a16`` presets for ``ort-cpu``;
``npu-int8`` for ``ort-ascend`` with static shapes 1x512, calibrated on a different text). Every system is
scored with the same code: perplexity over ``--windows`` windows of 512 tokens of ``/usr/share/common-licenses/
GPL-3`` (calibration uses ``Apache-2.0``), prefill latency at 1x512 (median of ``--repeats``), 2 threads, and the
bytes of its ONNX files. Ratios are against qir's float artifact (ppl) and against the peer (latency).

    python bench/ort_smollm2.py [--windows 4] [--repeats 5] [--out DIR] [--json]

The peers' files are wrapped as artifact folders (the float artifact's ``target.json``/``report.json`` with
their own ``model.onnx``), so :func:`qir.backends.compile.load_artifact` runs them exactly like qir's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2
SEQ = 512
CALIB_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")

#: name -> (target, pipeline, needs calibration, bind)
QIR_SYSTEMS: dict[str, tuple[str, str, bool, dict[str, int]]] = {
    "qir-float": ("ort-cpu", "", False, {}),
    "qir-w8a8": ("ort-cpu", "quantize{scheme=w8a8}", False, {}),
    "qir-w8a8-smooth": ("ort-cpu", "calibrate,fold-scales{smooth=0.5},quantize{scheme=w8a8}", True, {}),
    "qir-w8a16": ("ort-cpu", "quantize{scheme=w8a16}", False, {}),
    "qir-w4a16-g32": ("ort-cpu", "quantize{scheme=w4a16,group=32}", False, {}),
    "qir-w4a16-g32-asym": ("ort-cpu", "quantize{scheme=w4a16,group=32,symmetric=false}", False, {}),
    "qir-w4a16-g32-min": ("ort-cpu", "quantize{scheme=w4a16,group=32,zero=float},compress-scales", False, {}),
    "qir-ascend-npu-int8": ("ort-ascend", "calibrate,quantize{scheme=w8a8,act=static,embedding=none,head=none}",
                            True, {"batch": 1, "seq": SEQ}),
}


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*"))


def peer_artifact(float_dir: Path, peer_model: Path, out: Path) -> Path:
    """An artifact folder holding ``peer_model`` as its prefill function (the float artifact's metadata)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(float_dir / "target.json", out / "target.json")
    report = json.loads((float_dir / "report.json").read_text())
    main = next(iter(report["functions"]))
    shutil.copy(peer_model, out / report["functions"][main]["file"])
    report["functions"] = {main: report["functions"][main]}  # the peers quantize the prefill graph only
    report["bytes"] = onnx_bytes(out)
    (out / "report.json").write_text(json.dumps(report))
    return out


def prefill_ms(artifact: Any, tokens: np.ndarray, repeats: int) -> float:
    fn = artifact.logits_fn()
    fn(tokens)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(tokens)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (default 4)")
    ap.add_argument("--repeats", type=int, default=5, help="prefill timing repeats (default 5)")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for the artifacts (default: a temporary folder)")
    ap.add_argument("--only", default=None, help="comma-separated system names to run (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qir.backends.compile import compile_module, load_artifact
    from qir.calibration_data import calibration_feeds
    from qir.evaluate import perplexity
    from qir.frontend.importer import import_model
    from qir.passes import PassContext, PassManager, parse_pipeline

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qir-bench-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    imported = import_model("smollm2-135m")
    tok = imported.tokenizer
    meta = {"source": imported.source, "kind": imported.kind, **imported.options}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=(1, SEQ), dtype=np.int64)
    rows: list[dict[str, Any]] = []

    def score(name: str, folder: Path, extra: dict[str, Any]) -> None:
        art = load_artifact(folder, threads=THREADS)
        t = time.perf_counter()
        res = perplexity(art.logits_fn(), EVAL_TEXT, tokenizer=tok, window=SEQ, max_windows=args.windows)
        eval_s = time.perf_counter() - t
        lat = prefill_ms(art, tokens, args.repeats)
        rows.append({"system": name, "ppl": res.ppl, "tokens": res.tokens, "prefill_ms": round(lat, 1),
                     "bytes": onnx_bytes(folder) if name.startswith("ort-") else int(art.bytes),
                     "eval_s": round(eval_s, 1), **extra})
        print(f"# {name}: ppl {res.ppl:.3f}, prefill {lat:.0f} ms, {rows[-1]['bytes'] / 1e6:.1f} MB", flush=True)

    feeds_ctx: PassContext | None = None
    for name, (target, pipeline, calib, bind) in QIR_SYSTEMS.items():
        if only and name not in only and not (name == "qir-float" and only & {"ort-quantize_dynamic",
                                                                             "ort-matmulnbits"}):
            continue
        t = time.perf_counter()
        module = imported.module
        if pipeline:
            ctx = PassContext()
            if calib:
                if feeds_ctx is None:
                    func, feeds = calibration_feeds(module, imported.kind, tok, CALIB_TEXT,
                                                    windows=args.calib_windows, seq=SEQ)
                    feeds_ctx = PassContext(calibration=feeds, function=func)
                ctx = feeds_ctx
            module = PassManager(parse_pipeline(pipeline), context=ctx).run(module)
        compile_module(module, target, work / name, bind=bind, meta={**meta, "pipeline": pipeline})
        compile_s = time.perf_counter() - t
        if not only or name in only:
            score(name, work / name, {"target": target, "pipeline": pipeline, "compile_s": round(compile_s, 1)})
        del module

    float_dir = work / "qir-float"
    float_onnx = float_dir / "model.onnx"
    if not only or "ort-quantize_dynamic" in only:
        t = time.perf_counter()
        q = work / "peer-quantize-dynamic.onnx"
        quantize_dynamic(str(float_onnx), str(q), per_channel=True, weight_type=QuantType.QInt8)
        s = time.perf_counter() - t
        score("ort-quantize_dynamic", peer_artifact(float_dir, q, work / "ort-quantize_dynamic"),
              {"target": "ort-cpu", "pipeline": "quantize_dynamic(per_channel, QInt8)", "compile_s": round(s, 1)})
    if not only or "ort-matmulnbits" in only:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        t = time.perf_counter()
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=None)
        quant = MatMulNBitsQuantizer(onnx.load(str(float_onnx)), algo_config=cfg)
        quant.process()
        q = work / "peer-matmulnbits.onnx"
        quant.model.save_model_to_file(str(q), use_external_data_format=False)
        s = time.perf_counter() - t
        score("ort-matmulnbits", peer_artifact(float_dir, q, work / "ort-matmulnbits"),
              {"target": "ort-cpu", "pipeline": "MatMulNBitsQuantizer(4 bits, block 32, asym)",
               "compile_s": round(s, 1)})

    base = next((r for r in rows if r["system"] == "qir-float"), None)
    peers = {"qir-w8a8": "ort-quantize_dynamic", "qir-w8a8-smooth": "ort-quantize_dynamic",
             "qir-w4a16-g32": "ort-matmulnbits", "qir-w4a16-g32-asym": "ort-matmulnbits",
             "qir-w4a16-g32-min": "ort-matmulnbits"}
    by = {r["system"]: r for r in rows}
    for r in rows:
        if base is not None:
            r["ppl_vs_float"] = round(r["ppl"] / base["ppl"], 4)
            r["prefill_vs_float"] = round(r["prefill_ms"] / base["prefill_ms"], 3)
        peer = by.get(peers.get(r["system"], ""))
        if peer is not None:
            r["prefill_vs_peer"] = round(r["prefill_ms"] / peer["prefill_ms"], 3)
            r["ppl_vs_peer"] = round(r["ppl"] / peer["ppl"], 4)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"SmolLM2-135M, prefill 1x{SEQ}, {THREADS} threads; ppl on {EVAL_TEXT.name} "
          f"({rows[0]['tokens'] if rows else 0} predictions); total {time.perf_counter() - t0:.0f} s; files in {work}")
    print(f"{'system':22s} {'MB':>7s} {'ppl':>8s} {'x float':>8s} {'prefill ms':>10s} {'x float':>8s} "
          f"{'x peer':>7s}")
    for r in rows:
        print(f"{r['system']:22s} {r['bytes'] / 1e6:7.1f} {r['ppl']:8.3f} {r.get('ppl_vs_float', float('nan')):8.3f} "
              f"{r['prefill_ms']:10.0f} {r.get('prefill_vs_float', float('nan')):8.2f} "
              f"{r.get('prefill_vs_peer', float('nan')):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
