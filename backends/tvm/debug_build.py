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
kernels, and refuses if the Relax module's hash differs from the recorded one (another qir or TVM version would
debug something other than the artifact). For a list of value names (:meth:`DebugBuild.stream`) it cuts the
function's dataflow block into pieces of ``chunk`` wanted bindings each; piece ``k`` is a Relax function that
takes the weights, the inputs and the earlier bindings it reads, and returns its wanted bindings plus those later
pieces read. All pieces are compiled in one module (one compile, cached) and run one after the other, so memory
holds one chunk plus the values that cross a cut (the residual stream), never every intermediate.

Returning a binding makes it a fusion-group output, so the tensors are the ones the artifact's kernels compute;
fusion may split differently around them, which can move float results by rounding (on MiniLM the final outputs
came out bit-identical to ``model.so``'s) but never integer codes computed from equal inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

    if t.quant is not None and data.ndim == 4 and t.rank == 2:
        # int8 weights prepacked into the dot-product kernel's tiles (kernels.qmatmul_vnni.pack_weight):
        # Wp[o, q, i, j] = w[o * lanes + i, 4 q + j], rows past N zero -- undo it instead of storing the codes twice.
        nbp, kq, lanes, four = data.shape
        data = data.transpose(0, 2, 1, 3).reshape(nbp * lanes, kq * four)[: int(t.shape[0])]
    elif t.quant is not None:
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
        if held is not None and (held.shape[:-1] == data.shape[:-1] or held.ndim == 4):
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
        info["extra_bytes"] = (folder / EXTRA_PARAMS).stat().st_size
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


@dataclass(frozen=True)
class _Piece:
    """One compiled piece of a debug build: its Relax function, what it returns, what it reads from before."""

    name: str
    wanted: list[str]     # qir names of the bindings handed to the sink, first in the output tuple
    reads: list[str]      # Relax names of earlier pieces' bindings, passed after the function's parameters
    keeps: list[str]      # Relax names of bindings later pieces read, after ``wanted`` in the output tuple
    last_read: list[str]  # Relax names no later piece reads: dropped after this piece


@dataclass
class _Plan:
    function: str
    pieces: list[_Piece] = field(default_factory=list)
    mod: Any = None


class DebugBuild:
    """Rebuilds a TVM artifact's Relax module and runs it in pieces that return chosen bindings by qir name."""

    def __init__(self, folder: str | Path) -> None:
        import tvm

        from qir.backends.target import load_target

        self.folder = Path(folder)
        self.report: dict[str, Any] = json.loads((self.folder / "report.json").read_text())
        self.info = _debug_info(self.folder)
        self.target = tvm.target.Target(self.info["target"])
        if self.target.kind.name != "llvm" or load_target(self.folder / "target.json").tvm_options().get("cc"):
            raise DebugBuildError(f"{folder}: a {self.report.get('target')} artifact ({self.target.kind.name}) runs "
                                  "on another device; qir debug runs TVM artifacts built for this CPU (tvm-llvm)")
        self.module = artifact_module(self.folder, self.info)
        self._lowered: Any = None
        self._params: dict[str, Any] | None = None
        self._executables: dict[tuple[str, tuple[str, ...], int], tuple[_Plan, Any]] = {}
        self.compiles = 0  # debug modules compiled so far (one per distinct list of names and chunk)

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
            lw.params = {}  # the weights run from the artifact's own params.safetensors (_param_tensors)
            self._lowered = lw
        return self._lowered

    def _param_tensors(self, fname: str) -> list[Any]:
        import tvm
        from safetensors.numpy import load_file

        from qir.backends.tvm.compile import PARAMS

        if self._params is None:
            self._params = {k: tvm.runtime.tensor(v) for k, v in load_file(str(self.folder / PARAMS)).items()}
        return [self._params[p] for p in self.report["functions"][fname]["params"]]

    def _segments(self, fname: str, names: Sequence[str], chunk: int) -> _Plan:
        """Cut the function's bindings after every ``chunk``-th wanted one; one Relax function per piece.

        Piece ``k`` takes the function's parameters plus the bindings of earlier pieces that it reads (as new
        parameters, re-bound to their old variables first, so no expression is rewritten) and returns its wanted
        bindings, then the ones later pieces read. All pieces go into one module: one compile however many chunks.
        """
        import tvm
        from tvm import relax
        from tvm.relax.utils import copy_with_new_vars

        lw = self.lowered
        gv = lw.mod.get_global_var(fname)
        func = lw.mod[gv]
        blocks = list(func.body.blocks)
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            raise DebugBuildError(f"@{fname}: expected one dataflow block in the lowered function, got "
                                  f"{[type(b).__name__ for b in blocks]}")
        bindings = list(blocks[0].bindings)
        index = {b.var.name: i for i, b in enumerate(bindings)}
        relax_names = lw.names[fname]
        positions = []
        for n in names:
            i = index.get(relax_names.get(n, ""))
            if i is None:
                raise DebugBuildError(f"@{fname}: {n!r} is not a binding of the lowered function")
            positions.append(i)
        order = sorted(range(len(names)), key=lambda j: positions[j])
        cuts: list[tuple[int, int, list[str]]] = []  # (first binding, end, wanted names) per piece
        begin = 0
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            end = positions[part[-1]] + 1
            cuts.append((begin, end, [names[j] for j in part]))
            begin = end
        piece_of = [0] * len(bindings)
        for k, (b0, b1, _) in enumerate(cuts):
            for i in range(b0, b1):
                piece_of[i] = k
        reads: list[list[Any]] = [[] for _ in cuts]  # per piece: earlier pieces' variables it reads
        read_by: dict[str, int] = {}  # variable name -> last piece reading it
        for k, (b0, b1, _) in enumerate(cuts):
            seen: set[str] = set()
            for i in range(b0, b1):
                for v in relax.analysis.free_vars(bindings[i].value):
                    j = index.get(v.name)
                    if j is not None and j < b0 and v.name not in seen and v.same_as(bindings[j].var):
                        seen.add(v.name)
                        reads[k].append(v)
                        read_by[v.name] = max(read_by.get(v.name, k), k)
        module_funcs = {g: f for g, f in lw.mod.functions.items() if not isinstance(f, relax.Function)}
        plan = _Plan(fname, [])
        for k, (b0, b1, wanted) in enumerate(cuts):
            keep = [bindings[i].var for i in range(b0, b1) if read_by.get(bindings[i].var.name, -1) > k]
            outs = [bindings[index[relax_names[n]]].var for n in wanted] + keep
            out = relax.Var("qir_debug_outputs", relax.TupleType([v.ty for v in outs]))
            params = [relax.Var(v.name, v.ty) for v in reads[k]]
            body = ([relax.VarBinding(v, p) for v, p in zip(reads[k], params)] + bindings[b0:b1]
                    + [relax.VarBinding(out, relax.Tuple(outs))])
            name = f"{fname}__debug{k}"
            piece = relax.Function(list(func.params) + params, relax.SeqExpr([relax.DataflowBlock(body)], out),
                                   ret_ty=out.ty, is_pure=func.is_pure, attrs=func.attrs)
            piece = copy_with_new_vars(piece.with_attr("global_symbol", name))
            module_funcs[relax.GlobalVar(name)] = piece
            plan.pieces.append(_Piece(name, wanted, [v.name for v in reads[k]], [v.name for v in keep],
                                      [n for n, last in read_by.items() if last == k]))
        plan.mod = tvm.IRModule(module_funcs, attrs=lw.mod.attrs)
        return plan

    def stream(self, fname: str, feed: dict[str, np.ndarray], names: Sequence[str],
               sink: Callable[[str, np.ndarray], None], *, chunk: int = 64) -> None:
        """Run ``fname`` on ``feed``; ``sink(name, array)`` for each of ``names`` (``chunk`` at a time).

        Between pieces only the bindings later pieces read stay alive (as TVM tensors); the module with every
        piece is compiled once per (``names``, ``chunk``) and kept.
        """
        import tvm
        from tvm import relax

        from qir.backends.tvm.schedule import pipeline

        if not names:
            return
        key = (fname, tuple(names), int(chunk))
        built = self._executables.get(key)
        if built is None:
            plan = self._segments(fname, names, max(1, int(chunk)))
            ex = tvm.compile(plan.mod, target=self.target, relax_pipeline=pipeline(self.target))
            plan.mod = None  # the executable is all that is needed from here on
            built = (plan, ex)
            self._executables[key] = built
            self.compiles += 1
        plan, ex = built
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in self.report["functions"][fname]["inputs"]]
        args += self._param_tensors(fname)
        live: dict[str, Any] = {}
        for piece in plan.pieces:
            out = vm[piece.name](*args, *[live[n] for n in piece.reads])
            for i, n in enumerate(piece.wanted):
                sink(n, out[i].numpy())
            for i, n in enumerate(piece.keeps):
                live[n] = out[len(piece.wanted) + i]
            del out
            for n in piece.last_read:
                live.pop(n, None)
