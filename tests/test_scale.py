"""Weight-only quantization streams: its memory does not grow with the model (the 7B run is bench/scale_7b.py).

A LLaMA-shaped bf16 model of 0.08 B parameters (166 MB) is generated with ``bench/scale_7b.py``'s builder and
saved (weights generated one at a time); ``qir quantize -p quantize{scheme=w8a16}`` then runs in a child
process with streaming forced on (at this size it would otherwise keep the codes in memory, which is cheap
here), and its peak RSS (``wait4``) is compared with the same command on a model 100x smaller: the
difference must stay under a quarter of the model's bytes. Holding the codes alone would take half of them,
and holding float copies of the weights twice them. The streamed result must equal the unstreamed one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qir

_spec = importlib.util.spec_from_file_location("scale_7b", Path(__file__).parents[1] / "bench" / "scale_7b.py")
assert _spec is not None and _spec.loader is not None
scale_7b = importlib.util.module_from_spec(_spec)
sys.modules["scale_7b"] = scale_7b  # dataclasses look their module up there
_spec.loader.exec_module(scale_7b)

STREAMED = ("import sys; import qir.passes.quantize as q; q.STREAM_ELEMENTS = 0; "
            "from qir.tools.cli import main; sys.exit(main(sys.argv[1:]))")


def _quantize(model: Path, out: Path, *, stream: bool) -> float:
    """Run ``qir quantize`` on ``model`` in a child process; its peak RSS in MB."""
    head = [sys.executable, "-c", STREAMED] if stream else [sys.executable, "-m", "qir"]
    proc = subprocess.Popen([*head, "quantize", str(model), "-p", "quantize{scheme=w8a16}", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err.decode(errors="replace")[-3000:]
    return usage.ru_maxrss / 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_quantize_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    big = scale_7b.Shape(layers=4, hidden=1024, heads=8, kv_heads=8, ffn=2816, vocab=16000)
    small = scale_7b.Shape(layers=1, hidden=128, heads=2, kv_heads=2, ffn=256, vocab=512)
    sizes = {}
    for name, shape in (("big", big), ("small", small)):
        m = scale_7b.build(shape)
        qir.save(m, tmp_path / f"{name}.qir")
        sizes[name] = (tmp_path / f"{name}.safetensors").stat().st_size
    assert sizes["big"] > 100 * sizes["small"] and sizes["big"] > 150e6
    base = _quantize(tmp_path / "small.qir", tmp_path / "small-q.qir", stream=True)
    peak = _quantize(tmp_path / "big.qir", tmp_path / "big-q.qir", stream=True)
    model_mb = sizes["big"] / 2**20
    assert peak - base < model_mb / 4, (peak, base, model_mb)
    # Streaming changes when the codes are computed, not what they are.
    _quantize(tmp_path / "big.qir", tmp_path / "ref.qir", stream=False)
    assert _sha(tmp_path / "big-q.qir") == _sha(tmp_path / "ref.qir")
    assert _sha(tmp_path / "big-q.safetensors") == _sha(tmp_path / "ref.safetensors")
