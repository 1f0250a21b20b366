"""The verifier: checks that a module obeys qir's structural, type and quantization rules.

:func:`verify` raises the first :class:`~qir.errors.VerifyError` it finds;
:func:`check` collects every problem (for tools that want to show them all).
Each error carries ``rule``, a kebab-case name of the broken rule, and names the
function, the op (printed with :func:`qir.printer.format_op`) and the value.

Rules
-----
Structure / SSA
  ``use-before-def``   an operand is a result of a later op (or of the op itself)
  ``foreign-value``    an operand (or output) belongs to another function or module
  ``duplicate-name``   two values of a function share a name
  ``use-list``         use lists and operands disagree (either direction)
  ``undefined-output`` a function output is not defined in the function
  ``op-parent``        ``op.parent`` is not the function, or an op is listed twice
  ``producer``         a result's ``producer`` is not its op, or an input has a producer
  ``constant-name``    a constant is filed under a name that is not its own
Ops
  ``unknown-op``       the opcode is not registered
  ``arity``            wrong operand count
  ``attribute``        an attribute is unknown, missing or of the wrong kind
  ``result-count``     wrong number of results
  ``type-check``       the op's type inference rejects the operand types (or the declared types)
  ``result-type``      a declared result type differs from the inferred one
Quantization
  ``quant-dtype``        a float (or bool) type carries a quantization spec
  ``quant-spec``         a spec that does not fit its tensor (axis, group size, static/dynamic...)
  ``quant-ref``          a spec names a constant the module does not have (or the value itself)
  ``quant-scale-dtype``  a scale constant is neither float nor quantized (double quantization)
  ``quant-scale-shape``  a scale constant's shape is not ``spec.scale_shape(shape)``
  ``quant-scale-value``  a scale is not finite and > 0 (a constant's scales: not finite; GGUF blocks
                         store negative and zero scales, and nothing divides by a weight's scale)
  ``quant-offset``       an offset constant that is not float (or quantized), has the wrong shape or
                         holds values that are not finite
  ``quant-zero-point``   a zero point with a non-integer dtype, the wrong shape or out-of-range values
  ``quant-codes``        a quantized constant's codes fall outside its storage dtype
Constants
  ``constant-data``    data whose shape or dtype differs from the declared type

Constant values (scales, zero points, codes) are read only when the data is an
in-memory array or a lazy one of at most :data:`MAX_READ_ELEMENTS` elements, so
verifying a module that memory-maps a large model never loads its weights.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from qir.errors import QirError, VerifyError
from qir.graph import Constant, Function, Module, Op, Value
from qir.ops.registry import all_ops, get_op, has_op
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["MAX_READ_ELEMENTS", "check", "verify", "verify_function"]

MAX_READ_ELEMENTS = 1 << 20
"""Lazy constants with more elements than this are never read by the verifier (only their shapes are checked)."""


def verify(module: Module) -> None:
    """Raise :class:`VerifyError` for the first broken rule in ``module``; return ``None`` if it is valid."""
    _Checker(fail_fast=True).check_module(module)


def verify_function(func: Function) -> None:
    """Verify one function (its ops, values and the quantized types they use) against its module's constants."""
    _Checker(fail_fast=True).check_function(func)


def check(module: Module) -> list[VerifyError]:
    """Every broken rule in ``module``, in module order (empty when it is valid)."""
    checker = _Checker(fail_fast=False)
    checker.check_module(module)
    return checker.errors


def _op_text(op: Op) -> str:
    """The op's IR line; broken ops may not print, and a failing printer must not hide the real error."""
    try:
        from qir.printer import format_op

        return format_op(op)
    except Exception:  # any printer failure falls back to the op's repr
        return repr(op)


def _ref(v: object) -> str:
    return v.ref if isinstance(v, Value) else repr(v)


