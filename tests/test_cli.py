"""The ``qir`` command as a user drives it: a subprocess per call, exit codes and messages checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

QIR = [sys.executable, "-m", "qir"]


def qir(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QIR, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = qir("demo", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "top-1 agree" in proc.stdout
    return out


def test_demo_report_shows_all_schemes_and_the_source_example(demo_dir: Path) -> None:
    proc = qir("demo", "-o", str(demo_dir))
    out = proc.stdout
    assert "[[-127, -103, -78], [78, 103, 127]]" in out
    for scheme in ("f32", "w4", "w8a8"):
        assert (demo_dir / f"tiny-{scheme}.qir").exists()
        assert (demo_dir / f"tiny-{scheme}.safetensors").exists()
        assert any(line.strip().startswith(scheme + " ") for line in out.splitlines()), out


def test_dump_prints_canonical_text(demo_dir: Path) -> None:
    path = demo_dir / "tiny-w4.qir"
    proc = qir("dump", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == path.read_text()


def test_dump_summary_counts_ops(demo_dir: Path) -> None:
    proc = qir("dump", "--summary", str(demo_dir / "tiny-w8a8.qir"))
    assert proc.returncode == 0, proc.stderr
    assert "qmatmul" in proc.stdout and "quantize" in proc.stdout and "stored bytes" in proc.stdout


def test_diff_exit_codes(demo_dir: Path) -> None:
    a, b = demo_dir / "tiny-f32.qir", demo_dir / "tiny-w4.qir"
    same = qir("diff", str(a), str(a))
    assert same.returncode == 0 and same.stdout == ""
    diff = qir("diff", str(a), str(b))
    assert diff.returncode == 1
    assert diff.stdout.startswith(f"--- {a}\n+++ {b}\n")
    assert "+const @wq : i4[128,128] q(axis=1, group=32, scale=@wq.scale) = blob" in diff.stdout


def test_verify_ok_and_broken(demo_dir: Path, tmp_path: Path) -> None:
    ok = qir("verify", str(demo_dir / "tiny-w4.qir"))
    assert ok.returncode == 0, ok.stderr
    text = (demo_dir / "tiny-f32.qir").read_text()
    broken = tmp_path / "broken.qir"
    # Declare a wrong result shape on the final linear (and in the signature, so the text still parses):
    # the verifier must name the op and the rule.
    assert text.count("f32[1,seq,512]") == 2
    broken.write_text(text.replace("f32[1,seq,512]", "f32[1,seq,511]"))
    proc = qir("verify", str(broken))
    assert proc.returncode == 1
    assert "result-type" in proc.stderr and "linear" in proc.stderr


def test_malformed_file_gives_location_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qir"
    bad.write_text("module @m\n\nfunc @main(%x: f32[2]) -> (f32[2]) {\n  %y = add %x %x : f32[2]\n  return %y\n}\n")
    before = bad.read_bytes()
    proc = qir("dump", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:4:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert bad.read_bytes() == before


def test_missing_file_and_no_command() -> None:
    proc = qir("dump", "/nonexistent/model.qir")
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert qir().returncode == 2


def test_ops_lists_the_quantized_ops() -> None:
    proc = qir("ops")
    assert proc.returncode == 0
    for name in ("qmatmul", "quantize", "dequantize", "requantize", "qembedding", "attention", "rms_norm"):
        assert any(line.startswith(name + "(") for line in proc.stdout.splitlines()), name


def test_passes_lists_builtin_and_user_passes(tmp_path: Path) -> None:
    proc = qir("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    names = {row["name"] for row in json.loads(proc.stdout)}
    assert {"dce", "cse", "fold-constants", "fold-qdq"} <= names
    user = tmp_path / "mypass.py"
    user.write_text(USER_PASS)
    proc = qir("passes", "--load-pass", str(user))
    assert proc.returncode == 0, proc.stderr
    assert "count-exp" in proc.stdout and "limit: int = 100" in proc.stdout


USER_PASS = '''\
from qir.passes import function_pass


@function_pass("count-exp")
def count_exp(module, *, limit: int = 100):
    """Refuse modules with more than `limit` exp ops."""
    n = sum(op.opcode == "exp" for f in module.functions.values() for op in f.ops)
    assert n <= limit, f"{n} exp ops"
'''


def test_dump_with_pipeline_and_instruments(demo_dir: Path, tmp_path: Path) -> None:
    user = tmp_path / "mypass.py"
    user.write_text(USER_PASS)
    dump = tmp_path / "steps"
    proc = qir("dump", str(demo_dir / "tiny-w8a8.qir"), "--load-pass", str(user), "-p", "count-exp,cse,dce",
               "--print-changed", "--timing", "--dump-dir", str(dump))
    assert proc.returncode == 0, proc.stderr
    # q, k and v quantize the same activation: cse merges the three quantize ops into one.
    assert "// -----// cse changed the IR" in proc.stdout
    assert "-  %k.xq = quantize %attn_in" in proc.stdout
    assert "// pass timing" in proc.stdout
    assert sorted(p.name for p in dump.iterdir()) == ["00-input.qir", "01-count-exp.qir", "02-cse.qir", "03-dce.qir"]
    bad = qir("dump", str(demo_dir / "tiny-w8a8.qir"), "-p", "cse,dcee")
    assert bad.returncode == 2 and "did you mean dce" in bad.stderr and "Traceback" not in bad.stderr


def test_quantize_command_writes_a_valid_module(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w8.qir"
    proc = qir("quantize", str(demo_dir / "tiny-f32.qir"), "-p", "quantize{scheme=w8a16},dce", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "qmatmul" in text and " linear " not in text
    assert qir("verify", str(out)).returncode == 0
    failing = qir("quantize", str(demo_dir / "tiny-f32.qir"), "-p", "quantize{scheme=w8a8,act=static}",
                  "-o", str(tmp_path / "x.qir"))
    assert failing.returncode == 2 and "calibrat" in failing.stderr
    assert not (tmp_path / "x.qir").exists()
