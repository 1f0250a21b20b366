"""``tvm-cuda`` / ``tvm-cuda-sm90``: the generated kernels are compiled by nvcc for the target's SM architecture.

Compile-only (no GPU needed): the artifact's ``kernels.<arch>.cubin`` is read back and its ELF header must name
the requested SM (80 for ``tvm-cuda``, 90 for the Hopper variant reached from the CLI as ``--target tvm-cuda-sm90``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from test_backend_tvm import _w8a8_module  # noqa: E402

import qir  # noqa: E402
from qir.backends.compile import compile_module  # noqa: E402
from qir.backends.target import load_target  # noqa: E402
from qir.backends.tvm.compile import compile_tvm  # noqa: E402
from qir.backends.tvm.cuda_nvcc import NvccError, compile_cubin, cubin_sm, sm_number  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")


def _cubin_arch(folder: Path) -> tuple[dict, int]:
    report = json.loads((folder / "report.json").read_text())
    cuda = report["cuda"]
    return cuda, cubin_sm((folder / cuda["file"]).read_bytes())


@needs_nvcc
def test_tvm_cuda_sm90_variant_compiles_for_sm90_and_default_for_sm80(tmp_path: Path) -> None:
    res = compile_module(_w8a8_module(), "tvm-cuda-sm90", tmp_path / "h100")
    cuda, sm = _cubin_arch(res.out_dir)
    assert (cuda["arch"], cuda["sm"], sm) == ("sm_90", 90, 90)
    resolved = json.loads((tmp_path / "h100" / "target.json").read_text())["tvm"]["resolved"]
    assert "sm_90" in resolved
    compile_tvm(_w8a8_module(), load_target("tvm-cuda"), tmp_path / "a100")
    cuda, sm = _cubin_arch(tmp_path / "a100")
    assert (cuda["arch"], sm) == ("sm_80", 80)
    compile_tvm(_w8a8_module(), load_target("tvm-cuda"), tmp_path / "a100-90", arch="sm_90")
    assert _cubin_arch(tmp_path / "a100-90")[1] == 90


@needs_nvcc
def test_cli_compile_tvm_cuda_sm90(tmp_path: Path) -> None:
    from qir.tools.cli import main

    src = tmp_path / "mlp.qir"
    qir.serialize.save(_w8a8_module(), src)
    out = tmp_path / "art"
    assert main(["compile", str(src), "--target", "tvm-cuda-sm90", "--preset", "float", "-o", str(out)]) == 0
    assert _cubin_arch(out)[1] == 90


@needs_nvcc
def test_nvcc_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(NvccError, match="could not compile the generated CUDA kernels for sm_90"):
        compile_cubin("this is not CUDA", "sm_90", tmp_path / "x.cubin")
    with pytest.raises(NvccError, match="sm_NN"):
        sm_number("hopper")
    with pytest.raises(NvccError, match="not a CUDA cubin"):
        cubin_sm(b"\x7fELF" + bytes(60))
