"""The reference interpreter: runs a function of a module with the numpy semantics of its ops.

It is the oracle passes and backends are tested against, so it checks as it
goes: each input's dtype and shape (binding symbolic sizes such as ``seq``),
and after each op that the result has the declared dtype, concrete shape and
quantization (a :class:`qir.quant.QTensor` exactly when the type is quantized).
A failing op raises :class:`~qir.errors.InterpretError` naming the op, its
source location and the reason.

Float compute rule: f16 and bf16 operands are computed in f32 and the result is
cast to the declared result dtype; f32 stays f32 (f64 stays f64); integer ops
are exact (they raise rather than wrap around). Quantized arithmetic follows
:mod:`qir.quant`.

Memory: each intermediate value is dropped right after its last use, so a
model runs in about the memory of its weights plus its widest live set.

Example::

    out, = qir.interpreter.run(module, {"x": np.ones((1, 4), np.float32)})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qir.dtypes import from_numpy
from qir.errors import InterpretError, QirError
from qir.graph import Function, Module, Op, Value
from qir.ops import get_op
from qir.quant import QTensor
from qir.shapes import bind, evaluate, format_shape
from qir.types import TensorType

Observer = Callable[[Value, Any], None]
RuntimeValue = Any  # np.ndarray | QTensor


def _op_text(op: Op) -> str:
    try:
        from qir.printer import format_op
    except ImportError:
        return repr(op)
    try:
        return format_op(op)
    except Exception:  # noqa: BLE001 - the message must not fail because printing failed
        return repr(op)


class RunContext:
    """What an op's ``compute`` may ask about the run: the module, symbol bindings, constants, parameters."""

    def __init__(self, module: Module, bindings: dict[str, int] | None = None) -> None:
        self.module = module
        self.bindings: dict[str, int] = {} if bindings is None else bindings
        self._params: dict[str, np.ndarray] = {}

    def constant(self, name: str) -> np.ndarray | QTensor:
        """The data of constant ``@name``: an array, or a :class:`QTensor` for a quantized constant."""
        c = self.module.constant(name)
        data = np.asarray(c.numpy())
        t = c.type
        if data.dtype != t.dtype.numpy or tuple(data.shape) != tuple(t.shape):
            got = f"{from_numpy(data.dtype) if _known(data.dtype) else data.dtype}{list(data.shape)}"
            raise InterpretError(f"constant @{name} holds {got}, but its type is {t}")
        if t.quant is None:
            return data
        if t.quant.dynamic:
            raise InterpretError(f"constant @{name} has a dynamic quantized type {t}; a constant needs static "
                                 "parameters")
        scale, zp = self.params(t)
        return QTensor(data, scale, zp, t.quant, self.offset(t))

    def offset(self, t: TensorType) -> np.ndarray | None:
        """The f32 offset of a static quantized type in the spec's layout, or None (no ``offset=``)."""
        spec = t.quant
        if spec is None or spec.offset is None:
            return None
        return self._param(spec.offset, np.float32)

    def params(self, t: TensorType) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scale, zero_point)`` of a static quantized type, in the spec's layout (zero point None if symmetric).

        A scale constant that is itself quantized (double quantization) is
        dequantized to f32 here.
        """
        spec = t.quant
        if spec is None or spec.dynamic:
            raise InterpretError(f"{t} has no static quantization parameters")
        scale = self._param(spec.scale, np.float32)
        zp = None if spec.zero_point is None else self._param(spec.zero_point, np.int32)
        return scale, zp

    def _param(self, ref: float | int | str | None, dt: type) -> np.ndarray:
        if not isinstance(ref, str):
            return np.asarray(ref, dtype=dt)
        if ref not in self._params:
            value = self.constant(ref)
            arr = value.dequantize() if isinstance(value, QTensor) else value
            if dt is np.int32 and not (_known(arr.dtype) and from_numpy(arr.dtype).is_integer):
                raise InterpretError(f"zero-point constant @{ref} must hold integers, got {arr.dtype}")
            self._params[ref] = np.asarray(arr).astype(dt)
        return self._params[ref]


def _known(dt: np.dtype) -> bool:
    try:
        from_numpy(dt)
    except QirError:
        return False
    return True


@dataclass
class RunStats:
    """Counters of the last run: how many values were live at most, and how many were freed early."""

    peak_live: int = 0
    freed: int = 0


class Interpreter:
    """Runs the functions of one module. ``stats`` describes the last run."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.stats = RunStats()

    def run(self, inputs: Sequence[Any] | Mapping[str, Any], *, function: str | None = None,
            observer: Observer | None = None) -> list[RuntimeValue]:
        """Run ``function`` (default: the module's main) on ``inputs`` (a list in input order or a dict by name)."""
        func = self.module.function(function)
        ctx = RunContext(self.module)
        env: dict[int, RuntimeValue] = {}
        stats = RunStats()
        self.stats = stats
        for value, raw in zip(func.inputs, self._order_inputs(func, inputs)):
            rv = self._check_input(ctx, func, value, raw)
            env[id(value)] = rv
            if observer is not None:
                observer(value, rv)
        used, dies_after = self._last_uses(func)
        keep = {id(v) for v in func.outputs}
        # Inputs nobody reads are dropped at once (they still were observed).
        for v in func.inputs:
            if id(v) not in used and id(v) not in keep and id(v) in env:
                del env[id(v)]
                stats.freed += 1
        stats.peak_live = len(env)
        for index, op in enumerate(func.ops):
            try:
                args = [self._fetch(ctx, env, v) for v in op.operands]
            except QirError as exc:
                raise self._error(func, op, str(exc)) from None
            results = self._execute(ctx, func, op, args)
            del args
            for value, rv in zip(op.results, results):
                env[id(value)] = rv
                if observer is not None:
                    observer(value, rv)
            stats.peak_live = max(stats.peak_live, len(env))
            for value in op.results:
                if id(value) not in used and id(value) not in keep:
                    del env[id(value)]
                    stats.freed += 1
            for vid in dies_after.get(index, ()):
                if vid not in keep and vid in env:
                    del env[vid]
                    stats.freed += 1
        try:
            return [self._fetch(ctx, env, v) for v in func.outputs]
        except QirError as exc:
            raise InterpretError(f"return of @{func.name}: {exc}") from None

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _last_uses(func: Function) -> tuple[set[int], dict[int, list[int]]]:
        """Ids of the values some op reads, and for each op index the ids whose last reader it is."""
        last: dict[int, int] = {}
        for index, op in enumerate(func.ops):
            for v in op.operands:
                if not v.is_constant:
                    last[id(v)] = index
        dies_after: dict[int, list[int]] = {}
        for vid, index in last.items():
            dies_after.setdefault(index, []).append(vid)
        return set(last), dies_after

    @staticmethod
    def _order_inputs(func: Function, inputs: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        names = [v.name for v in func.inputs]
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            extra = [k for k in inputs if k not in names]
            if missing or extra:
                raise InterpretError(f"@{func.name} takes inputs {names}; missing {missing}, unexpected {extra}")
            return [inputs[n] for n in names]
        inputs = list(inputs)
        if len(inputs) != len(names):
            raise InterpretError(f"@{func.name} takes {len(names)} inputs {names}, got {len(inputs)}")
        return inputs

    def _check_input(self, ctx: RunContext, func: Function, value: Value, raw: Any) -> RuntimeValue:
        t = value.type
        where = f"input %{value.name} of @{func.name}"
        if t.quant is not None:
            if isinstance(raw, QTensor):
                if raw.spec.normalized(len(t.shape)) != t.quant:
                    raise InterpretError(f"{where} is {t}, but the QTensor's spec is {raw.spec}")
                codes = raw.codes
            elif t.quant.dynamic:
                raise InterpretError(f"{where} has the dynamic type {t}: pass a qir.quant.QTensor that carries its "
                                     "scale")
            else:
                codes = raw
        elif isinstance(raw, QTensor):
            raise InterpretError(f"{where} is the plain type {t}, but got a quantized QTensor")
        else:
            codes = raw
        try:
            arr = np.asarray(codes)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's input
            raise InterpretError(f"{where}: cannot convert {type(codes).__name__} to an array ({exc})") from None
        if arr.dtype != t.dtype.numpy:
            got = from_numpy(arr.dtype).name if _known(arr.dtype) else str(arr.dtype)
            raise InterpretError(f"{where} expects dtype {t.dtype} (numpy {t.dtype.numpy}), got {got}")
        try:
            bind(t.shape, tuple(arr.shape), ctx.bindings)
        except QirError as exc:
            raise InterpretError(f"{where} expects shape {format_shape(t.shape)}, got {list(arr.shape)} ({exc})"
                                 ) from None
        if t.quant is None:
            return arr
        try:
            if isinstance(raw, QTensor):
                qt = QTensor(arr, np.asarray(raw.scale, np.float32),
                             None if raw.zero_point is None else np.asarray(raw.zero_point, np.int32), t.quant,
                             None if raw.offset is None else np.asarray(raw.offset, np.float32))
            else:
                scale, zp = ctx.params(t)
                qt = QTensor(arr, scale, zp, t.quant, ctx.offset(t))
            qt.scale_full()  # raises now, naming the input, if the parameters do not fit the spec
            qt.zero_point_full()
        except QirError as exc:
            raise InterpretError(f"{where}: {exc}") from None
        return qt

    @staticmethod
    def _fetch(ctx: RunContext, env: dict[int, RuntimeValue], v: Value) -> RuntimeValue:
        if v.is_constant:
            return ctx.constant(v.name)
        try:
            return env[id(v)]
        except KeyError:
            raise InterpretError(f"value {v.ref} is used before it is defined (or after it was freed)") from None

    def _execute(self, ctx: RunContext, func: Function, op: Op, args: list[RuntimeValue]) -> list[RuntimeValue]:
        result_types = [r.type for r in op.results]
        try:
            opdef = get_op(op.opcode)
            attrs = opdef.complete_attrs(op.attrs)
            with np.errstate(all="ignore"):
                results = list(opdef.compute(ctx, args, attrs, result_types))
        except Exception as exc:  # noqa: BLE001 - every failure is reported with the op that caused it
            raise self._error(func, op, f"{type(exc).__name__}: {exc}" if not isinstance(exc, QirError)
                              else str(exc)) from exc
        if len(results) != len(result_types):
            raise self._error(func, op, f"computed {len(results)} results for {len(result_types)} declared")
        for value, rv in zip(op.results, results):
            self._check_result(ctx, func, op, value, rv)
        return results

    def _check_result(self, ctx: RunContext, func: Function, op: Op, value: Value, rv: RuntimeValue) -> None:
        t = value.type
        if t.quant is not None:
            if not isinstance(rv, QTensor):
                raise self._error(func, op, f"result {value.ref} should be quantized ({t}) but is a plain array")
            if rv.spec != t.quant:
                raise self._error(func, op, f"result {value.ref} is declared {t} but carries the spec {rv.spec}")
            arr = rv.codes
        else:
            if isinstance(rv, QTensor):
                raise self._error(func, op, f"result {value.ref} is declared {t} but came out quantized")
            arr = np.asarray(rv)
        if arr.dtype != t.dtype.numpy:
            got = from_numpy(arr.dtype).name if _known(arr.dtype) else str(arr.dtype)
            raise self._error(func, op, f"result {value.ref} is declared {t} but has dtype {got}")
        try:
            # Sizes that only a result determines (a fresh symbol) are bound here; the rest must match.
            bind(t.shape, tuple(arr.shape), ctx.bindings)
            want = [evaluate(d, ctx.bindings) for d in t.shape]
        except QirError:
            known = f" (with {', '.join(f'{k}={v}' for k, v in ctx.bindings.items())})" if ctx.bindings else ""
            raise self._error(func, op, f"result {value.ref} is declared {t}{known} but has shape "
                                        f"{list(arr.shape)}") from None
        if want != list(arr.shape):  # pragma: no cover - bind already raised
            raise self._error(func, op, f"result {value.ref} has shape {list(arr.shape)}, expected {want}")

    @staticmethod
    def _error(func: Function, op: Op, reason: str) -> InterpretError:
        where = f" at {op.loc}" if op.loc else ""
        return InterpretError(f"op {op.opcode} in @{func.name}{where} failed: {reason}\n  op: {_op_text(op)}")


def run(module: Module, inputs: Sequence[Any] | Mapping[str, Any], *, function: str | None = None,
        observer: Observer | None = None) -> list[RuntimeValue]:
    """Run ``function`` of ``module`` on ``inputs``; see :class:`Interpreter`."""
    return Interpreter(module).run(inputs, function=function, observer=observer)
