"""The same inputs and options give byte-identical artifacts (.qir, .safetensors, sidecar, ONNX, reports)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def qir(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "qir", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_quantize_and_compile_twice_are_identical(tmp_path: Path) -> None:
    # Same paths both times (artifacts record where they came from), the folder emptied in between.
    runs = []
    for _ in (1, 2):
        out = tmp_path / "run"
        shutil.rmtree(out, ignore_errors=True)
        qir("demo", "-q", "-o", str(out))
        qir("quantize", str(out / "tiny-f32.qir"), "-p", "quantize{scheme=w4a16,group=32},cse,dce",
            "-o", str(out / "q.qir"))
        qir("compile", str(out / "tiny-w8a8.qir"), "--target", "ort-cpu", "-o", str(out / "ort"))
        runs.append(digests(out))
    assert runs[0] == runs[1]
    assert {"tiny-w4.qir", "tiny-w4.safetensors", "q.qir", "q.safetensors", "ort/model.onnx",
            "ort/report.json"} <= set(runs[0])


@pytest.mark.slow
def test_real_model_import_and_compile_twice_are_identical(tmp_path: Path) -> None:
    runs = []
    for _ in (1, 2):
        out = tmp_path / "run"
        shutil.rmtree(out, ignore_errors=True)
        qir("import", "minilm-l6", "-o", str(out / "m.qir"))
        qir("compile", str(out / "m.qir"), "--target", "ort-cpu", "--preset", "w8a8", "-o", str(out / "ort"))
        runs.append(digests(out))
    assert runs[0] == runs[1]
    assert {"m.qir", "m.safetensors", "m.json", "ort/model.onnx", "ort/target.json", "ort/report.json"} <= set(runs[0])
