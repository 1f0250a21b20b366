"""Interrupted ``qir quantize`` / ``qir compile``: SIGINT or SIGTERM at several points of writing the output.

A small driver (written to the test folder) runs the real command line in a subprocess with one function
wrapped to announce that the chosen point was reached (a flag file) and then wait; the test sends the signal
and checks that

* the command exits with 130 (interrupted), not a traceback;
* the input files are byte-identical to before;
* the output is either the older one, intact, or the complete new one (byte-identical to an uninterrupted
  run), and when it exists it loads;
* no temporary file or folder is left behind.

Points: ``data`` (half of the ``.safetensors`` written to its temporary file), ``text`` (the ``.qir`` text
written to its temporary file, not renamed), ``commit`` (between the two renames of a save: the signal is
held back until both are done), ``artifact`` (an ONNX file written into the temporary artifact folder) and
``swap`` (between moving the older artifact aside and renaming the new one into place).
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qir

DRIVER = r'''
import os, pathlib, signal, sys, time
# A shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
# restore it, as a terminal user's qir process has it, so the test does not depend on how pytest was started.
signal.signal(signal.SIGINT, signal.default_int_handler)
point, flag = sys.argv[1], pathlib.Path(sys.argv[2])
argv = sys.argv[3:]

def reached(seconds):
    flag.write_text(point)
    time.sleep(seconds)

import qir.safetensors_io as sio
import qir.serialize as ser

if point == "data":
    orig_bytes, calls = sio._stored_bytes, [0]
    def stored_bytes(*a):
        calls[0] += 1
        if calls[0] == 2:  # the header and the first tensor are in the temporary file
            reached(60)
        return orig_bytes(*a)
    sio._stored_bytes = stored_bytes
elif point == "text":
    orig_temp = ser._write_temp
    def write_temp(folder, final_name, write, mode):
        if not final_name.endswith(".qir"):
            return orig_temp(folder, final_name, write, mode)
        def slow(f):
            write(f)
            f.flush()
            reached(60)
        return orig_temp(folder, final_name, slow, mode)
    ser._write_temp = write_temp
elif point == "commit":
    orig_replace, calls = os.replace, [0]
    def replace(a, b):
        orig_replace(a, b)
        calls[0] += 1
        if calls[0] == 1:
            reached(1.0)
    os.replace = replace
elif point == "artifact":
    import qir.backends.compile as comp
    orig_save = comp._save_all
    def save(models, folder):
        out = orig_save(models, folder)
        reached(60)
        return out
    comp._save_all = save
elif point == "swap":
    orig_rename, calls = pathlib.Path.rename, [0]
    def rename(self, target):
        out = orig_rename(self, target)
        calls[0] += 1
        if calls[0] == 1:
            reached(1.0)
        return out
    pathlib.Path.rename = rename

from qir.tools.cli import main
sys.exit(main(argv))
'''


def qir_cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "qir", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The input model, an older output and the complete new output of each command."""
    root = tmp_path_factory.mktemp("atomic")
    src = root / "src"
    qir_cli("demo", "-q", "-o", str(src))
    ref = root / "ref"
    ref.mkdir()
    for name, pipeline in (("old", "quantize{scheme=w4a16,group=32}"), ("new", "quantize{scheme=w8a16}")):
        qir_cli("quantize", str(src / "tiny-f32.qir"), "-p", pipeline, "-o", str(ref / f"{name}.qir"))
    qir_cli("compile", str(src / "tiny-f32.qir"), "--target", "ort-cpu", "-o", str(ref / "old-art"))
    qir_cli("compile", str(src / "tiny-w8a8.qir"), "--target", "ort-cpu", "-o", str(ref / "new-art"))
    (root / "driver.py").write_text(DRIVER)
    return {"root": root, "src": src, "ref": ref, "driver": root / "driver.py"}


def _interrupt(driver: Path, point: str, sig: signal.Signals, argv: list[str], work: Path) -> int:
    flag = work.parent / f"{work.name}.flag"
    proc = subprocess.Popen([sys.executable, str(driver), point, str(flag), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the driver never reached {point!r} (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    return proc.returncode


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


QUANTIZE_CASES = [("data", signal.SIGINT, True), ("data", signal.SIGTERM, False), ("text", signal.SIGTERM, True),
                  ("commit", signal.SIGINT, True), ("commit", signal.SIGTERM, True)]


@pytest.mark.slow
@pytest.mark.parametrize("point, sig, existing", QUANTIZE_CASES,
                         ids=[f"{p}-{s.name}-{'over-old' if e else 'fresh'}" for p, s, e in QUANTIZE_CASES])
def test_interrupted_quantize(setup: dict[str, Path], tmp_path: Path, point: str, sig: signal.Signals,
                              existing: bool) -> None:
    src, ref = setup["src"], setup["ref"]
    inputs = digests(src)
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        for suffix in (".qir", ".safetensors", ".json"):
            shutil.copyfile(ref / f"old{suffix}", out / f"q{suffix}")
    before = digests(out)
    rc = _interrupt(setup["driver"], point, sig,
                    ["quantize", str(src / "tiny-f32.qir"), "-p", "quantize{scheme=w8a16}", "-o", str(out / "q.qir")],
                    out)
    assert rc == 130
    assert digests(src) == inputs, "the input changed"
    assert _leftovers(out) == [], "temporary files were left behind"
    now = {k: v for k, v in digests(out).items() if not k.endswith(".json")}
    old = {k: v for k, v in before.items() if not k.endswith(".json")}
    new = {f"q{s}": hashlib.sha256((ref / f"new{s}").read_bytes()).hexdigest() for s in (".qir", ".safetensors")}
    assert now in (old, new), now
    if point == "commit":
        assert now == new  # the signal waited for the commit
    if now:
        text = qir.print_module(qir.load(out / "q.qir"))
        assert text == qir.print_module(qir.load(ref / ("new.qir" if now == new else "old.qir")))


COMPILE_CASES = [("artifact", signal.SIGINT), ("artifact", signal.SIGTERM), ("swap", signal.SIGTERM)]


@pytest.mark.slow
@pytest.mark.parametrize("point, sig", COMPILE_CASES, ids=[f"{p}-{s.name}" for p, s in COMPILE_CASES])
def test_interrupted_compile(setup: dict[str, Path], tmp_path: Path, point: str, sig: signal.Signals) -> None:
    src, ref = setup["src"], setup["ref"]
    inputs = digests(src)
    art = tmp_path / "art"
    shutil.copytree(ref / "old-art", art)
    old = digests(art)
    rc = _interrupt(setup["driver"], point, sig,
                    ["compile", str(src / "tiny-w8a8.qir"), "--target", "ort-cpu", "-o", str(art)], art)
    assert rc == 130
    assert digests(src) == inputs, "the input changed"
    assert [p for p in _leftovers(tmp_path) if p != "art.flag"] == [], "temporary folders were left behind"
    now = digests(art)
    assert now in (old, digests(ref / "new-art")), now
    if point == "swap":
        assert now == digests(ref / "new-art")  # the signal waited for the swap
