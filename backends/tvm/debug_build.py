"""Debug builds of a TVM artifact: the same Relax module, recompiled to return chosen intermediate tensors.

The compiled ``model.so`` fuses ops, so its intermediate tensors cannot be read. What the artifact computes is
``lower_module(module)`` compiled for its target; :func:`write_debug_inputs` (called by ``compile_tvm``) keeps
what it takes to rebuild exactly that:

* ``module.qir`` -- the module's text without weights (``blob`` constants; constants of at most 16 elements are
  inline in the text);
* the weights are already in ``params.safetensors`` under the Relax parameter name of each constant (quantized
  weights as their codes, sub-byte codes packed by row); a constant the lowering read but that ``params`` does
  not hold verbatim goes to ``qir_extra.safetensors`` (empty for every preset today; none is written then);
* ``report.json`` ``debug``: the TVM target string actually used (``mcpu`` as detected then), whether the
  scheduled kernels were used, and the structural hash of the Relax module.

:class:`DebugBuild` reads the module back (:func:`artifact_module`), lowers it again with the same target and
kernels, refuses if the Relax module's hash differs from the recorded one (another qir or TVM version would
debug something other than the artifact), and for a list of value names compiles a copy of the function whose
dataflow block ends by returning those bindings (:meth:`DebugBuild.fetch`). Returning a binding makes it a
fusion-group output, so the tensors are the ones the artifact's kernels compute; fusion may split differently
around them, which can move float results by rounding but never integer codes computed from equal inputs. Each
list of names costs one compile (cached per list), so callers fetch in chunks to bound memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Module
from qir.types import TensorType

__all__ = ["DEBUG_MODULE", "EXTRA_PARAMS", "DebugBuild", "DebugBuildError", "artifact_module", "constants_read",
           "relax_hash", "unpack_rows", "write_debug_inputs"]

DEBUG_MODULE = "module.qir"
EXTRA_PARAMS = "qir_extra.safetensors"


class DebugBuildError(QirError):
    """A TVM artifact cannot be rebuilt for debugging (too old, another version, a cross-compiled target ...)."""


def relax_hash(mod: Any) -> str:
    """The structural hash of a Relax ``IRModule`` (same lowering, same module -> same hash, across processes)."""
    from tvm_ffi.structural import structural_hash

    return str(int(structural_hash(mod)))


def unpack_rows(packed: np.ndarray, bits: int, signed: bool, k: int) -> np.ndarray:
    """The inverse of :func:`qir.backends.tvm.qops.pack_rows`: ``uint8 [..., ceil(K / per)]`` -> codes ``[..., K]``."""
    per = 8 // bits
    p = np.asarray(packed, dtype=np.uint8)
    fields = np.stack([(p >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1)
    codes = fields.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :k].astype(np.int16)
    if signed:
        codes = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return codes.astype(np.int8 if signed else np.uint8)


def _stored(data: np.ndarray, t: TensorType) -> np.ndarray:
    """A Relax parameter's data back as the qir constant's stored elements (codes for quantized constants)."""
    from qir.backends.tvm.lower_quant import layout_of

    if t.quant is not None:
        lay = layout_of(t)
        if lay.packed:
            data = unpack_rows(data, lay.bits, lay.signed, int(t.shape[-1]))  # type: ignore[arg-type]
    return np.ascontiguousarray(data).astype(t.dtype.numpy, copy=False)


def constants_read(module: Module) -> list[str]:
    """Constants any function reads: operands, and the scale/zero-point/offset constants their specs name."""
    seen: dict[str, None] = {}

    def add(name: str) -> None:
        if name in seen:
            return
        seen[name] = None
        c = module.constant(name)
        if c.type.quant is not None:
            for ref in c.type.quant.constant_refs:
                add(ref)

    for f in module.functions.values():
        for op in f.ops:
            for v in op.operands:
                if v.is_constant:
                    add(v.name)
            for r in op.results:
                if r.type.quant is not None:
                    for ref in r.type.quant.constant_refs:
                        add(ref)
    return list(seen)


def write_debug_inputs(module: Module, lowered: Any, target: Any, use_kernels: bool, folder: Path
                       ) -> dict[str, Any]:
    """Write ``module.qir`` (and ``qir_extra.safetensors`` when needed) into ``folder``; the report's ``debug``."""
    from qir.backends.tvm.lower import _sanitize
    from qir.printer import is_inline, print_module

    (folder / DEBUG_MODULE).write_text(print_module(module))
    extra: dict[str, np.ndarray] = {}
    for name in constants_read(module):
        c = module.constant(name)
        if is_inline(c):
            continue
        held = lowered.params.get(_sanitize(name))
        data = np.asarray(c.numpy())
        if held is not None and held.shape[:-1] == data.shape[:-1]:
            back = _stored(held, c.type)
            if back.shape == data.shape and np.array_equal(back, data):
                continue
        extra[name] = np.ascontiguousarray(data)
    info: dict[str, Any] = {"module": DEBUG_MODULE, "target": str(target), "use_kernels": bool(use_kernels),
                            "relax_hash": relax_hash(lowered.mod)}
    if extra:
        from safetensors.numpy import save_file

        save_file(extra, str(folder / EXTRA_PARAMS))
        info["extra_params"] = EXTRA_PARAMS
    return info


