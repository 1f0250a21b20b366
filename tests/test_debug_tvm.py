"""``qir debug compare`` against ``tvm-llvm`` artifacts (:mod:`qir.debug.tvm_source`,
:mod:`qir.backends.tvm.debug_build`).

A tiny w8a8 model (a residual MLP stack with dynamic int8 activations: integer codes) is compiled for
``tvm-llvm`` and compared with its ``.qir`` on the interpreter: every value the artifact names is matched, the
codes bit for bit. The slow test does the issue's MiniLM case (float ``.qir`` vs its ``tvm-llvm`` artifact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from qweights import add_quantized_weight
from test_debug import mlp_stack

import qir
from qir.debug import QirSource, compare_sources, open_source
from qir.debug.sources import DebugError
from qir.passes import run_pipeline
from qir.types import TensorType

pytest.importorskip("tvm")

from qir.backends.compile import compile_module  # noqa: E402 - after the importorskip
from qir.backends.tvm.debug_build import DebugBuild, artifact_module, unpack_rows  # noqa: E402
from qir.backends.tvm.qops import pack_rows  # noqa: E402

D = 32


def tiny(n_layers: int = 2) -> qir.Module:
    """``x -> n x (x + down(silu(up(x))))`` (quantized by the tests: every linear reads int8 codes)."""
    return mlp_stack(n_layers, seed=0)


def feed(seq: int = 9) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((1, seq, D)).astype(np.float32)}


@pytest.fixture(scope="module")
def w8a8_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[qir.Module, Path]:
    m = run_pipeline(tiny(), "quantize{scheme=w8a8}")
    out = tmp_path_factory.mktemp("tvm") / "art"
    compile_module(m, "tvm-llvm", out, meta={"kind": "unknown"})
    return m, out


def test_unpack_rows_inverts_pack_rows() -> None:
    rng = np.random.default_rng(1)
    for bits, signed in ((4, True), (4, False), (2, True), (2, False)):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        codes = rng.integers(lo, hi + 1, size=(3, 7)).astype(np.int8 if signed else np.uint8)  # odd K: padding
        assert np.array_equal(unpack_rows(pack_rows(codes, bits), bits, signed, 7), codes)


def test_artifact_carries_its_module_and_rebuilds_it(w8a8_artifact: tuple[qir.Module, Path]) -> None:
    m, out = w8a8_artifact
    report = json.loads((out / "report.json").read_text())
    info = report["debug"]
    assert info["module"] == "module.qir" and info["relax_hash"].isdigit() and "llvm" in info["target"]
    assert "extra_params" not in info  # every weight is in params.safetensors already
    assert (out / "module.qir").stat().st_size < 20_000  # text only: the weights stay in params.safetensors
    back = artifact_module(out)
    assert qir.printer.print_module(back) == qir.printer.print_module(m)
    for name, c in m.constants.items():
        assert np.array_equal(back.constant(name).numpy(), c.numpy()), name


def test_int4_weights_come_back_unpacked(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    m = qir.Module("w4")
    w = add_quantized_weight(m, "w", rng.standard_normal((16, 33)).astype(np.float32), "i4", axis=0)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 33]))
    y = f.add_op("qmatmul", [x, w], names=["y"]).result
    f.set_outputs([f.add_op("gelu", [y], names=["z"]).result])
    compile_module(m, "tvm-llvm", tmp_path / "art", meta={"kind": "unknown"})
    back = artifact_module(tmp_path / "art")
    assert np.array_equal(back.constant("w").numpy(), m.constant("w").numpy())
    x_in = {"x": np.random.default_rng(3).standard_normal((1, 5, 33)).astype(np.float32)}
    r = compare_sources(QirSource(m), open_source(str(tmp_path / "art")), [x_in])
    assert [t.name for t in r.tensors] == ["x", "y", "z"] and all(t.sqnr_db > 100 for t in r.tensors)


def test_qir_against_its_tvm_artifact_every_value_by_name(w8a8_artifact: tuple[qir.Module, Path]) -> None:
    m, out = w8a8_artifact
    src = open_source(str(out), chunk=3)  # pieces of 3 outputs each, in one debug build
    ref = QirSource(m)
    r = compare_sources(ref, src, [feed(), feed(5)])
    names = src.value_names()
    assert r.matched == len(names) == len(ref.value_names()) and not r.only_a and not r.only_b
    ints = r.integer_tensors
    assert {t.name for t in ints} == {v.name for op in m.main.ops for v in op.results if v.type.quant is not None}
    assert ints and all(t.exact for t in ints)  # the dynamic int8 activation codes, bit for bit
    assert all(t.sqnr_db > 80 and t.cosine > 0.999999 for t in r.tensors)
    build = src.build  # type: ignore[attr-defined]
    assert build.compiles == 1  # one module with every piece, reused for the second feed
    plan = next(iter(build._executables.values()))[0]
    assert len(plan.pieces) == math.ceil((len(names) - 1) / 3)
    assert all(p.keeps for p in plan.pieces[:-1])  # the residual stream crosses every cut
    # The rebuilt module computes what model.so computes: its output, fetched as a binding, is the same bits.
    got: dict[str, np.ndarray] = {}
    src.stream(feed(), {"layers.1.out"}, got.__setitem__)
    assert np.array_equal(got["layers.1.out"], src.artifact.run(feed())[0])  # type: ignore[attr-defined]
    data = r.to_json()
    assert set(data) >= {"tensors", "worst", "matched", "integer_tensors", "integer_exact"}
    assert data["integer_exact"] == data["integer_tensors"] == len(ints)
    assert [t["name"] for t in data["tensors"]] == names
    assert set(data["tensors"][0]) >= {"name", "sqnr_db", "cosine", "max_abs_err"}


def test_cli_compare_with_a_tvm_artifact(w8a8_artifact: tuple[qir.Module, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from qir.serialize import save
    from qir.tools.cli import main

    m, out = w8a8_artifact
    save(m, tmp_path / "m.qir")
    np.savez(tmp_path / "x.npz", **feed())
    assert main(["debug", "compare", str(tmp_path / "m.qir"), str(out), "--inputs", str(tmp_path / "x.npz"),
                 "--json", "--chunk", "100"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matched"] == data["values_b"] == len(QirSource(m).value_names())
    assert data["integer_exact"] == data["integer_tensors"] > 0


def test_an_artifact_that_cannot_be_rebuilt_is_refused(w8a8_artifact: tuple[qir.Module, Path], tmp_path: Path
                                                       ) -> None:
    import shutil

    _, out = w8a8_artifact
    old = tmp_path / "old"
    shutil.copytree(out, old)
    report = json.loads((old / "report.json").read_text())
    del report["debug"]
    (old / "report.json").write_text(json.dumps(report))
    with pytest.raises(DebugError, match="compile it again"):
        open_source(str(old))
    # A module.qir that no longer lowers to the artifact's Relax module (edited, or another qir version).
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    text = (changed / "module.qir").read_text()
    (changed / "module.qir").write_text(text.replace("silu", "gelu", 1))
    with pytest.raises(qir.errors.QirError, match="another Relax module"):
        _ = DebugBuild(changed).lowered
    # A cross-compiled library (tvm-arm) runs on another device, not here.
    cross = tmp_path / "cross"
    shutil.copytree(out, cross)
    tgt = json.loads((cross / "target.json").read_text())
    tgt["tvm"]["cc"] = "aarch64-linux-gnu-gcc"
    (cross / "target.json").write_text(json.dumps(tgt))
    with pytest.raises(DebugError, match="another device"):
        open_source(str(cross))


@pytest.mark.slow
def test_minilm_float_against_its_tvm_artifact(tmp_path: Path) -> None:
    from qir.debug.compare import default_feeds
    from qir.frontend.importer import import_model

    imported = import_model("minilm-l6")
    compile_module(imported.module, "tvm-llvm", tmp_path / "art", meta={"kind": imported.kind,
                                                                        "source": imported.source})
    ref = QirSource.from_import(imported)
    src = open_source(str(tmp_path / "art"), chunk=1000)  # one debug build: the default sentences are short
    r = compare_sources(ref, src, default_feeds(ref))
    assert r.matched == len(src.value_names()) > 150
    # The fused attention kernel writes its result through the head transpose that follows it, so the attention
    # op's own (untransposed) result is never materialized; every other value is.
    opcode = {r.name: op.opcode for op in ref.function.ops for r in op.results}
    missing = set(ref.value_names()) - set(src.value_names())
    assert {opcode.get(n) for n in missing} <= {"attention"}
    ints = r.integer_tensors
    assert len(ints) > 20 and all(t.exact for t in ints)
    assert min(t.sqnr_db for t in r.tensors) > 90


def test_cli_compile_for_tvm_writes_report_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qir.serialize import save
    from qir.tools.cli import main

    save(tiny(1), tmp_path / "t.qir")
    out = tmp_path / "art"
    assert main(["compile", str(tmp_path / "t.qir"), "--target", "tvm-llvm", "-o", str(out), "-q"]) == 0
    assert f"{out / 'report.html'}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["params"] == 2 * 2 * D * D and report["debug"]["module"] == "module.qir"
    assert "not measured" in report["quality_note"]
    page = (out / "report.html").read_text()
    assert '<table id="layers">' in page and (out / "layer_bits.png").is_file()
