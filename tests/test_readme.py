"""The README's code examples run as written."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qir
from qir.passes import run_pipeline, unregister_pass
from qir.types import TensorType

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    """The fenced code blocks tagged ``lang`` ("" for untagged ones), in order."""
    blocks: list[str] = []
    current: list[str] | None = None
    tag = ""
    for line in README.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if tag == lang:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_quick_start_runs(tmp_path: Path) -> None:
    code = next(b for b in _blocks("python") if "quant.choose_params" in b)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = next(b for b in _blocks("") if b.startswith("module @tiny"))
    assert proc.stdout == shown + "\n"  # print() adds a newline after the module's own final one


def test_custom_pass_example_works_in_a_pipeline(tmp_path: Path) -> None:
    code = next(b for b in _blocks("python") if b.startswith("# mypasses.py"))
    assert len(code.strip().splitlines()) < 30  # "a user writes it in under 30 lines"
    path = tmp_path / "mypasses.py"
    path.write_text(code)
    m = qir.Module("m")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 8]))
    a = f.add_op("gelu", [x], {"approximate": "tanh"}, names=["layers.0.act"]).result
    b = f.add_op("gelu", [a], {"approximate": "tanh"}, names=["head.act"]).result
    f.set_outputs([b])
    from qir.passes import load_pass_file

    try:
        assert load_pass_file(path) == ["gelu-exact"]
        out = run_pipeline(m, "gelu-exact{only=layers.*},cse,dce")
    finally:
        unregister_pass("gelu-exact")
    ops = {op.result.name: op.attrs["approximate"] for op in out.main.ops}
    assert ops == {"layers.0.act": "none", "head.act": "tanh"}
    xs = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    assert not np.array_equal(qir.run(m, [xs])[0], qir.run(out, [xs])[0])


def _first_command() -> str:
    return next(b for b in _blocks("sh") if "qir compile" in b).strip()


def test_first_command_is_setup_then_compile_then_generate() -> None:
    cmd = _first_command()
    steps = [s.strip() for s in cmd.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1].startswith(".venv/bin/pip install")
    assert steps[2] == ".venv/bin/qir compile"
    from qir.tools.compile_cli import DEFAULT_MODEL, DEFAULT_PRESET, DEFAULT_TARGET, default_output

    folder = default_output(DEFAULT_MODEL, DEFAULT_TARGET, DEFAULT_PRESET)
    assert steps[3].startswith(f".venv/bin/qir generate {folder} --prompt ")


def test_presets_table_matches_the_code() -> None:
    from qir.tools.compile_cli import PRESETS

    rows = {}
    lines = README.read_text().splitlines()
    start = lines.index("| preset | pipeline | meaning |")
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].strip("`") in PRESETS:
            rows[cells[0].strip("`")] = cells[1].strip("`").replace("\\|", "|")
    assert set(rows) == set(PRESETS)
    assert all(rows[k] == (v or "(none)") for k, v in PRESETS.items()), rows


@pytest.mark.slow
def test_first_command_compiles_and_answers(tmp_path: Path) -> None:
    """The README's first command after its set-up steps (this environment is the set-up): compile with no
    arguments, then generate with the compiled folder. SmolLM2 must be in the qir cache or fetchable."""
    steps = [s.strip() for s in _first_command().split("&&")][2:]
    outs = []
    for step in steps:
        argv = shlex.split(step)
        assert argv[0] == ".venv/bin/qir"
        proc = subprocess.run([sys.executable, "-m", "qir", *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc)
    summary = outs[0].stdout
    assert "bits/param" in summary and "perplexity" in summary and "report.html" in summary
    folder = tmp_path / shlex.split(steps[1])[2]
    report = json.loads((folder / "report.json").read_text())
    assert report["preset"] == "w8a16" and report["quality"]["change"] < 0.05  # within 5% of float perplexity
    assert (folder / "report.html").is_file()
    answer = outs[1].stdout
    assert "Paris" in answer, answer
    assert "tokens/s" in outs[1].stderr
    # sampled generation is reproducible with a seed
    again = [subprocess.run([sys.executable, "-m", "qir", "generate", str(folder), "--prompt", "Name a colour.",
                             "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "3"],
                            capture_output=True, text=True, timeout=600).stdout for _ in range(2)]
    assert again[0] == again[1] and again[0].strip()
