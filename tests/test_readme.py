"""The README's code examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

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
