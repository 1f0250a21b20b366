"""The ``calibrate`` pass: activation ranges from calibration feeds, stored in the module as constants.

``calibrate{method=minmax|percentile|mse|entropy, percentile=99.99, bins=2048, symmetric=false}``
runs one function (``PassContext.function``; default ``main``, else ``prefill``, else the only
function) on every calibration feed through the reference interpreter, and watches every float
value that is the ``x`` operand of a ``linear``, the ``a`` operand of a ``matmul`` or the float
``x`` operand of a ``qmatmul``, and the results of those ops (static requantization needs them).
Each watched value gets a :class:`~qir.passes.observers.RangeObserver` (bounded memory: exact
min/max, a per-channel |max| vector and two ``bins``-bin streaming histograms; activations are
never stacked). The method picks the clipping range; see :mod:`qir.passes.observers`.

Results live IN THE MODULE, so they print, diff, save and load like everything else::

    const @calib.<func>.<value> : f32[2] = dense(lo, hi)
    const @calib.<func>.<value>.chmax : f32[K]              # per-channel (last axis) absolute maximum

``dce`` keeps ``calib.*`` constants; ``quantize`` consumes (removes) them. Read them back with
:func:`calibration_stats`. Running ``calibrate`` again replaces the statistics of the values it
watches. A progress line per batch goes to stderr when stderr is a terminal.

Before (``tests/golden/passes/calibrate_mlp.input.qir``)::

    func @main(%x: f32[1,seq,4]) -> (f32[1,seq,2]) {
      %h = linear %x, @w1 : f32[1,seq,3]
      %a = relu %h : f32[1,seq,3]
      %y = linear %a, @w2 : f32[1,seq,2]
      return %y
    }

After ``calibrate`` on two feeds (``calibrate_mlp.expected.qir``; the function is unchanged)::

    const @calib.main.x : f32[2] = dense(-2.0, 3.0)
    const @calib.main.x.chmax : f32[4] = dense(1.5, 2.0, 2.0, 3.0)
    const @calib.main.h : f32[2] = dense(-2.25, 2.6875)
    const @calib.main.h.chmax : f32[3] = dense(1.5, 2.6875, 2.25)
    const @calib.main.a : f32[2] = dense(0.0, 2.6875)
    const @calib.main.a.chmax : f32[3] = dense(1.5, 2.6875, 1.5)
    const @calib.main.y : f32[2] = dense(-3.0, 1.421875)
    const @calib.main.y.chmax : f32[2] = dense(3.0, 1.125)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qir.errors import QirError
from qir.graph import Function, Module, Value
from qir.passes.base import Pass
from qir.passes.cleanup import CALIBRATION_PREFIX
from qir.passes.observers import RangeObserver, Stats
from qir.passes.registry import register_pass

__all__ = ["Calibrate", "calibration_function", "calibration_stats", "calibration_targets", "stats_name",
           "store_stats", "remove_calibration"]


def calibration_function(module: Module, name: str | None = None) -> Function:
    """The function calibration runs: ``name``, else ``main``, else ``prefill``, else the only one."""
    if name is not None:
        return module.function(name)
    if "main" in module.functions or len(module.functions) == 1:
        return module.main
    if "prefill" in module.functions:
        return module.functions["prefill"]
    raise QirError(f"module @{module.name} has functions {', '.join(module.functions)}: say which one to "
                   "calibrate with PassContext(function=NAME)")


def _is_float(v: Value) -> bool:
    return v.type.quant is None and v.type.dtype.is_float


def calibration_targets(func: Function) -> list[Value]:
    """The values ``calibrate`` watches in ``func``, in definition order (see the module docstring)."""
    chosen: dict[int, Value] = {}
    for op in func.ops:
        if op.opcode in ("linear", "matmul", "qmatmul") and op.operands:
            x = op.operands[0]
            if _is_float(x) and not x.is_constant:
                chosen.setdefault(id(x), x)
            for r in op.results:
                if _is_float(r):
                    chosen.setdefault(id(r), r)
    order = {id(v): i for i, v in enumerate(func.values())}
    return sorted(chosen.values(), key=lambda v: order[id(v)])


def stats_name(function: str, value: str) -> str:
    """``calib.<function>.<value>``: the constant holding ``(lo, hi)``; ``+ ".chmax"`` holds the channel maxima."""
    return f"{CALIBRATION_PREFIX}{function}.{value}"


def store_stats(module: Module, function: str, value: str, stats: Stats) -> None:
    """Write (or overwrite) the statistics constants of ``%value`` in ``@function``."""
    base = stats_name(function, value)
    for name in (base, base + ".chmax"):
        if name in module.constants:
            module.remove_constant(name)
    module.add_constant(base, np.array([stats.lo, stats.hi], dtype=np.float32))
    if stats.chmax is not None:
        module.add_constant(base + ".chmax", np.asarray(stats.chmax, dtype=np.float32).reshape(-1))


def calibration_stats(module: Module, value_name: str, function: str | None = None) -> Stats | None:
    """The stored statistics of ``%value_name`` in ``function`` (default as :func:`calibration_function`), or None."""
    fname = function if function is not None else calibration_function(module).name
    base = module.constants.get(stats_name(fname, value_name))
    if base is None or not base.has_data:
        return None
    lo, hi = (float(v) for v in np.asarray(base.numpy(), dtype=np.float32).reshape(-1)[:2])
    ch = module.constants.get(stats_name(fname, value_name) + ".chmax")
    chmax = None if ch is None or not ch.has_data else np.asarray(ch.numpy(), dtype=np.float32)
    return Stats(lo, hi, chmax)


def remove_calibration(module: Module) -> int:
    """Remove every ``calib.*`` constant; returns how many there were."""
    names = [n for n in module.constants if n.startswith(CALIBRATION_PREFIX)]
    for n in names:
        module.remove_constant(n)
    return len(names)


@register_pass
@dataclass
class Calibrate(Pass):
    """Record activation ranges (method: minmax, percentile, mse, entropy) as calib.* constants."""

    name = "calibrate"
    method: Literal["minmax", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = 99.99
    bins: int = 2048
    symmetric: bool = False

    def run(self, module: Module) -> None:
        if self.bins < 2:
            raise QirError(f"calibrate: bins must be >= 2, got {self.bins}")
        if self.method == "entropy" and self.bins < 256:
            raise QirError(f"calibrate{{method=entropy}}: bins must be >= 256 (the quantized distribution has "
                           f"128 levels), got {self.bins}")
        func = calibration_function(module, self.context.function)
        targets = calibration_targets(func)
        if not targets:
            raise QirError(f"calibrate: @{func.name} has no float input of a linear, matmul or qmatmul to observe")
        observers = {id(v): RangeObserver(self.bins) for v in targets}

        def observe(value: Value, data: object) -> None:
            obs = observers.get(id(value))
            if obs is not None:
                obs.update(np.asarray(data))

        from qir.interpreter import Interpreter
        from qir.tools.progress import progress

        interp = Interpreter(module)
        feeds = list(self.context.batches("calibrate"))
        for feed in progress(feeds, f"calibrate @{func.name}"):
            interp.run(feed, function=func.name, observer=observe)
        for v in targets:
            obs = observers[id(v)]
            if obs.empty:
                continue  # only NaN/Inf reached it: no statistics rather than made-up ones
            lo, hi = obs.range(self.method, percentile=self.percentile, symmetric=self.symmetric)
            store_stats(module, func.name, v.name, Stats(lo, hi, obs.chmax))
