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


def test_artifacts_do_not_depend_on_hash_seed_or_working_folder(tmp_path: Path) -> None:
    """Set and dict iteration over strings follows PYTHONHASHSEED: two runs with different seeds, from different
    working folders, give the same bytes, and no artifact carries a timestamp."""
    import os
    import re

    runs = []
    for seed in ("1", "2"):
        out = tmp_path / "run"
        shutil.rmtree(out, ignore_errors=True)
        cwd = tmp_path / f"cwd{seed}"
        cwd.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        for args in (["demo", "-q", "-o", str(out)],
                     ["quantize", str(out / "tiny-f32.qir"), "-p", "quantize{scheme=w4a16,group=32},cse,dce",
                      "-o", str(out / "q.qir")],
                     ["compile", str(out / "tiny-w8a8.qir"), "--target", "ort-cpu", "-o", str(out / "ort")]):
            proc = subprocess.run([sys.executable, "-m", "qir", *args], capture_output=True, text=True, timeout=600,
                                  cwd=cwd, env=env)
            assert proc.returncode == 0, proc.stderr
        runs.append(digests(out))
        stamp = re.compile(r"20\d\d-[01]\d-[0-3]\dT|\b1[6-9]\d{8}\.\d+")  # ISO dates, Unix times
        for p in out.rglob("*"):
            if p.suffix in (".json", ".qir"):
                assert not stamp.search(p.read_text()), p
    assert runs[0] == runs[1]
