"""Compile a TVM CUDA build's kernels with ``nvcc`` for the target's SM architecture, at ``qir compile`` time.

apache-tvm 0.27's ``target.build.cuda`` never calls ``tvm_callback_cuda_compile``: the CUDA module it returns
holds the generated CUDA C source (format ``cuda``), which the TVM runtime compiles with NVRTC when the library is
loaded on a GPU machine. So without this step no compiler ever sees the code before a GPU does, and ``arch``
(``sm_80``/``sm_90``) would only be a label. Here the generated source is compiled with the installed ``nvcc``
(``-cubin -arch=sm_XX``): an error in the generated code, or an architecture the toolkit cannot target, stops the
compile, and the artifact carries the SASS (``kernels.<arch>.cubin``) with its architecture checked from the cubin
itself (:func:`cubin_sm`), the evidence a compile-only test can assert on.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qir.errors import QirError

EM_CUDA = 190  # ELF e_machine of NVIDIA GPU code


class NvccError(QirError):
    """nvcc is missing or rejected the generated CUDA code."""


def cuda_source(executable: Any) -> str:
    """The CUDA C source of every kernel of a Relax VM executable built for a CUDA target ("" if none)."""
    parts: list[str] = []

    def walk(mod: Any) -> None:
        if mod.kind == "cuda":
            parts.append(mod.inspect_source("cuda"))
        for sub in mod.imports:
            walk(sub)

    walk(executable.mod)
    return "\n".join(parts)


def sm_number(arch: str) -> int:
    """``"sm_90"`` -> 90 (``sm_90a`` too); a :class:`NvccError` for anything else."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if m is None:
        raise NvccError(f"CUDA arch {arch!r} is not of the form sm_NN (e.g. sm_80, sm_90)")
    return int(m.group(1))


def cubin_sm(data: bytes) -> int:
    """The SM architecture a cubin was compiled for, read from its ELF header.

    nvcc's cubins are ELF files with ``e_machine = EM_CUDA``; the SM number sits in bits 8..15 of ``e_flags``
    for the ELF ABI nvcc 12/13 write (byte 7, EI_ABIVERSION, >= 0x40) and in bits 0..7 for the older one.
    """
    if data[:4] != b"\x7fELF" or struct.unpack_from("<H", data, 18)[0] != EM_CUDA:
        raise NvccError("not a CUDA cubin (no ELF header with e_machine EM_CUDA)")
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[7] >= 0x40 else flags & 0xFF


def compile_cubin(source: str, arch: str, out: Path) -> dict[str, Any]:
    """Compile ``source`` with ``nvcc -cubin -arch=<arch>`` into ``out``; what was built, for the report."""
    sm = sm_number(arch)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise NvccError("tvm-cuda compiles its kernels with nvcc, which is not on PATH: install the CUDA toolkit")
    with tempfile.TemporaryDirectory(prefix="qir-nvcc-") as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(source)
        t0 = time.perf_counter()
        res = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-w", "-o", str(out), str(src)],
                             capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise NvccError(f"nvcc could not compile the generated CUDA kernels for {arch}: {last}")
    got = cubin_sm(out.read_bytes())
    if got != sm:
        raise NvccError(f"nvcc was asked for {arch} but wrote a cubin for sm_{got}")
    return {"arch": arch, "sm": got, "file": out.name, "bytes": out.stat().st_size, "nvcc_seconds": round(seconds, 2)}