def artifact_module(folder: str | Path, info: dict[str, Any] | None = None) -> Module:
    """The qir module a TVM artifact was compiled from: ``module.qir`` with its weights from the artifact's files."""
    from safetensors.numpy import load_file

    from qir.backends.tvm.compile import PARAMS
    from qir.backends.tvm.lower import _sanitize
    from qir.parser import parse

    folder = Path(folder)
    if info is None:
        info = _debug_info(folder)
    text_path = folder / str(info.get("module", DEBUG_MODULE))
    try:
        text = text_path.read_text()
    except OSError as exc:
        raise DebugBuildError(f"{folder}: cannot read {text_path.name} ({exc.strerror or exc})") from None
    module = parse(text, filename=str(text_path))
    params = load_file(str(folder / PARAMS))
    extra = load_file(str(folder / info["extra_params"])) if info.get("extra_params") else {}
    for c in module.constants.values():
        if c.data is not None:
            continue
        if c.name in extra:
            c.data = extra[c.name]
            continue
        held = params.get(_sanitize(c.name))
        if held is not None:
            c.data = _stored(held, c.type)
        # else: a constant no function reads (the lowering never asks for it)
    return module


def _debug_info(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise DebugBuildError(f"{folder}: unreadable report.json ({exc})") from None
    info = report.get("debug")
    if not isinstance(info, dict):
        raise DebugBuildError(f"{folder}: this TVM artifact does not carry its module for debugging (it was "
                              "compiled before qir wrote module.qir into TVM artifacts); compile it again with "
                              "qir compile")
    return info


class DebugBuild:
    """Rebuilds a TVM artifact's Relax module and compiles variants that return chosen bindings by qir name."""

    def __init__(self, folder: str | Path) -> None:
        import tvm

        self.folder = Path(folder)
        self.report: dict[str, Any] = json.loads((self.folder / "report.json").read_text())
        self.info = _debug_info(self.folder)
        from qir.backends.target import load_target

        self.target = tvm.target.Target(self.info["target"])
        if self.target.kind.name != "llvm" or load_target(self.folder / "target.json").tvm_options().get("cc"):
            raise DebugBuildError(f"{folder}: a {self.report.get('target')} artifact ({self.target.kind.name}) runs "
                                  "on another device; qir debug runs TVM artifacts built for this CPU (tvm-llvm)")
        self.module = artifact_module(self.folder, self.info)
        self._lowered: Any = None
        self._params: dict[str, Any] | None = None
        self._executables: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.compiles = 0  # debug variants compiled so far (one per distinct list of names)

    @property
    def lowered(self) -> Any:
        """The Relax module, lowered again; checked against the artifact's hash and name map."""
        if self._lowered is None:
            from qir.backends.tvm.lower import lower_module

            lw = lower_module(self.module, target=self.target, use_kernels=bool(self.info["use_kernels"]))
            if relax_hash(lw.mod) != str(self.info["relax_hash"]):
                raise DebugBuildError(f"{self.folder}: lowering {DEBUG_MODULE} again gives another Relax module than "
                                      "the artifact's (compiled by another qir or TVM version); compile it again "
                                      "with qir compile to debug it")
            for fname, fi in self.report["functions"].items():
                if lw.names.get(fname) != fi.get("names"):
                    raise DebugBuildError(f"{self.folder}: @{fname}: the value names of the rebuilt module differ "
                                          "from report.json's; compile the artifact again")
            self._lowered = lw
        return self._lowered

    def _param_tensors(self, fname: str) -> list[Any]:
        import tvm
        from safetensors.numpy import load_file

        from qir.backends.tvm.compile import PARAMS

        if self._params is None:
            self._params = {k: tvm.runtime.tensor(v) for k, v in load_file(str(self.folder / PARAMS)).items()}
        return [self._params[p] for p in self.report["functions"][fname]["params"]]

    def _debug_module(self, fname: str, names: Sequence[str]) -> Any:
        """The lowered module with only ``fname``, which returns the bindings of ``names`` (a tuple, in order)."""
        import tvm
        from tvm import relax

        lw = self.lowered
        gv = lw.mod.get_global_var(fname)
        func = lw.mod[gv]
        blocks = list(func.body.blocks)
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            raise DebugBuildError(f"@{fname}: expected one dataflow block in the lowered function, got "
                                  f"{[type(b).__name__ for b in blocks]}")
        bound = {b.var.name: b.var for b in blocks[0].bindings}
        relax_names = lw.names[fname]
        wanted = []
        for n in names:
            var = bound.get(relax_names.get(n, ""))
            if var is None:
                raise DebugBuildError(f"@{fname}: {n!r} is not a binding of the lowered function")
            wanted.append(var)
        out = relax.Var("qir_debug_outputs", relax.TupleType([v.ty for v in wanted]))
        block = relax.DataflowBlock(list(blocks[0].bindings) + [relax.VarBinding(out, relax.Tuple(wanted))])
        dbg = relax.Function(func.params, relax.SeqExpr([block], out), ret_ty=out.ty, is_pure=func.is_pure,
                             attrs=func.attrs)
        keep = {g: f for g, f in lw.mod.functions.items() if not isinstance(f, relax.Function)}
        keep[gv] = dbg
        return tvm.IRModule(keep, attrs=lw.mod.attrs)

    def fetch(self, fname: str, feed: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        """Run ``fname`` on ``feed`` and return the tensors of ``names`` (bindings of the lowered function)."""
        import tvm
        from tvm import relax

        from qir.backends.tvm.schedule import pipeline

        key = (fname, tuple(names))
        ex = self._executables.get(key)
        if ex is None:
            ex = tvm.compile(self._debug_module(fname, names), target=self.target,
                             relax_pipeline=pipeline(self.target))
            self._executables[key] = ex
            self.compiles += 1
        vm = relax.VirtualMachine(ex, tvm.cpu())
        inputs = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in self.report["functions"][fname]["inputs"]]
        out = vm[fname](*inputs, *self._param_tensors(fname))
        return [out[i].numpy() for i in range(len(names))]