class _Checker:
    """Walks a module once; ``report`` raises at once (``verify``) or collects (``check``)."""

    def __init__(self, *, fail_fast: bool) -> None:
        self.fail_fast = fail_fast
        self.errors: list[VerifyError] = []
        self._read_cache: dict[int, np.ndarray | None] = {}
        self._value_checked: set[tuple[str, str]] = set()
        self._use_counts: dict[int, Counter[tuple[int, int]]] = {}

    def report(self, rule: str, message: str, *, op: Op | None = None, func: Function | None = None) -> None:
        err = VerifyError(message, rule=rule, op_text=_op_text(op) if op is not None else None,
                          func=func.name if func is not None else None)
        if self.fail_fast:
            raise err
        self.errors.append(err)

    # -- module -------------------------------------------------------------------------------------------------
    def check_module(self, module: Module) -> None:
        for key, c in module.constants.items():
            if not isinstance(c, Constant) or c.name != key:
                self.report("constant-name", f"module @{module.name} files {_ref(c)} under the name @{key}")
                continue
            self.check_constant(module, c)
        all_ops_ids: set[int] = set()
        for fname, func in module.functions.items():
            all_ops_ids.update(id(op) for op in func.ops)
            if func.module is not module or func.name != fname:
                self.report("op-parent", f"function @{func.name} is filed as @{fname} in module @{module.name} "
                            "but does not belong to it", func=func)
                continue
            self.check_function(func)
        for c in module.constants.values():
            if not isinstance(c, Constant):
                continue
            for user, index in c.uses:
                if id(user) not in all_ops_ids:
                    self.report("use-list", f"constant {c.ref} lists a use by {user!r} (operand {index}), "
                                "which is in no function of the module")

    def check_constant(self, module: Module, c: Constant) -> None:
        what = f"constant {c.ref}"
        self.check_data(c)
        self.check_type(module, c.type, what, owner=c)

    def check_data(self, c: Constant) -> None:
        """``constant-data`` and ``quant-codes``: stored elements agree with the declared type."""
        if c.data is None:
            return
        t = c.type
        try:
            data_shape = tuple(int(d) for d in c.data.shape)
        except Exception as exc:  # a lazy object without a usable shape
            self.report("constant-data", f"constant {c.ref}: its data has no usable shape ({exc})")
            return
        if not t.is_static:
            self.report("constant-data", f"constant {c.ref} has data but its declared type {t} has a symbolic "
                        "size; constant shapes must be fixed")
            return
        if data_shape != tuple(t.shape):
            self.report("constant-data", f"constant {c.ref} is declared {t} but its data has shape "
                        f"{list(data_shape)}")
            return
        arr = self.read(c)
        if arr is None:
            return
        want = t.dtype.numpy
        if arr.dtype == want:
            return
        if t.is_quantized and np.issubdtype(arr.dtype, np.integer):
            lo, hi = int(arr.min()) if arr.size else 0, int(arr.max()) if arr.size else 0
            if lo < t.dtype.qmin or hi > t.dtype.qmax:
                self.report("quant-codes", f"constant {c.ref}: codes span [{lo}, {hi}], outside the {t.dtype} "
                            f"storage range [{t.dtype.qmin}, {t.dtype.qmax}] (data must be stored as {want})")
                return
        self.report("constant-data", f"constant {c.ref} is declared {t} but its data has numpy dtype {arr.dtype}; "
                    f"{t.dtype} data is held as {want}")

    def read(self, c: Constant) -> np.ndarray | None:
        """The constant's array if it is in memory or small enough to read; ``None`` otherwise."""
        key = id(c)
        if key in self._read_cache:
            return self._read_cache[key]
        arr: np.ndarray | None = None
        if isinstance(c.data, np.ndarray):
            arr = c.data
        elif c.data is not None:
            try:
                n = math.prod(int(d) for d in c.data.shape)
            except Exception:  # reported by check_data
                n = MAX_READ_ELEMENTS + 1
            if n <= MAX_READ_ELEMENTS:
                try:
                    arr = np.asarray(c.data.numpy())
                except Exception as exc:  # a broken lazy loader is a data problem, not a crash
                    self.report("constant-data", f"constant {c.ref}: its data could not be read ({exc})")
        self._read_cache[key] = arr
        return arr

    # -- functions ------------------------------------------------------------------------------------------------
    def check_function(self, func: Function) -> None:
        module = func.module
        seen_names: dict[str, Value] = {}
        defined: set[int] = set()
        positions: dict[int, int] = {}
        op_ids: dict[int, int] = {}
        for i, op in enumerate(func.ops):
            if id(op) in op_ids:
                self.report("op-parent", f"op '{op.opcode}' is listed twice in function @{func.name} "
                            f"(positions {op_ids[id(op)]} and {i})", op=op, func=func)
            op_ids.setdefault(id(op), i)
            for r in op.results:
                positions.setdefault(id(r), i)

        for v in func.inputs:
            if v.producer is not None or v._input_of is not func:
                self.report("producer", f"input {v.ref} of @{func.name} is not owned by it as an input "
                            f"(producer {v.producer!r})", func=func)
            self.claim_name(func, v, seen_names, None)
            self.check_type(module, v.type, f"input {v.ref}", func=func)
            defined.add(id(v))

        for op in func.ops:
            if op.parent is not func:
                where = f"@{op.parent.name}" if op.parent is not None else "no function"
                self.report("op-parent", f"op '{op.opcode}' is listed in @{func.name} but its parent is {where}",
                            op=op, func=func)
            for index, v in enumerate(op.operands):
                self.check_operand(func, op, index, v, defined, positions)
            self.check_op(func, op)
            for r in op.results:
                if r.producer is not op:
                    self.report("producer", f"result {r.ref} of op '{op.opcode}' names {r.producer!r} as its "
                                "producer", op=op, func=func)
                self.claim_name(func, r, seen_names, op)
                self.check_type(module, r.type, f"result {r.ref} of op '{op.opcode}'", func=func, op=op)
            defined.update(id(r) for r in op.results)

        for v in func.outputs:
            if isinstance(v, Constant) and module is not None and module.constants.get(v.name) is v:
                continue
            if id(v) not in defined:
                self.report("undefined-output", f"output {_ref(v)} of @{func.name} is not an input or a result of "
                            "an op of the function", func=func)

        self.check_uses(func, op_ids)

    def claim_name(self, func: Function, v: Value, seen: dict[str, Value], op: Op | None) -> None:
        other = seen.get(v.name)
        if other is not None and other is not v:
            self.report("duplicate-name", f"value name {v.ref} is defined twice in @{func.name}", op=op, func=func)
        seen.setdefault(v.name, v)

    def check_operand(self, func: Function, op: Op, index: int, v: Value, defined: set[int],
                      positions: dict[int, int]) -> None:
        if not isinstance(v, Value):
            self.report("foreign-value", f"operand {index} of op '{op.opcode}' is {v!r}, not an IR value",
                        op=op, func=func)
            return
        if self.use_count(v, op, index) != 1:
            self.report("use-list", f"operand {index} ({v.ref}) of op '{op.opcode}' is not recorded exactly once "
                        f"in {v.ref}'s use list", op=op, func=func)
        if isinstance(v, Constant):
            module = func.module
            if module is None or module.constants.get(v.name) is not v:
                self.report("foreign-value", f"op '{op.opcode}' uses constant {v.ref}, which is not a constant of "
                            "this function's module", op=op, func=func)
            return
        if id(v) in defined:
            return
        if id(v) in positions:
            self.report("use-before-def", f"op '{op.opcode}' uses {v.ref} before it is defined (by op "
                        f"'{v.producer.opcode if v.producer else '?'}' later in @{func.name})", op=op, func=func)
            return
        owner = v._function()
        where = f"function @{owner.name}" if owner is not None and owner is not func else "no op of this function"
        self.report("foreign-value", f"op '{op.opcode}' uses {v.ref}, which is defined by {where}", op=op, func=func)

    def use_count(self, v: Value, op: Op, index: int) -> int:
        """How often ``(op, index)`` appears in ``v.uses`` (counted once per value: a shared constant has many uses)."""
        counts = self._use_counts.get(id(v))
        if counts is None:
            counts = Counter((id(u), i) for u, i in v.uses)
            self._use_counts[id(v)] = counts
        return counts[(id(op), index)]

    def check_uses(self, func: Function, op_ids: dict[int, int]) -> None:
        """Every recorded use points back at an op operand of this function (the reverse direction)."""
        values: list[Value] = list(func.inputs)
        for op in func.ops:
            values.extend(op.results)
        module = func.module
        consts: Iterable[Constant] = module.constants.values() if module is not None else ()
        for v in [*values, *consts]:
            if not isinstance(v, Value):
                continue
            for user, index in v.uses:
                if id(user) not in op_ids:
                    parent = getattr(user, "parent", None)
                    if isinstance(v, Constant) or (parent is not None and parent is not func
                                                   and any(o is user for o in parent.ops)):
                        continue  # a use by another function's op: that function reports the operand
                    self.report("use-list", f"{v.ref} lists a use by {user!r}, which is not an op of @{func.name}",
                                func=func)
                elif not (0 <= index < len(user.operands)) or user.operands[index] is not v:
                    self.report("use-list", f"{v.ref} lists itself as operand {index} of op '{user.opcode}', but "
                                "that operand is something else", op=user, func=func)

    def check_op(self, func: Function, op: Op) -> None:
        if not has_op(op.opcode):
            close = difflib.get_close_matches(op.opcode, list(all_ops()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            self.report("unknown-op", f"op '{op.opcode}' is not a registered op{hint}", op=op, func=func)
            return
        opdef = get_op(op.opcode)
        try:
            opdef.check_arity(len(op.operands))
        except QirError as exc:
            self.report("arity", str(exc), op=op, func=func)
            return
        try:
            completed = opdef.complete_attrs(dict(op.attrs))
        except QirError as exc:
            self.report("attribute", str(exc), op=op, func=func)
            return
        missing = [name for name in completed if name not in op.attrs]
        if missing:
            self.report("attribute", f"op '{op.opcode}' lacks attribute {missing[0]!r}; ops carry every declared "
                        f"attribute (its default is {completed[missing[0]]!r})", op=op, func=func)
            return
        if opdef.num_results != len(op.results):
            self.report("result-count", f"op '{op.opcode}' has {len(op.results)} results; it defines "
                        f"{opdef.num_results}", op=op, func=func)
            return
        operand_types = [v.type for v in op.operands]
        declared = [r.type for r in op.results]
        problem: str | None = None
        inferred: list[TensorType] = []
        try:
            inferred = list(opdef.infer(operand_types, completed, declared))
        except QirError as exc:
            problem = str(exc)
        except Exception as exc:  # a crash in an op's inference is still reported, not raised
            problem = f"type inference failed with {type(exc).__name__}: {exc}"
        if problem is not None:
            types = ", ".join(str(t) for t in operand_types)
            self.report("type-check", f"op '{op.opcode}' rejects its operand types ({types}): {problem}",
                        op=op, func=func)
            return
        if len(inferred) != len(declared):
            self.report("result-count", f"op '{op.opcode}' has {len(declared)} results but its type inference "
                        f"gives {len(inferred)}", op=op, func=func)
            return
        for r, want in zip(op.results, inferred):
            if r.type != want:
                self.report("result-type", f"op '{op.opcode}' declares {r.type} for {r.ref} but its operands give "
                            f"{want}", op=op, func=func)

    # -- quantized types ------------------------------------------------------------------------------------------
    def check_type(self, module: Module | None, t: TensorType, what: str, *, func: Function | None = None,
                   op: Op | None = None, owner: Constant | None = None) -> None:
        spec = t.quant
        if spec is None:
            return
        if not t.dtype.is_integer:
            self.report("quant-dtype", f"{what} has type {t}: a {t.dtype} tensor cannot carry a quantization "
                        "spec; quantized tensors are stored in integer dtypes", op=op, func=func)
            return
        rule = "quant-spec"
        if isinstance(spec.scale, float) and not (math.isfinite(spec.scale) and spec.scale > 0):
            rule = "quant-scale-value"
        elif isinstance(spec.zero_point, int) and not t.dtype.qmin <= spec.zero_point <= t.dtype.qmax:
            rule = "quant-zero-point"
        try:
            spec.check(t.dtype, t.shape)
        except QirError as exc:
            self.report(rule, f"{what} has an invalid quantized type {t}: {exc}", op=op, func=func)
            return
        refs = spec.constant_refs
        if not refs:
            return
        if module is None:
            self.report("quant-ref", f"{what} has type {t}, whose spec names constants, but the function belongs "
                        "to no module", op=op, func=func)
            return
        try:
            want_shape = spec.scale_shape(t.shape)
        except QirError as exc:
            self.report("quant-spec", f"{what} has type {t}: {exc}", op=op, func=func)
            return
        if isinstance(spec.scale, str):
            self.check_scale_ref(module, t, spec, want_shape, what, func=func, op=op, owner=owner)
        if isinstance(spec.zero_point, str):
            self.check_zero_point_ref(module, t, spec, want_shape, what, func=func, op=op, owner=owner)
        if spec.offset is not None:
            self.check_offset_ref(module, t, spec, want_shape, what, func=func, op=op, owner=owner)

    def check_offset_ref(self, module: Module, t: TensorType, spec: QuantSpec, want_shape: tuple, what: str, *,
                         func: Function | None, op: Op | None, owner: Constant | None) -> None:
        assert spec.offset is not None
        c = self._lookup(module, spec.offset, t, what, "offset", func=func, op=op, owner=owner)
        if c is None:
            return
        if not (c.type.dtype.is_float or c.type.is_quantized):
            self.report("quant-offset", f"{what} takes its offset from {c.ref} of type {c.type}; an offset "
                        "constant must be float, or quantized itself (two-level minimums)", op=op, func=func)
            return
        if tuple(c.type.shape) != tuple(want_shape):
            self.report("quant-offset", f"{what} has type {t}, whose offset {c.ref} must have shape "
                        f"[{','.join(str(d) for d in want_shape)}] (the scale's layout), not {c.type}",
                        op=op, func=func)
            return
        key = ("offset", c.name)
        if key in self._value_checked:
            return
        self._value_checked.add(key)
        values = self.real_values(module, c, depth=0)
        if values is not None and not np.all(np.isfinite(values)):
            self.report("quant-offset", f"{what} takes its offset from {c.ref}, which holds values that are not "
                        "finite", op=op, func=func)

    def _lookup(self, module: Module, name: str, t: TensorType, what: str, role: str, *,
                func: Function | None, op: Op | None, owner: Constant | None) -> Constant | None:
        c = module.constants.get(name)
        if c is None:
            self.report("quant-ref", f"{what} has type {t}, whose {role} @{name} is not a constant of module "
                        f"@{module.name}", op=op, func=func)
            return None
        if c is owner:
            self.report("quant-ref", f"{what} names itself as its own {role}", op=op, func=func)
            return None
        return c

    def check_scale_ref(self, module: Module, t: TensorType, spec: QuantSpec, want_shape: tuple, what: str, *,
                        func: Function | None, op: Op | None, owner: Constant | None) -> None:
        assert isinstance(spec.scale, str)
        c = self._lookup(module, spec.scale, t, what, "scale", func=func, op=op, owner=owner)
        if c is None:
            return
        if not (c.type.dtype.is_float or c.type.is_quantized):
            self.report("quant-scale-dtype", f"{what} takes its scale from {c.ref} of type {c.type}; a scale "
                        "constant must be float, or quantized itself (double quantization)", op=op, func=func)
            return
        if tuple(c.type.shape) != tuple(want_shape):
            self.report("quant-scale-shape", f"{what} has type {t}, whose scale {c.ref} must have shape "
                        f"[{','.join(str(d) for d in want_shape)}] ({spec.granularity} granularity), not "
                        f"{c.type}", op=op, func=func)
            return
        # A constant is only ever dequantized, so its scales may be zero or negative (GGUF Q4_0's d = max/-8);
        # a run-time value may be quantized into, which divides by the scale.
        signed_ok = owner is not None
        key = ("scale" if not signed_ok else "scale-signed", c.name)
        if key in self._value_checked:
            return
        self._value_checked.add(key)
        values = self.real_values(module, c, depth=0)
        if values is None:
            return
        bad = ~np.isfinite(values) if signed_ok else ~np.isfinite(values) | (values <= 0)
        if np.any(bad):
            first = float(values[bad].flat[0])
            rule = "finite" if signed_ok else "finite and > 0"
            self.report("quant-scale-value", f"{what} takes its scale from {c.ref}, which holds {first!r} "
                        f"({int(bad.sum())} of {values.size} entries are not {rule})", op=op, func=func)

    def check_zero_point_ref(self, module: Module, t: TensorType, spec: QuantSpec, want_shape: tuple, what: str,
                             *, func: Function | None, op: Op | None, owner: Constant | None) -> None:
        assert isinstance(spec.zero_point, str)
        c = self._lookup(module, spec.zero_point, t, what, "zero point", func=func, op=op, owner=owner)
        if c is None:
            return
        if not c.type.dtype.is_integer or c.type.is_quantized:
            self.report("quant-zero-point", f"{what} takes its zero point from {c.ref} of type {c.type}; a zero "
                        "point constant must be a plain integer tensor", op=op, func=func)
            return
        if tuple(c.type.shape) != tuple(want_shape):
            self.report("quant-zero-point", f"{what} has type {t}, whose zero point {c.ref} must have shape "
                        f"[{','.join(str(d) for d in want_shape)}] ({spec.granularity} granularity), not "
                        f"{c.type}", op=op, func=func)
            return
        key = ("zp:" + t.dtype.name, c.name)
        if key in self._value_checked:
            return
        self._value_checked.add(key)
        arr = self.read(c)
        if arr is None or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < t.dtype.qmin or hi > t.dtype.qmax:
            self.report("quant-zero-point", f"{what} has type {t}, whose zero point {c.ref} holds values in "
                        f"[{lo}, {hi}], outside the {t.dtype} storage range [{t.dtype.qmin}, {t.dtype.qmax}]",
                        op=op, func=func)

    def real_values(self, module: Module, c: Constant, depth: int) -> np.ndarray | None:
        """The real numbers a constant stands for (dequantized when it is quantized); ``None`` if not cheap."""
        arr = self.read(c)
        if arr is None:
            return None
        spec = c.type.quant
        if spec is None:
            return np.asarray(arr, dtype=np.float64)
        if depth > 4:  # a chain of scale constants this deep is a cycle or nonsense; other rules report it
            return None
        if isinstance(spec.scale, str):
            sc = module.constants.get(spec.scale)
            scale = None if sc is None or sc is c else self.real_values(module, sc, depth + 1)
        else:
            scale = None if spec.scale is None else np.asarray(spec.scale, dtype=np.float64)
        if isinstance(spec.zero_point, str):
            zc = module.constants.get(spec.zero_point)
            zp = None if zc is None else self.read(zc)
            if zp is None:
                return None
        else:
            zp = np.asarray(spec.zero_point or 0)
        if scale is None:
            return None
        from qir.quant import expand_params

        try:
            shape = tuple(int(d) for d in c.type.shape)
            s = expand_params(scale, spec, shape)
            z = expand_params(zp, spec, shape) if isinstance(spec.zero_point, str) else zp
            real = (arr.astype(np.float64) - np.asarray(z, dtype=np.float64)) * s
            if spec.offset is not None:
                oc = module.constants.get(spec.offset)
                off = None if oc is None or oc is c else self.real_values(module, oc, depth + 1)
                if off is None:
                    return None
                real = real + expand_params(off, spec, shape)
            return real
        except Exception:  # shapes that do not fit are reported by the shape rules
            return None
