"""TVM artifacts: build a qir module for a ``tvm-*`` target, write the artifact folder, and run it again.

An artifact folder holds::

    model.so            one shared library with every function of the module (``main``, or ``prefill`` and
                        ``decode`` for causal LMs), run by the Relax VM
    params.safetensors  the weights, by Relax parameter name (quantized weights as their codes, int4 packed)
    target.json         the target profile (with the TVM target actually used: ``mcpu`` as detected)
    report.json         bytes, functions (inputs, params, outputs, qir ops), kernels used, compile time

:func:`compile_tvm` is what :func:`qir.backends.compile.compile_module` calls for targets whose runtime is
``"tvm"``; :class:`TvmArtifact` is what :func:`qir.backends.compile.load_artifact` returns for such folders (the
same ``run`` / ``logits_fn`` / ``embed_fn`` as the ONNX artifact). Decode steps can keep their KV cache on the
device between calls with :meth:`TvmArtifact.run_device` (the cache is updated in place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qir.backends.target import Target
from qir.errors import QirError
from qir.graph import Module

__all__ = ["Built", "build", "compile_tvm", "tvm_target", "TvmArtifact", "LIBRARY", "PARAMS"]

LIBRARY = "model.so"
PARAMS = "params.safetensors"


def _error(msg: str) -> QirError:
    from qir.backends.compile import CompileError

    return CompileError(msg)


def tvm_target(target: Target, *, arch: str | None = None) -> Any:
    """The ``tvm.target.Target`` of a TVM target profile (``mcpu: "host"`` -> this machine's CPU)."""
    import tvm

    opts = target.tvm_options()
    if "target" not in opts:
        raise _error(f"target {target.name} has no \"tvm\": {{\"target\": ...}} section")
    cfg = dict(opts["target"])
    if cfg.get("mcpu") == "host":
        cfg["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    if arch is not None:
        if cfg.get("kind") != "cuda":
            raise _error(f"arch={arch} applies to CUDA targets, not {target.name}")
        allowed = opts.get("arches") or [cfg.get("arch")]
        if arch not in allowed:
            raise _error(f"{target.name} supports arch {', '.join(allowed)}, not {arch}")
        cfg["arch"] = arch
    if "host" in opts:
        host = dict(opts["host"])
        if host.get("mcpu") == "host":
            host["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        return tvm.target.Target(cfg, host=host)
    return tvm.target.Target(cfg)


@dataclass
class Built:
    """A lowered and compiled module: the Relax VM executable, the lowering's facts, timings in seconds."""

    executable: Any
    lowered: Any
    target: Any
    seconds: dict[str, float]

    def run(self, inputs: Sequence[np.ndarray], *, function: str | None = None) -> list[np.ndarray]:
        """Run a function in this process (CPU targets), without writing an artifact: for tests and tools."""
        import tvm
        from tvm import relax

        fname = function or next(iter(self.lowered.signatures))
        sig = self.lowered.signatures[fname]
        vm = relax.VirtualMachine(self.executable, tvm.cpu())
        args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
        args += [tvm.runtime.tensor(self.lowered.params[p]) for p in sig["params"]]
        out = vm[fname](*args)
        return [out[i].numpy() for i in range(len(sig["outputs"]))]


def build(module: Module, target: Target | Any, *, use_kernels: bool = True, arch: str | None = None) -> Built:
    """Lower every function of ``module`` and compile it for ``target`` (a qir TVM target or a TVM target)."""
    import tvm

    from qir.backends.tvm.lower import LowerError, lower_module
    from qir.backends.tvm.schedule import pipeline

    tgt = tvm_target(target, arch=arch) if isinstance(target, Target) else target
    t0 = time.perf_counter()
    try:
        lowered = lower_module(module, target=tgt, use_kernels=use_kernels)
    except LowerError as exc:
        raise _error(str(exc)) from None
    t1 = time.perf_counter()
    try:
        ex = tvm.compile(lowered.mod, target=tgt, relax_pipeline=pipeline(tgt))
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types; say which stage failed
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise _error(f"TVM could not compile @{module.name} for {tgt.kind.name}: {last}") from exc
    t2 = time.perf_counter()
    return Built(ex, lowered, tgt, {"lower": t1 - t0, "compile": t2 - t1})


def _set_cpu_threads(threads: int | None) -> None:
    """Size TVM's CPU thread pool: ``threads``, else ``TVM_NUM_THREADS`` if set, else every CPU this process may use.

    Why not TVM's default: without ``TVM_NUM_THREADS`` it assumes two hardware threads per core and takes half the
    CPUs, one thread on a 2-CPU machine (SmolLM2's float prefill: 1.8 s instead of 0.9 s); and
    ``runtime.config_threadpool`` cannot raise that count afterwards. The pool reads the variable when it starts,
    at the first parallel kernel, so this works as long as no TVM kernel has run in the process yet.
    """
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else (os.cpu_count() or 1)))


def _export(built: Built, path: Path, cc: str | None) -> None:
    if cc:
        from tvm.support import cc as tvm_cc

        if shutil.which(cc) is None:
            raise _error(f"exporting for {built.target.kind.name} needs the cross compiler {cc}, which is not "
                         "installed (apt-get install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu "
                         "libc6-dev-arm64-cross)")
        built.executable.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
    else:
        built.executable.export_library(str(path))


def _save_params(params: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path))


