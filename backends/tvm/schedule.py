"""Default schedules for the TensorIR functions of a lowered module, and the Relax pipeline that applies them.

apache-tvm 0.27's default CPU pipeline schedules nothing (every PrimFunc runs as scalar loops on one thread).
Functions that come from ``qir.backends.tvm.kernels`` are already scheduled (``tirx.is_scheduled``) and are
left alone. For the rest:

* CPU (``llvm``): DLight's CPU rules (``GEMV``, ``Reduction``) where they match, else :class:`GenericCPU`:
  the spatial loops outside any reduction are fused and run ``parallel``; a spatial loop is moved innermost
  (under the reduction, after ``decompose_reduction``) and ``vectorize``\\ d in chunks of the target's
  vector width. Each step is tried on its own: a step TensorIR refuses leaves the function as it was.
* CUDA: DLight's GPU rules (Matmul, GEMV, LowBatchGEMV, Reduction, GeneralReduction, RMSNorm, Fallback), so
  every function gets thread bindings and code generation succeeds. ``Matmul`` is skipped for int8/f16 functions
  (:class:`NoTensorize`: its tensor-core path crashes in ``Schedule.tensorize`` with this TVM build).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenericCPU", "mark_noalias", "pipeline", "schedule_passes"]


def _rule_base() -> Any:
    from tvm.s_tir.dlight.base import ScheduleRule

    return ScheduleRule


class GenericCPU(_rule_base()):  # type: ignore[misc]
    """Parallel outer loops + vectorized inner spatial loop for any PrimFunc (see the module docstring)."""

    def __init__(self, lanes: int = 16) -> None:
        self.lanes = lanes

    def apply(self, func: Any, target: Any, _: bool) -> Any:
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            root = sch.get_sblock("root")
            blocks = sch.get_child_blocks(root)
        except Exception:  # noqa: BLE001 - a function without a root block: leave it
            return None
        # Inline elementwise producers into their consumers where TensorIR allows it (fewer passes over memory).
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - not inlinable (a reduction, several consumers ...)
                pass
        for b in sch.get_child_blocks(root):
            self._schedule_block(sch, b)
        return sch

    def _schedule_block(self, sch: Any, block: Any) -> None:
        from tvm import tirx

        loops = sch.get_loops(block)
        if not loops:
            return
        node = sch.get(block)
        kinds = [iv.iter_type for iv in node.iter_vars]
        if len(kinds) != len(loops):
            return
        spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
        reduce_ = [lp for lp, k in zip(loops, kinds) if k != tirx.IterVar.DataPar]
        if reduce_ and any(kinds[i] == tirx.IterVar.DataPar for i in range(len(kinds))
                           if i > kinds.index(next(k for k in kinds if k != tirx.IterVar.DataPar))):
            return  # spatial loops interleaved with reductions: leave it
        inner = spatial[-1] if spatial else None
        vec = None
        if inner is not None and self._static(sch, inner) and len(spatial) >= 1:
            ext = self._static(sch, inner)
            if ext is not None and ext >= 4:
                factor = self.lanes if ext % self.lanes == 0 else (8 if ext % 8 == 0 else (4 if ext % 4 == 0 else 0))
                if factor:
                    try:
                        outer_i, vec = sch.split(inner, factors=[None, factor])
                        spatial = spatial[:-1] + [outer_i]
                    except Exception:  # noqa: BLE001
                        vec = None
        if reduce_ and vec is not None:
            try:
                sch.reorder(*spatial, *reduce_, vec)
            except Exception:  # noqa: BLE001
                return
        outer = spatial
        if len(outer) > 1:
            try:
                fused = sch.fuse(*outer)
                outer = [fused]
            except Exception:  # noqa: BLE001
                outer = outer[:1]
        if outer:
            try:
                sch.parallel(outer[0])
            except Exception:  # noqa: BLE001
                pass
        if vec is None:
            return
        if reduce_:
            try:
                init = sch.decompose_reduction(block, reduce_[0])
                sch.vectorize(sch.get_loops(init)[-1])
            except Exception:  # noqa: BLE001
                return
        try:
            sch.vectorize(vec)
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _static(sch: Any, loop: Any) -> int | None:
        from tvm import tirx

        ext = sch.get(loop).extent
        return int(ext.value) if isinstance(ext, tirx.IntImm) else None


class Guarded(_rule_base()):  # type: ignore[misc]
    """A DLight rule whose analysis failures (DLight asserts on shapes it does not expect) mean "no match"."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - e.g. dlight.analysis.gemv's `assert r_loops`; the next rule tries
            return None


class NoTensorize(Guarded):
    """DLight's GPU ``Matmul`` only for functions without int8/f16 buffers: for those it tensorizes (MMA), and
    ``Schedule.tensorize`` segfaults in this apache-tvm-ffi (``ffi::ToJSONGraph``); they get GEMV/Fallback."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        text = func.script()  # 0.27's PrimFunc exposes no buffer map to Python; its text names every dtype
        if any(f'"{dt}"' in text for dt in ("int8", "uint8", "float16", "bfloat16")):
            return None
        return super().apply(func, target, tunable)


def schedule_passes(target: Any) -> list[Any]:
    """The scheduling passes for ``target`` (a ``tvm.target.Target``)."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        rules = [NoTensorize(dl.gpu.Matmul()), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.RMSNorm(),
                 dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        rules = [dl.cpu.GEMV(), dl.cpu.Reduction(), GenericCPU()]
    return [dl.ApplyDefaultSchedule(*[r if isinstance(r, Guarded) else Guarded(r) for r in rules])]


def mark_noalias() -> Any:
    """A module pass: ``tirx.noalias`` on the VM's shape functions (``tirx.is_host_func``), which lack it.

    Why it matters: TVM's LLVM code generator gives each kernel a separate compute function with ``noalias``
    buffer arguments only when EVERY PrimFunc of the module carries ``tirx.noalias``. One function without it (the
    shape function Relax adds for dynamic shapes) turns it off for all of them, and then LLVM cannot keep a GEMM's
    register tile in registers: it stores the 16 accumulators back to memory after every FMA (SmolLM2's
    512 x 1536 x 576 GEMM: 11 ms inside the model against 4.3 ms alone). A shape function's only buffer is the
    VM's shape heap, so nothing can alias; every other PrimFunc qir emits already has the attribute.
    """
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
    def _mark(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if (isinstance(func, tirx.PrimFunc) and "tirx.noalias" not in func.attrs
                    and func.attrs.get("tirx.is_host_func", False)):
                mod[gv] = func.with_attr("tirx.noalias", True)
        return mod

    return _mark


def pipeline(target: Any) -> Any:
    """The Relax pipeline: legalize + fuse, schedule (above), then TVM's own lowering and finalization passes."""
    import tvm
    from tvm import relax

    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as base
    else:
        from tvm.relax.backend.cpu_generic import pipeline as base  # type: ignore[no-redef]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            # DeadCodeElimination first: the lowering leaves bindings no output needs (head transposes that the
            # fused attention kernel reads through), and nothing later removes them.
            seq = tvm.transform.Sequential(
                [relax.transform.DeadCodeElimination()]
                + base.library_dispatch_passes(target) + base.legalize_passes(target)[:5]
                + schedule_passes(target)
                + base.dataflow_lower_passes(target) + base.finalize_passes(target) + [mark_noalias()])
            return seq(mod)

    return _pipeline
