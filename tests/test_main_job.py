"""The main job's command line as a user drives it: compile with its report, run, targets, dot, help and errors.

Each call is a subprocess (``python -m qir``). The model here is the demo's small LLaMA-style block (no download);
``tests/test_readme.py`` runs the README's real first command on SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

QIR = [sys.executable, "-m", "qir"]
SUBCOMMANDS = ("dump", "quantize", "passes", "diff", "verify", "ops", "demo", "import", "generate", "eval",
               "compile", "run", "targets")


def qir(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QIR, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, no traceback, and the message names the command: what every user error must look like."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("qir ")]
    assert lines, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = qir("demo", "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def compiled(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("c") / "tiny-w8a16"
    proc = qir("compile", str(demo / "tiny-f32.qir"), "--preset", "w8a16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_every_subcommand_has_help_with_examples_and_exit_codes() -> None:
    from qir.tools.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices  # argparse keeps them here
    assert set(SUBCOMMANDS) <= set(subs)
    for name in SUBCOMMANDS:
        text = subs[name].format_help()
        assert "example" in text and "exit codes" in text, name
    assert qir("compile", "--help").returncode == 0


def test_show_pipeline_for_every_preset() -> None:
    from qir.passes import parse_pipeline
    from qir.tools.compile_cli import DEFAULT_PRESET, PRESETS

    assert DEFAULT_PRESET in PRESETS
    for name, pipeline in PRESETS.items():
        proc = qir("compile", "--preset", name, "--show-pipeline")
        assert proc.returncode == 0 and proc.stdout.strip() == pipeline, name
        parse_pipeline(pipeline)  # every preset is a valid pipeline string
    assert qir("compile", "--show-pipeline").stdout.strip() == PRESETS[DEFAULT_PRESET]


def test_compile_writes_report_json_html_and_plots(compiled: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = compiled
    rep = json.loads((out / "report.json").read_text())
    assert rep["preset"] == "w8a16" and rep["pipeline"] == "quantize{scheme=w8a16},merge-siblings"
    tot = rep["totals"]
    assert tot["float_bytes"] == 4 * tot["params"]
    assert 8.0 < tot["bits_per_param"] < 9.0  # int8 codes + one f32 scale per row
    layers = {r["name"]: r for r in rep["layers"]}
    assert layers["wq"]["dtype"] == "i8" and layers["wq"]["granularity"] == "per channel (axis 0)"
    # round to nearest per row: the error is at most half a step per element, and not zero
    assert all(0 < r["rel_error"] < 0.02 for r in rep["layers"] if r["bits"] == 8), rep["layers"]
    assert sum(r["bytes"] for r in rep["layers"]) <= tot["qir_bytes"]
    assert rep["quality"] is None and "unknown" in rep["quality_note"]  # a bare .qir has no tokenizer
    html = (out / "report.html").read_text()
    assert html.count("<tr>") >= len(rep["layers"]) + 3
    for png in ("size_vs_quality.png", "layer_bits.png", "layer_error.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    assert html.count('src="data:image/png;base64,') == 3
    assert "bits/param" in proc.stdout and f"{out / 'report.html'}" in proc.stdout


def test_compile_default_output_folder_and_float_for_qir(demo: Path, tmp_path: Path) -> None:
    proc = qir("compile", str(demo / "tiny-w4.qir"), "--eval-windows", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "tiny-w4-ort-cpu-float"  # a .qir is lowered as it is
    assert (out / "report.html").is_file()
    assert "out/tiny-w4-ort-cpu-float" in proc.stdout
    assert json.loads((out / "report.json").read_text())["quality_note"] == "skipped (--eval-windows 0)"


def test_compile_a_qir_written_by_quantize_from_another_folder(demo: Path, tmp_path: Path) -> None:
    """The sidecar of `qir quantize X.qir` names X by the path it was given; compiling the result from another
    folder must not try to load a tokenizer from that path."""
    q = qir("quantize", str(demo / "tiny-f32.qir"), "-p", "quantize{scheme=w8a16}", "-o", str(tmp_path / "y.qir"))
    assert q.returncode == 0, q.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = qir("compile", str(tmp_path / "y.qir"), "--target", "ort-cpu", "-o", str(elsewhere / "art"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "art" / "model.onnx").is_file()


def test_report_lists_earlier_compiles_of_the_same_model(tmp_path: Path) -> None:
    from qir.tools.report import sibling_compiles

    for name, preset, size in (("a", "w8a8", 100), ("b", "w4a16", 60), ("c", "float", 400)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({
            "source": "m" if name != "c" else "other", "preset": preset, "target": "ort-cpu",
            "totals": {"qir_bytes": size}, "quality": {"metric": "ppl", "float": 10.0, "compiled": 11.0}}))
    found = sibling_compiles(tmp_path, "m", exclude=tmp_path / "a")
    assert [o["preset"] for o in found] == ["w4a16"]


def test_run_artifact_and_qir_agree(demo: Path, compiled: tuple[Path, subprocess.CompletedProcess[str]],
                                    tmp_path: Path) -> None:
    out, _ = compiled
    a = qir("run", str(out), "--tokens", "1,5,9,2", "--json", "-o", str(tmp_path / "a.npz"))
    assert a.returncode == 0, a.stderr
    row = json.loads(a.stdout)["outputs"][0]
    assert row["shape"][:2] == [1, 4] and row["dtype"] == "float32"
    np.savez(tmp_path / "x.npz", tokens=np.asarray([[1, 5, 9, 2]], dtype=np.int64))
    ref_q = tmp_path / "ref.qir"
    assert qir("quantize", str(demo / "tiny-f32.qir"), "-p", "quantize{scheme=w8a16}", "-o", str(ref_q)).returncode == 0
    b = qir("run", str(ref_q), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "b.npz"))
    assert b.returncode == 0, b.stderr
    ya, yb = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    key = next(iter(yb.files))
    np.testing.assert_allclose(ya[key], yb[key], rtol=1e-3, atol=1e-3)
    bad = qir("run", str(out), "--tokens", "1,x")
    assert "expected integers" in one_line_error(bad)


def test_targets_lists_what_each_supports() -> None:
    proc = qir("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"ort-cpu", "ort-ascend"} <= set(rows)
    assert rows["ort-ascend"]["static_shapes"] is True and rows["ort-cpu"]["static_shapes"] is False
    assert any("MatMulNBits" in w for w in rows["ort-cpu"]["supports"]["weights"])
    text = qir("targets").stdout
    assert "ort-cpu:" in text and "checks" in text


def test_dump_dot_has_a_node_per_op(demo: Path) -> None:
    from qir.serialize import load

    path = demo / "tiny-w4.qir"
    proc = qir("dump", "--format", "dot", str(path))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith('digraph "tiny-w4" {') and text.rstrip().endswith("}")
    n_ops = sum(len(f.ops) for f in load(path).functions.values())
    assert text.count("[shape=box,") == n_ops
    assert text.count("{") == text.count("}")
    assert "i4[" in text  # quantized constants show their types


# -- errors: one message, exit 2, no traceback, no folder ------------------------------------------------------

def test_wrong_model_path(tmp_path: Path) -> None:
    err = one_line_error(qir("compile", str(tmp_path / "nope" / "model.gguf"), "-o", str(tmp_path / "o")))
    assert "model.gguf" in err
    assert not (tmp_path / "o").exists()


def test_unknown_target_and_preset_list_the_valid_ones(demo: Path, tmp_path: Path) -> None:
    err = one_line_error(qir("compile", str(demo / "tiny-f32.qir"), "--target", "tpu", "-o", str(tmp_path / "o")))
    assert "unknown target 'tpu'" in err and "ort-cpu" in err and "ort-ascend" in err
    err = one_line_error(qir("compile", str(demo / "tiny-f32.qir"), "--preset", "w3", "-o", str(tmp_path / "o")))
    assert "unknown preset 'w3'" in err and "w8a16" in err and "w4a16-mixed" in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(demo: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error(qir("compile", str(demo / "tiny-f32.qir"), "-o", str(blocker / "sub" / "out")))
    assert "cannot write" in err


def test_unsupported_op_is_one_clear_message(tmp_path: Path) -> None:
    import torch

    class Frac(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.frac()

    pt2 = tmp_path / "frac.pt2"
    torch.export.save(torch.export.export(Frac(), (torch.randn(3, 4),)), str(pt2))
    err = one_line_error(qir("compile", str(pt2), "-o", str(tmp_path / "o")))
    assert "unsupported aten op aten.frac.default" in err
    assert not (tmp_path / "o").exists()


INTERRUPT_DURING_REPORT = '''\
# Loaded with --load-pass: simulates Ctrl-C while the report is being written (after the ONNX files are).
import qir.tools.report_html as report_html
from qir.passes import function_pass


@function_pass("noop-for-test")
def noop(module):
    """Does nothing (--load-pass wants a file that registers a pass)."""


def interrupted(report, folder):
    assert (folder / "model.onnx").is_file()
    raise KeyboardInterrupt


report_html.write_html_report = interrupted
'''


def test_interrupted_compile_leaves_no_folder(demo: Path, tmp_path: Path) -> None:
    hook = tmp_path / "interrupt.py"
    hook.write_text(INTERRUPT_DURING_REPORT)
    out = tmp_path / "o"
    proc = qir("compile", str(demo / "tiny-f32.qir"), "--preset", "w8a16", "--load-pass", str(hook), "-o", str(out))
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [hook]  # no temporary folder left either


def test_output_error_per_layer_on_real_activations(demo: Path) -> None:
    from qir.passes import run_pipeline
    from qir.serialize import load
    from qir.tools.report import layer_rows, output_errors

    f32 = load(demo / "tiny-f32.qir")
    feed = {f32.main.inputs[0].name: np.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], dtype=np.int64)}
    same = output_errors(f32, f32, feed, "main")
    linears = {op.operands[1].name for op in f32.main.ops if op.opcode == "linear"}
    assert set(same) == linears and all(v == 0.0 for v in same.values())
    w8 = output_errors(f32, run_pipeline(f32, "quantize{scheme=w8a16}"), feed, "main")
    w4 = output_errors(f32, run_pipeline(f32, "quantize{scheme=w4a16,group=32}"), feed, "main")
    assert all(0 < w8[n] < 0.05 for n in linears), w8
    # 4 bits lose more than 8, layer by layer; the tied head ("embed") stays int8 per row in both schemes
    body = linears - {"embed"}
    assert all(w4[n] > 2 * w8[n] for n in body), (w4, w8)
    assert w4["embed"] == w8["embed"]
    rows = {r["name"]: r for r in layer_rows(f32, run_pipeline(f32, "quantize{scheme=w4a16,group=32}"))}
    assert all(rows[n]["bits"] == 4 for n in body) and rows["embed"]["bits"] == 8