def _dims(t: Any) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in t.shape]


def _notes(lowered: Any) -> list[str]:
    if not lowered.folded:
        return []
    return [f"{len(lowered.folded)} quantized parameter constants that the kernels cannot read as stored (three "
            "levels of scales, or a quantized zero point) are folded at compile time to one f32 (i32 for zero "
            "points) per block in params.safetensors (folded_params); the weight codes stay packed"]


def compile_tvm(module: Module, target: Target, out_dir: str | os.PathLike[str], *,
                meta: dict[str, Any] | None = None, arch: str | None = None, use_kernels: bool | None = None,
                finish: Callable[[Path, dict[str, Any]], None] | None = None) -> Any:
    """Build ``module`` for the TVM ``target`` and write the artifact folder ``out_dir`` atomically.

    ``use_kernels``: use the scheduled kernels of ``qir.backends.tvm.kernels``; ``None`` takes the target file's
    ``"tvm": {"kernels": ...}`` (default true). ``finish(folder, report)``: as for
    :func:`qir.backends.compile.compile_module` (``qir compile`` adds the report's quality and ``report.html``).
    """
    from qir.backends.compile import CompileResult
    from qir.serialize import stored_bytes

    if use_kernels is None:
        use_kernels = bool(target.tvm_options().get("kernels", True))

    built = build(module, target, use_kernels=use_kernels, arch=arch)
    cc = target.tvm_options().get("cc")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        _export(built, tmp / LIBRARY, cc)
        built.seconds["export"] = time.perf_counter() - t0
        cuda = None
        if built.target.kind.name == "cuda":  # TVM leaves the kernels as source: nvcc compiles them for the arch
            from qir.backends.tvm.cuda_nvcc import compile_cubin, cuda_source

            arch = str(built.target.attrs["arch"])
            cuda = compile_cubin(cuda_source(built.executable), arch, tmp / f"kernels.{arch}.cubin")
            built.seconds["nvcc"] = cuda["nvcc_seconds"]
        _save_params(built.lowered.params, tmp / PARAMS)
        # What `qir debug compare` needs to rebuild this Relax module with intermediates as outputs (small).
        from qir.backends.tvm.debug_build import write_debug_inputs

        debug = write_debug_inputs(module, built.lowered, built.target, use_kernels, tmp)
        lw = built.lowered
        funcs: dict[str, Any] = {}
        for fname, sig in lw.signatures.items():
            f = module.function(fname)
            funcs[fname] = {
                "file": LIBRARY, "inputs": sig["inputs"], "params": sig["params"], "outputs": sig["outputs"],
                "input_types": {v.name: {"dtype": v.type.dtype.name, "shape": _dims(v.type)} for v in f.inputs},
                "inplace": {str(k): v for k, v in lw.inplace.get(fname, {}).items()},
                "qir_ops": dict(Counter(op.opcode for op in f.ops).most_common()),
                "names": lw.names.get(fname, {}),
            }
        tgt_json = target.to_json()
        tgt_json["tvm"] = {**tgt_json.get("tvm", {}), "resolved": built.target.export()
                           if hasattr(built.target, "export") else str(built.target)}
        size = sum(f.stat().st_size for f in tmp.iterdir())  # model.so, params and the debugger's module.qir
        report = {
            "module": module.name, "target": target.name, "runtime": "tvm", "bind": {},
            "bytes": size, "library_bytes": (tmp / LIBRARY).stat().st_size,
            "params_bytes": (tmp / PARAMS).stat().st_size, "qir_stored_bytes": stored_bytes(module),
            "functions": funcs, "fallbacks": [], "warnings": [], "notes": _notes(lw),
            "folded_params": dict(sorted(lw.folded.items())),
            "kernels": dict(sorted(lw.kernels.items())),
            "compile_seconds": {k: round(v, 2) for k, v in built.seconds.items()},
            "tvm_target": str(built.target.kind.name), "debug": debug, **({"cuda": cuda} if cuda else {}),
            **(meta or {}),
        }
        (tmp / "target.json").write_text(json.dumps(tgt_json, indent=2, default=str) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if finish is not None:
            finish(tmp, report)
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(out, {f: str(out / LIBRARY) for f in lw.signatures}, report, [])


@dataclass(frozen=True)
class _InputInfo:
    """What ONNX Runtime's ``NodeArg`` offers the shared artifact code: a name and a shape (str = symbolic)."""

    name: str
    shape: list[int | str]


class _Signature:
    def __init__(self, info: dict[str, Any]) -> None:
        self._inputs = [_InputInfo(n, info["input_types"][n]["shape"]) for n in info["inputs"]]

    def get_inputs(self) -> list[_InputInfo]:
        return self._inputs


def _artifact_base() -> type:
    from qir.backends.compile import Artifact

    return Artifact


class TvmArtifact(_artifact_base()):  # type: ignore[misc]
    """A TVM artifact folder opened with the Relax VM (the library and params are loaded on first use)."""

    def __init__(self, out_dir: str | os.PathLike[str], *, threads: int | None = None) -> None:
        super().__init__(out_dir, threads=threads)
        self._vm: Any = None
        self._params: dict[str, Any] | None = None
        self._calls: dict[str, tuple[Any, list[Any]]] = {}  # per function: the VM function and its params
        self._dev: Any = None

    @property
    def runs_elsewhere(self) -> str | None:
        """Why this artifact cannot run on this machine (a cross-compiled library, CUDA without a GPU), or None."""
        import tvm

        if self.report.get("tvm_target", "llvm") == "cuda":
            return None if tvm.cuda(0).exist else "a CUDA artifact needs a GPU, and none is present"
        if self.target.tvm_options().get("cc"):
            return (f"this is a cross-compiled {self.target.name} library; run it on that device with the TVM "
                    "runtime")
        return None

    def load(self) -> None:
        """Load the library and the parameters now (else the first run does)."""
        self._load()

    def _load(self) -> None:
        if self._vm is not None:
            return
        import tvm
        from tvm import relax

        elsewhere = self.runs_elsewhere
        if elsewhere is not None:
            raise _error(f"{self.path}: {elsewhere}")
        dev = tvm.cuda(0) if self.report.get("tvm_target", "llvm") == "cuda" else tvm.cpu(0)
        _set_cpu_threads(self.threads)
        lib = tvm.runtime.load_module(str(self.path / LIBRARY))
        self._vm = relax.VirtualMachine(lib, dev)
        self._dev = dev
        from safetensors.numpy import load_file

        self._params = {k: tvm.runtime.tensor(v, dev) for k, v in load_file(str(self.path / PARAMS)).items()}

    def session(self, function: str | None = None) -> Any:
        fname = function or next(iter(self.report["functions"]))
        if fname not in self.report["functions"]:
            raise _error(f"{self.path}: no function {fname!r} (has {', '.join(self.functions)})")
        return _Signature(self.report["functions"][fname])

    def run_device(self, inputs: Sequence[Any], *, function: str | None = None) -> list[Any]:
        """Run on TVM tensors (or arrays) and return TVM tensors: a decode loop keeps its cache on the device.

        Inputs that a function updates in place (``report.json`` ``functions.<f>.inplace``: output index ->
        input index) come back as the same tensor object, updated.
        """
        import tvm

        self._load()
        fname = function or next(iter(self.report["functions"]))
        info = self.report["functions"][fname]
        if len(inputs) != len(info["inputs"]):
            raise _error(f"@{fname} takes {len(info['inputs'])} inputs {info['inputs']}, got {len(inputs)}")
        assert self._params is not None
        args = [x if isinstance(x, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(x), self._dev)
                for x in inputs]
        # A SmolLM2 step passes ~1500 params: one dict lookup each per step showed in a decode profile.
        if fname not in self._calls:
            self._calls[fname] = (self._vm[fname], [self._params[p] for p in info["params"]])
        fn, pargs = self._calls[fname]
        out = fn(*args, *pargs)
        return [out[i] for i in range(len(info["outputs"]))]

    def run(self, inputs: Sequence[np.ndarray] | dict[str, np.ndarray], *, function: str | None = None
            ) -> list[np.ndarray]:
        """Run a function on numpy inputs (a list in input order or a dict by name); numpy outputs."""
        fname = function or next(iter(self.report["functions"]))
        if fname not in self.report["functions"]:
            raise _error(f"{self.path}: no function {fname!r} (has {', '.join(self.functions)})")
        names = self.report["functions"][fname]["inputs"]
        if isinstance(inputs, dict):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise _error(f"@{fname} takes inputs {names}; missing {missing}")
            inputs = [inputs[n] for n in names]
        return [o.numpy() for o in self.run_device([np.asarray(x) for x in inputs], function=fname)]
