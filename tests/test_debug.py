"""The numerics debugger (qir.debug, ``qir debug``): compare, per-pass accounting, bisect.

Small synthetic models (a residual MLP stack, and a toy causal LM with a character tokenizer) keep these fast;
one slow test runs the issue's scenario pieces on MiniLM against its ort-cpu artifact.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

import qir
from qir.debug import QirSource, compare_sources
from qir.debug.account import NUMERICS_NEUTRAL, BoundedMetric, PassAccounting
from qir.debug.bisect import bisect_layers, layer_sensitivity, with_overrides
from qir.debug.compare import SpillStore
from qir.debug.metrics import TensorStats
from qir.errors import QirError
from qir.interpreter import run
from qir.passes import PassManager, run_pipeline
from qir.quant import QTensor
from qir.types import TensorType

D = 32
BROKEN = 'quantize{scheme=w8a8,overrides="layers.2.down.weight=w2a16:tensor"}'


def mlp_stack(n_layers: int = 4, seed: int = 0) -> qir.Module:
    """``x -> n x (x + down(silu(up(x))))``; values are named ``layers.i.{up,act,down,out}``."""
    rng = np.random.default_rng(seed)
    m = qir.Module("stack")
    f = m.add_function("main")
    h = f.add_input("x", TensorType.of("f32", [1, "seq", D]))
    for i in range(n_layers):
        up = m.add_constant(f"layers.{i}.up.weight", (rng.standard_normal((2 * D, D)) / np.sqrt(D)).astype(np.float32))
        down = m.add_constant(f"layers.{i}.down.weight",
                              (rng.standard_normal((D, 2 * D)) / np.sqrt(2 * D)).astype(np.float32))
        u = f.add_op("linear", [h, up], names=[f"layers.{i}.up"]).result
        a = f.add_op("silu", [u], names=[f"layers.{i}.act"]).result
        dn = f.add_op("linear", [a, down], names=[f"layers.{i}.down"]).result
        h = f.add_op("add", [h, dn], names=[f"layers.{i}.out"]).result
    f.set_outputs([h])
    return m


def feeds(n: int = 2, seq: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, seq, D)).astype(np.float32)} for _ in range(n)]


# -- metrics and the store ---------------------------------------------------------------------------------

def test_stats_definitions() -> None:
    s = TensorStats("t")
    a = np.array([3.0, 4.0], np.float32)
    s.add(a, a + np.array([0.0, 0.5], np.float32))
    assert s.sqnr_db == pytest.approx(10 * math.log10(25 / 0.25))
    assert s.max_abs_err == pytest.approx(0.5)
    assert s.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    same = TensorStats("u")
    same.add(a, a.copy())
    assert same.sqnr_db == math.inf and same.cosine == 1.0 and same.exact is None


def test_integer_codes_compared_exactly_across_storage() -> None:
    # A QTensor (interpreter) against bare codes (an artifact), including u8 codes stored as i8 (act_i8).
    spec = qir.quantspec.QuantSpec.per_tensor(0.5, 128)
    codes = np.array([0, 127, 128, 255], np.uint8)
    qt = QTensor(codes, np.float32(0.5), np.int32(128), spec)
    ok = TensorStats("q")
    ok.add(qt, (codes.astype(np.int16) - 128).astype(np.int8))
    assert ok.exact is True and ok.sqnr_db == math.inf
    bad = TensorStats("q")
    bad.add(qt, np.array([0, 127, 129, 255], np.uint8))
    assert bad.exact is False and bad.max_abs_err == pytest.approx(0.5)


def test_spill_store_round_trips_through_disk() -> None:
    store = SpillStore(budget=0)  # everything goes to disk
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    qt = QTensor(np.array([1, -2], np.int8), np.float32(0.25), None, qir.quantspec.QuantSpec.per_tensor(0.25))
    store.put("a", arr)
    store.put("q", qt)
    assert store.spilled == 2 and store.in_memory == 0
    np.testing.assert_array_equal(store.take("a"), arr)
    back = store.take("q")
    assert isinstance(back, QTensor) and back.spec == qt.spec
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())
    assert store.take("a") is None
    store.close()


# -- compare -----------------------------------------------------------------------------------------------

def test_model_against_itself_is_exact_everywhere() -> None:
    m = mlp_stack()
    r = compare_sources(QirSource(m), QirSource(m.clone()), feeds())
    assert r.matched == len(QirSource(m).value_names()) == 17
    assert all(t.sqnr_db == math.inf and t.cosine == 1.0 and t.max_abs_err == 0.0 for t in r.tensors)
    assert r.worst is None


def test_broken_layer_is_worst_and_json_shape() -> None:
    m = mlp_stack()
    q = run_pipeline(m, BROKEN)
    assert str(q.constant("layers.2.down.weight").type).startswith("i2[32,64] q(scale=")  # one literal scale
    r = compare_sources(QirSource(m), QirSource(q), feeds())
    assert r.worst == "layers.2.down"
    data = json.loads(json.dumps(r.to_json()))
    assert set(data) >= {"tensors", "worst", "matched", "values_a", "values_b"}
    assert [t["name"] for t in data["tensors"]] == QirSource(m).value_names()  # graph order
    for t in data["tensors"]:
        assert {"name", "sqnr_db", "cosine", "max_abs_err"} <= set(t)
    by = {t["name"]: t for t in data["tensors"]}
    assert by["x"]["sqnr_db"] == math.inf  # Python's JSON writes Infinity and reads it back
    # The 2-bit layer's own output is much worse than the 8-bit ones; its input was still clean.
    assert by["layers.2.down"]["sqnr_db"] < 10 < 30 < by["layers.2.act"]["sqnr_db"]
    assert by["layers.2.down"]["weights"] == ["layers.2.down.weight"]
    assert "layers.2.down" in r.format()
    # 7 values exist only in the quantized model (the dynamic activation quantizations, %x.q ...).
    assert len(r.only_b) == r.names_b - r.matched > 0


def test_memory_bounded_compare_spills_and_agrees() -> None:
    m, q = mlp_stack(), run_pipeline(mlp_stack(), BROKEN)
    full = compare_sources(QirSource(m), QirSource(q), feeds())
    tiny = compare_sources(QirSource(m), QirSource(q), feeds(), memory_budget=0)
    assert [t.sqnr_db for t in tiny.tensors] == [t.sqnr_db for t in full.tensors]


def test_qir_against_its_ort_artifact(tmp_path: Path) -> None:
    from qir.backends.compile import compile_module
    from qir.debug import OrtSource

    m = run_pipeline(mlp_stack(), "quantize{scheme=w8a8}")
    compile_module(m, "ort-cpu", tmp_path / "art", meta={"kind": "unknown"})
    ort = OrtSource(tmp_path / "art", chunk=5)  # several ORT runs of 5 extra outputs each
    r = compare_sources(QirSource(m), ort, feeds(1))
    assert r.matched == len(ort.value_names()) == len(QirSource(m).value_names())
    ints = r.integer_tensors
    assert ints and all(t.exact for t in ints)  # the dynamic int8 activation codes, bit for bit
    assert all(t.sqnr_db > 80 for t in r.tensors)
    # The artifact's own graph, looked through its helper tensors: the matmul reads the codes %x.q (stored as
    # x.q::u8) and, for the dynamic scale, %x itself.
    assert ort.inputs_of()["layers.0.up"] == ["x.q", "x"]
    assert ort.inputs_of()["layers.0.out"] == ["x", "layers.0.down"]


def test_other_backends_plug_in_by_target_prefix(tmp_path: Path) -> None:
    from qir.debug import open_source, register_artifact_source
    from qir.debug.sources import _ARTIFACT_SOURCES, DebugError

    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"target": "fake-cpu"}))
    with pytest.raises(DebugError, match="target 'fake-cpu'"):
        open_source(str(folder))
    m = mlp_stack()
    register_artifact_source("fake-", lambda path: QirSource(m, label=f"fake:{path.name}"))
    try:
        src = open_source(str(folder))
        assert src.label == "fake:art"
        assert compare_sources(QirSource(m), src, feeds(1)).worst is None
    finally:
        del _ARTIFACT_SOURCES["fake-"]


# -- per-pass accounting -----------------------------------------------------------------------------------

def output_error_metric(reference: qir.Module) -> BoundedMetric:
    """Mean squared error of the output against ``reference`` on fixed inputs (lower is better)."""
    fs = feeds(1)
    want = run(reference, fs[0])[0]
    return BoundedMetric("mse", True, "output MSE on 1 feed",
                         lambda mod: float(np.mean((run(mod, fs[0])[0] - want) ** 2)))


def test_accounting_measures_numeric_passes_only() -> None:
    m = mlp_stack()
    out = io.StringIO()
    acc = PassAccounting(metric=output_error_metric(m), out=out)
    PassManager("quantize{scheme=w8a16},quantize{scheme=w8a8},dce", instruments=[acc]).run(m)
    rows = acc.rows()
    assert [r["measured"] for r in rows] == [True, False, False]  # 2nd quantize finds nothing left; dce neutral
    assert "dce" in NUMERICS_NEUTRAL
    assert acc.input_value == 0.0 and rows[0]["metric"] > 0
    data = json.loads(json.dumps(acc.to_json()))
    assert data["metric"] == "mse" and data["final"] == rows[0]["metric"] and len(data["steps"]) == 3
    assert "pass accounting" in out.getvalue() and "quantize{scheme=w8a16}" in out.getvalue()
    # The same table in report.html (qir compile --account puts it in report.json's pass_accounting).
    from qir.tools.report_html import PLOTS, render_html

    page = render_html({"module": "stack", "target": "ort-cpu", "bytes": 1, "pass_accounting": data},
                       {name: b"" for name in PLOTS})
    table = page[page.index('<table id="pass-accounting">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 1 + 3  # header, the input, one row per pass
    assert f"<td>{rows[0]['metric']:.6g}</td>" in table and table.count("(no change)") == 2
    assert "<td>quantize{scheme=w8a16}</td>" in table and "<td>dce</td>" in table
    assert '<table id="pass-accounting">' not in render_html({"module": "m", "target": "t", "bytes": 1},
                                                             {name: b"" for name in PLOTS})


# -- bisect ------------------------------------------------------------------------------------------------

def test_with_overrides_appends_to_quantize() -> None:
    p = with_overrides('quantize{scheme=w8a16,overrides="a*=none"},dce', "b.weight=w8a16")
    assert p == 'quantize{scheme=w8a16,overrides="a*=none;b.weight=w8a16"},dce'
    with pytest.raises(QirError, match="no quantize pass"):
        with_overrides("dce", "x=w8a16")


def test_bisect_finds_the_broken_layer() -> None:
    m = mlp_stack()
    metric = output_error_metric(m)
    plain = metric.measure(run_pipeline(m, "quantize{scheme=w8a8}"))
    ranked, _ = layer_sensitivity(m, run_pipeline(m, BROKEN), feeds())
    assert ranked[0][0] == "layers.2.down.weight"
    res = bisect_layers(m, BROKEN, metric, 1.5 * plain, feeds=feeds(), higher="w8a8")
    assert res.met and res.kept == ["layers.2.down.weight"]
    assert res.baseline > 1.5 * plain >= res.final
    assert len(res.evaluations) <= 3  # as given, then k=1 passes
    assert res.overrides == "layers.2.down.weight=w8a8"
    repaired = run_pipeline(m, res.pipeline)
    assert metric.measure(repaired) == pytest.approx(res.final)


def test_bisect_reports_an_unreachable_bound() -> None:
    m = mlp_stack(n_layers=2)
    res = bisect_layers(m, BROKEN.replace("layers.2", "layers.1"), output_error_metric(m), 0.0, feeds=feeds(),
                        higher="w8a8")
    assert not res.met and len(res.kept) == 4 and "no set of layers" in res.format()


# -- the command line --------------------------------------------------------------------------------------

def toy_lm(text: str, vocab: int = 48, layers: int = 4, seed: int = 0, dim: int = D) -> qir.Module:
    """A toy causal LM that knows ``text``'s character bigrams: ``prefill(tokens) -> logits``.

    Embedding and untied head are a rank-``D`` factorization of the bigram log-probabilities (so perplexity
    means something); residual MLP blocks in between perturb it moderately, so a broken block shows.
    """
    rng = np.random.default_rng(seed)
    ids = CharTokenizer(vocab)(text)["input_ids"]
    counts = np.ones((vocab, vocab))
    for a, b in zip(ids, ids[1:]):
        counts[a, b] += 1
    logp = np.log(counts / counts.sum(1, keepdims=True))
    u, sv, vt = np.linalg.svd(logp - logp.mean(1, keepdims=True))
    m = qir.Module("toylm")
    table = m.add_constant("embed.weight", (u[:, :dim] * np.sqrt(sv[:dim])).astype(np.float32))
    f = m.add_function("prefill")
    tokens = f.add_input("tokens", TensorType.of("i64", [1, "seq"]))
    h = f.add_op("embedding", [table, tokens], names=["embed"]).result
    for i in range(layers):
        up = m.add_constant(f"layers.{i}.up.weight",
                            (rng.standard_normal((2 * dim, dim)) / np.sqrt(dim)).astype(np.float32))
        down = m.add_constant(f"layers.{i}.down.weight",
                              (0.5 * rng.standard_normal((dim, 2 * dim)) / np.sqrt(2 * dim)).astype(np.float32))
        a = f.add_op("silu", [f.add_op("linear", [h, up], names=[f"layers.{i}.up"]).result],
                     names=[f"layers.{i}.act"]).result
        h = f.add_op("add", [h, f.add_op("linear", [a, down], names=[f"layers.{i}.down"]).result],
                     names=[f"layers.{i}.out"]).result
    head = m.add_constant("head.weight", (vt[:dim].T * np.sqrt(sv[:dim])).astype(np.float32))
    f.set_outputs([f.add_op("linear", [h, head], names=["logits"]).result])
    return m


class CharTokenizer:
    def __init__(self, vocab: int = 48) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % self.vocab for c in text]}


def test_cli_compare_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qir.serialize import save
    from qir.tools.cli import main

    save(mlp_stack(), tmp_path / "f.qir")
    save(run_pipeline(mlp_stack(), BROKEN), tmp_path / "b.qir")
    np.savez(tmp_path / "x.npz", x=feeds(1)[0]["x"])
    assert main(["debug", "compare", str(tmp_path / "f.qir"), str(tmp_path / "b.qir"), "--inputs",
                 str(tmp_path / "x.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["worst"] == "layers.2.down" and len(data["tensors"]) == 17
    assert main(["debug", "compare", str(tmp_path / "f.qir"), str(tmp_path / "b.qir"), "--inputs",
                 str(tmp_path / "x.npz")]) == 0
    text = capsys.readouterr().out
    assert "matched 17 of 24" in text and "worst" in text
    # No inputs for a model of unknown kind: one line, exit 2.
    assert main(["debug", "compare", str(tmp_path / "f.qir"), str(tmp_path / "b.qir")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inputs" in err


def test_cli_bisect_and_account_on_a_toy_lm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import qir.frontend.importer as importer
    from qir.frontend.importer import LoadedImport
    from qir.tools.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 20)
    monkeypatch.setattr(importer, "import_model", lambda *a, **k: LoadedImport(
        module=toy_lm(text.read_text()), kind="causal-lm", source="toy", tokenizer=CharTokenizer()))
    broken = 'quantize{scheme=w8a16,overrides="layers.1.down.weight=w2a16:tensor"}'
    assert main(["quantize", "toy", "-p", broken, "--account", "--account-text", str(text),
                 "-o", str(tmp_path / "q.qir")]) == 0
    err = capsys.readouterr().err
    assert "pass accounting" in err and "ppl" in err
    acc = json.loads((tmp_path / "q.report.json").read_text())["pass_accounting"]
    assert acc["metric"] == "ppl" and acc["steps"][0]["measured"]
    broken_ppl = acc["final"]
    assert main(["quantize", "toy", "-p", "quantize{scheme=w8a16}", "--account", "--account-text", str(text),
                 "-o", str(tmp_path / "p.qir")]) == 0
    capsys.readouterr()
    plain_ppl = json.loads((tmp_path / "p.report.json").read_text())["pass_accounting"]["final"]
    assert broken_ppl > 1.01 * plain_ppl  # the broken layer really costs something
    rc = main(["debug", "bisect", "toy", "-p", broken, "--metric-max", str(1.01 * plain_ppl), "--calib-text",
               str(text), "--seq", "64", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["met"] and res["kept"] == ["layers.1.down.weight"]
    assert res["overrides"] == "layers.1.down.weight=w8a16"
    assert main(["debug", "bisect", "toy", "-p", broken, "--calib-text", str(text)]) == 2
    assert "exactly one bound" in capsys.readouterr().err
    # No --account-text / --calib-text: an LM is measured on the report's perplexity text (Debian's GPL-3) ...
    import qir.tools.report as report

    assert main(["quantize", "toy", "-p", "quantize", "--account", "-o", str(tmp_path / "z.qir")]) == 0
    sample = json.loads((tmp_path / "z.report.json").read_text())["pass_accounting"]["sample"]
    assert str(report.default_eval_text()) in sample
    capsys.readouterr()
    # ... and when there is no such text either, it says what to give.
    monkeypatch.setattr(report, "default_eval_text", lambda: None)
    assert main(["quantize", "toy", "-p", "quantize", "--account", "-o", str(tmp_path / "y.qir")]) == 2
    assert "needs text" in capsys.readouterr().err


# -- real model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_float_against_its_ort_artifact(tmp_path: Path) -> None:
    from qir.backends.compile import compile_module
    from qir.debug import OrtSource, default_feeds
    from qir.frontend.importer import import_model

    imported = import_model("minilm-l6")
    compile_module(imported.module, "ort-cpu", tmp_path / "art", meta={"kind": "encoder", "source": "minilm-l6"})
    a = QirSource.from_import(imported)
    b = OrtSource(tmp_path / "art")
    r = compare_sources(a, b, default_feeds(a, windows=1))
    assert r.matched == len(b.value_names())  # every value the artifact computes is matched by name
    assert r.integer_tensors and all(t.exact for t in r.integer_tensors)
    assert min(t.cosine for t in r.tensors) > 0.9999


def test_cli_documented_combined_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #5's combined pipeline, spelled as documented, through ``qir quantize --calib-text`` on a toy LM:
    it composes, every weight ends up within the bit budget, and the result runs (vocab-share leaves a 48-row
    table alone: fewer rows than its ``min_rows``)."""
    import qir.frontend.importer as importer
    from qir.frontend.importer import LoadedImport
    from qir.tools.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 20)
    monkeypatch.setattr(importer, "import_model", lambda *a, **k: LoadedImport(
        module=toy_lm(text.read_text(), vocab=256, dim=256), kind="causal-lm", source="toy",
        tokenizer=CharTokenizer(256)))  # rows of 256: 4-bit per row fits the 4.25-bit budget (32 bits / row)
    pipe = "calibrate,vocab-share,mixed-precision{budget=4.25},quantize,fold-scales,dce"
    out = tmp_path / "c.qir"
    assert main(["quantize", "toy", "-p", pipe, "--calib-text", str(text), "-o", str(out)]) == 0
    m = qir.load(out)
    qir.verify(m)
    ops = [op.opcode for op in m.function("prefill").ops]
    assert "linear" not in ops and "embedding" not in ops, ops
    weights = [c for c in m.constants.values() if c.type.quant is not None and c.type.rank == 2]
    params = sum(c.type.numel() for c in weights)
    assert params > 0
    nbytes = sum(c.type.nbytes() for c in m.constants.values() if not c.name.startswith("calib."))
    assert 8 * nbytes / params <= 4.25 + 0.5  # the budget, plus the few f32 norms/biases it does not assign
    logits = qir.run(m, {"tokens": np.asarray([CharTokenizer(256)(text.read_text()[:32])["input_ids"]], np.int64)})[0]
    assert np.isfinite(np.asarray(logits)).all()
