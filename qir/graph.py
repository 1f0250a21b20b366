"""The IR's object model: values, ops, functions and the module that holds them.

* :class:`Value` — an SSA value: a stable ``name``, a :class:`~qir.types.TensorType`,
  the op that produces it (``None`` for function inputs and constants) and its uses.
* :class:`Constant` — a module-level named tensor (``@name``): weights, scales,
  zero points. Its data is an in-memory array or a lazy, memory-mapped one, so
  a module can be printed and verified without reading its weights.
* :class:`Op` — an opcode, operands, results and immutable attributes, plus an
  optional source location.
* :class:`Function` — inputs, ordered ops, outputs (a graph). A causal LM has
  two: ``prefill`` and ``decode``; they share the module's constants.
* :class:`Module` — named constants and functions.

Use-def lists are maintained here and only here: passes change the IR through
:meth:`Function.add_op`, :meth:`Function.erase_op`, :meth:`Op.set_operand`,
:meth:`Value.replace_all_uses_with` and friends, never by editing lists.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qir.errors import QirError
from qir.types import TensorType

if TYPE_CHECKING:
    import networkx

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid IR name (letters, digits, ``_ . -``), else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise QirError(f"invalid {what} {name!r}: names use letters, digits, '_', '.' and '-' "
                       "and do not start with '.' or '-'")
    return name


def _fresh(base: str, taken: Container[str]) -> str:
    if base not in taken:
        return base
    i = 1
    while f"{base}.{i}" in taken:
        i += 1
    return f"{base}.{i}"


class LazyArray(Protocol):
    """Constant data that is read only when asked for (e.g. a memory-mapped safetensors entry)."""

    shape: tuple[int, ...]

    def numpy(self) -> np.ndarray: ...


AttrValue = Any  # int | float | bool | str | None | tuple[AttrValue, ...]


def freeze_attr(value: Any) -> AttrValue:
    """Make an attribute value immutable (lists become tuples; numpy scalars become Python ones)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze_attr(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "name") and value.__class__.__name__ == "DType":
        return value.name
    raise QirError(f"attribute values must be int, float, bool, str, None or lists of them, not {value!r}")


class Value:
    """An SSA value. Identity matters: two values with equal names in different functions differ."""

    __slots__ = ("name", "type", "producer", "uses", "_input_of", "__weakref__")

    def __init__(self, name: str, type: TensorType, producer: Op | None = None) -> None:
        self.name = check_name(name, "value name")
        self.type = type
        self.producer = producer
        self._input_of: Function | None = None  # set for function inputs
        self.uses: list[tuple[Op, int]] = []  # (op, operand index); maintained by the core only

    @property
    def is_constant(self) -> bool:
        return False

    @property
    def ref(self) -> str:
        """How the IR text refers to this value: ``%name``."""
        return "%" + self.name

    def users(self) -> list[Op]:
        """Distinct ops that use this value, in first-use order."""
        seen: dict[int, Op] = {}
        for op, _ in self.uses:
            seen.setdefault(id(op), op)
        return list(seen.values())

    def replace_all_uses_with(self, new: Value) -> None:
        """Make every op operand and function output that uses ``self`` use ``new``."""
        if new is self:
            return
        for op, index in list(self.uses):
            op.set_operand(index, new)
        func = self._function()
        if func is not None:
            func.outputs = [new if v is self else v for v in func.outputs]

    def _function(self) -> Function | None:
        if self.producer is not None:
            return self.producer.parent
        return self._input_of

    def __repr__(self) -> str:
        return f"<{self.ref}: {self.type}>"


class Constant(Value):
    """A module-level named tensor (``@name``): in-memory, lazily loaded, or not loaded at all."""

    __slots__ = ("data",)

    def __init__(self, name: str, type: TensorType, data: np.ndarray | LazyArray | None = None) -> None:
        super().__init__(name, type, None)
        self.data = data

    @property
    def is_constant(self) -> bool:
        return True

    @property
    def ref(self) -> str:
        return "@" + self.name

    @property
    def has_data(self) -> bool:
        return self.data is not None

    def numpy(self) -> np.ndarray:
        """The stored elements (integer codes for quantized constants), read now if lazy."""
        if self.data is None:
            raise QirError(f"constant @{self.name} has no data: the IR text was read without its .safetensors "
                           "file (use qir.load on the .qir file next to it)")
        if isinstance(self.data, np.ndarray):
            return self.data
        return self.data.numpy()


class Op:
    """One operation. ``attrs`` is a read-only mapping; ``operands`` a read-only tuple."""

    __slots__ = ("opcode", "_operands", "results", "attrs", "loc", "parent", "__weakref__")

    def __init__(self, opcode: str, operands: Sequence[Value], results: Sequence[Value],
                 attrs: Mapping[str, Any] | None = None, loc: str | None = None) -> None:
        self.opcode = opcode
        self._operands: list[Value] = []
        self.results: list[Value] = list(results)
        self.attrs: Mapping[str, AttrValue] = MappingProxyType(
            {k: freeze_attr(v) for k, v in (attrs or {}).items()})
        self.loc = loc
        self.parent: Function | None = None
        for r in self.results:
            r.producer = self
        for v in operands:
            self._append_operand(v)

    @property
    def operands(self) -> tuple[Value, ...]:
        return tuple(self._operands)

    @property
    def result(self) -> Value:
        """The single result (raises for ops with several)."""
        if len(self.results) != 1:
            raise QirError(f"op {self.opcode} has {len(self.results)} results; use .results")
        return self.results[0]

    def _append_operand(self, v: Value) -> None:
        self._operands.append(v)
        v.uses.append((self, len(self._operands) - 1))

    def set_operand(self, index: int, new: Value) -> None:
        """Replace operand ``index`` by ``new``, keeping use lists right."""
        old = self._operands[index]
        old.uses.remove((self, index))
        self._operands[index] = new
        new.uses.append((self, index))

    def set_attrs(self, **changes: Any) -> None:
        """Replace attributes (``None`` resets one to its declared default). Attributes stay immutable values.

        For a registered op the result is checked and completed like ``add_op``'s, so an op
        never loses a declared attribute (compute functions index ``attrs`` directly).
        """
        from qir.ops import get_op, has_op  # the registry imports this module

        attrs = dict(self.attrs)
        for k, v in changes.items():
            if v is None:
                attrs.pop(k, None)
            else:
                attrs[k] = freeze_attr(v)
        if has_op(self.opcode):
            attrs = get_op(self.opcode).complete_attrs(attrs)
        self.attrs = MappingProxyType(attrs)

    def drop_operands(self) -> None:
        """Remove this op from its operands' use lists (done by :meth:`Function.erase_op`)."""
        for i, v in enumerate(self._operands):
            v.uses.remove((self, i))
        self._operands = []

    def __repr__(self) -> str:
        res = ", ".join(r.ref for r in self.results)
        args = ", ".join(v.ref for v in self._operands)
        return f"<Op {res} = {self.opcode} {args}>"


class Function:
    """A graph: typed inputs, ops in a valid order, outputs. Belongs to a :class:`Module`."""

    def __init__(self, name: str, module: Module | None = None) -> None:
        self.name = check_name(name, "function name")
        self.module = module
        self.inputs: list[Value] = []
        self.ops: list[Op] = []
        self.outputs: list[Value] = []
        self._names: set[str] = set()

    # -- building -----------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type)
        v._input_of = self
        self.inputs.append(v)
        return v

    def add_op(self, opcode: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None, *,
               result_types: Sequence[TensorType] | None = None, names: Sequence[str] | None = None,
               before: Op | None = None, after: Op | None = None, loc: str | None = None) -> Op:
        """Create an op and insert it (at the end, or ``before``/``after`` an existing op).

        Result types are inferred from the op's definition when not given; ops whose
        result type is a choice (``quantize``, ``cast``...) need ``result_types``.
        Result names default to a fresh name derived from the opcode.
        """
        from qir.ops import get_op  # the registry imports this module

        opdef = get_op(opcode)
        attrs = opdef.complete_attrs(dict(attrs or {}))
        for v in operands:
            self._check_visible(v, opcode)
        if result_types is None:
            result_types = opdef.infer([v.type for v in operands], attrs, None)
        if names is None:
            names = [opcode] * len(result_types)
        if len(names) != len(result_types):
            raise QirError(f"{opcode}: {len(result_types)} results but {len(names)} names")
        results = [Value(self._claim(n), t) for n, t in zip(names, result_types)]
        op = Op(opcode, operands, results, attrs, loc)
        self.insert_op(op, before=before, after=after)
        return op

    def insert_op(self, op: Op, *, before: Op | None = None, after: Op | None = None) -> None:
        """Insert an already built op (its result names must be free in this function)."""
        if op.parent is not None:
            raise QirError(f"{op!r} already belongs to function @{op.parent.name}")
        for r in op.results:
            if r.name not in self._names:
                self._claim(r.name)
        if before is not None and after is not None:
            raise QirError("give at most one of before= and after=")
        if before is not None:
            self.ops.insert(self._index(before), op)
        elif after is not None:
            self.ops.insert(self._index(after) + 1, op)
        else:
            self.ops.append(op)
        op.parent = self

    def erase_op(self, op: Op) -> None:
        """Remove ``op``; its results must have no uses left (replace them first)."""
        for r in op.results:
            if r.uses or any(o is r for o in self.outputs):
                users = ", ".join(u.opcode for u in r.users()) or "the function's outputs"
                raise QirError(f"cannot erase {op!r}: result {r.ref} is still used by {users}")
        self.ops.pop(self._index(op))
        op.drop_operands()
        op.parent = None
        for r in op.results:
            self._names.discard(r.name)

    def set_outputs(self, values: Iterable[Value]) -> None:
        values = list(values)
        for v in values:
            self._check_visible(v, "return")
        self.outputs = values

    def fresh_name(self, base: str) -> str:
        """A value name not yet used in this function: ``base``, else ``base.1``, ``base.2``..."""
        return _fresh(base, self._names)

    def replace_op(self, op: Op, opcode: str, operands: Sequence[Value]) -> Op:
        """Replace single-result ``op`` by an ``opcode`` op on ``operands`` with the same result type, name and
        location, in the same place (every use of the old result now uses the new one)."""
        result = op.result
        name = result.name
        new = self.add_op(opcode, list(operands), result_types=[result.type], names=[name + ".new"], before=op,
                          loc=op.loc)
        result.replace_all_uses_with(new.result)
        self.erase_op(op)
        self.rename(new.result, name)
        return new

    def rename(self, value: Value, new_name: str) -> None:
        """Rename a function value (inputs and op results; constants are renamed on the module)."""
        if value.is_constant:
            raise QirError("rename constants with Module.rename_constant")
        check_name(new_name, "value name")
        if new_name in self._names and new_name != value.name:
            raise QirError(f"value name %{new_name} is already used in @{self.name}")
        self._names.discard(value.name)
        self._names.add(new_name)
        value.name = new_name

    def _claim(self, name: str) -> str:
        name = self.fresh_name(check_name(name, "value name"))
        self._names.add(name)
        return name

    def _index(self, op: Op) -> int:
        for i, o in enumerate(self.ops):
            if o is op:
                return i
        raise QirError(f"{op!r} is not in function @{self.name}")

    def _check_visible(self, v: Value, user: str) -> None:
        if v.is_constant:
            if self.module is not None and self.module.constants.get(v.name) is not v:
                raise QirError(f"{user}: constant {v.ref} does not belong to this function's module")
            return
        owner = v._function()
        if owner is not self:
            where = f"@{owner.name}" if owner else "no function"
            raise QirError(f"{user}: value {v.ref} belongs to {where}, not @{self.name}")

    # -- queries --------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        """Inputs, then every op result in order."""
        yield from self.inputs
        for op in self.ops:
            yield from op.results

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise QirError(f"no value %{name} in function @{self.name}")

    def find_ops(self, opcode: str) -> list[Op]:
        return [op for op in self.ops if op.opcode == opcode]

    def topological_order(self) -> list[Op]:
        """Ops in an order where every operand is defined before use (stable: keeps the current order
        where it already is valid). Raises on a cycle."""
        import networkx as nx

        g = self.to_networkx()
        position = {id(op): i for i, op in enumerate(self.ops)}
        try:
            order = list(nx.lexicographical_topological_sort(g, key=lambda n: position[n]))
        except nx.NetworkXUnfeasible:
            raise QirError(f"function @{self.name} has a cycle") from None
        by_id = {id(op): op for op in self.ops}
        return [by_id[n] for n in order]

    def to_networkx(self) -> networkx.DiGraph:
        """A ``networkx.DiGraph`` with one node per op (keyed by ``id(op)``, attribute ``op``) and an edge
        from producer to user for every operand (attribute ``value``)."""
        import networkx as nx

        g = nx.DiGraph()
        for op in self.ops:
            g.add_node(id(op), op=op, label=f"{op.opcode} {', '.join(r.ref for r in op.results)}")
        for op in self.ops:
            for v in op.operands:
                if v.producer is not None and v.producer.parent is self:
                    g.add_edge(id(v.producer), id(op), value=v.name)
        return g

    def __repr__(self) -> str:
        return f"<Function @{self.name}: {len(self.inputs)} inputs, {len(self.ops)} ops>"


class Module:
    """Named constants shared by named functions; the unit that is printed, saved and compiled."""

    def __init__(self, name: str = "module") -> None:
        self.name = check_name(name, "module name")
        self.constants: dict[str, Constant] = {}
        self.functions: dict[str, Function] = {}

    def add_function(self, name: str) -> Function:
        if name in self.functions:
            raise QirError(f"module @{self.name} already has a function @{name}")
        f = Function(name, self)
        self.functions[name] = f
        return f

    def add_constant(self, name: str, data: np.ndarray | LazyArray | None = None, *,
                     type: TensorType | None = None, after: str | None = None) -> Constant:
        """Add a named constant. ``type`` defaults to the array's dtype and shape; give it for quantized
        constants (their data are the integer codes) and for data that is not loaded."""
        check_name(name, "constant name")
        if name in self.constants:
            raise QirError(f"module @{self.name} already has a constant @{name}")
        if type is None:
            if data is None:
                raise QirError(f"constant @{name}: give its type when it has no data")
            from qir.dtypes import from_numpy

            arr_dtype = data.dtype if isinstance(data, np.ndarray) else data.dtype
            type = TensorType(from_numpy(arr_dtype), tuple(data.shape))
        c = Constant(name, type, data)
        if after is None:
            self.constants[name] = c
        else:
            if after not in self.constants:
                raise QirError(f"no constant @{after} to insert @{name} after")
            items = list(self.constants.items())
            pos = [k for k, _ in items].index(after) + 1
            items.insert(pos, (name, c))
            self.constants = dict(items)
        return c

    def fresh_constant_name(self, base: str) -> str:
        """A constant name not yet used: ``base``, else ``base.1``, ``base.2``..."""
        return _fresh(base, self.constants)

    def remove_constant(self, name: str) -> None:
        c = self.constant(name)
        if c.uses:
            raise QirError(f"cannot remove constant @{name}: used by {', '.join(o.opcode for o in c.users())}")
        refs = self.spec_references().get(name)
        if refs:
            raise QirError(f"cannot remove constant @{name}: the quantized type of {refs[0]} refers to it")
        del self.constants[name]

    def rename_constant(self, old: str, new: str) -> None:
        """Rename a constant and every quantization spec that refers to it."""
        from dataclasses import replace

        c = self.constant(old)
        check_name(new, "constant name")
        if new in self.constants:
            raise QirError(f"constant @{new} already exists")
        c.name = new
        self.constants = {(new if k == old else k): v for k, v in self.constants.items()}
        mapping = {old: new}
        for v in self._all_typed_values():
            if v.type.quant is not None and old in v.type.quant.constant_refs:
                v.type = replace(v.type, quant=v.type.quant.rename_refs(mapping))

    def constant(self, name: str) -> Constant:
        try:
            return self.constants[name]
        except KeyError:
            raise QirError(f"no constant @{name} in module @{self.name}") from None

    def spec_references(self) -> dict[str, list[str]]:
        """For each constant name, the values whose quantized types refer to it (as scale or zero point)."""
        refs: dict[str, list[str]] = {}
        for v in self._all_typed_values():
            if v.type.quant is not None:
                for r in v.type.quant.constant_refs:
                    refs.setdefault(r, []).append(v.ref)
        return refs

    def _all_typed_values(self) -> Iterator[Value]:
        yield from self.constants.values()
        for f in self.functions.values():
            yield from f.values()

    @property
    def main(self) -> Function:
        """The function named ``main``, or the only function."""
        if "main" in self.functions:
            return self.functions["main"]
        if len(self.functions) == 1:
            return next(iter(self.functions.values()))
        raise QirError(f"module @{self.name} has no function @main; it has {', '.join(self.functions)}")

    def function(self, name: str | None = None) -> Function:
        if name is None:
            return self.main
        try:
            return self.functions[name]
        except KeyError:
            raise QirError(f"no function @{name} in module @{self.name} "
                           f"(functions: {', '.join(self.functions) or 'none'})") from None

    def clone(self) -> Module:
        """A structural copy: new values and ops, same constant data (arrays are treated as immutable)."""
        new = Module(self.name)
        cmap: dict[int, Value] = {}
        for name, c in self.constants.items():
            nc = Constant(name, c.type, c.data)
            new.constants[name] = nc
            cmap[id(c)] = nc
        for fname, f in self.functions.items():
            nf = new.add_function(fname)
            vmap = dict(cmap)
            for v in f.inputs:
                vmap[id(v)] = nf.add_input(v.name, v.type)
            for op in f.ops:
                results = [Value(r.name, r.type) for r in op.results]
                nop = Op(op.opcode, [vmap[id(v)] for v in op.operands], results, op.attrs, op.loc)
                nf.insert_op(nop)
                for r, nr in zip(op.results, results):
                    vmap[id(r)] = nr
            nf.outputs = [vmap[id(v)] for v in f.outputs]
        return new

    def __repr__(self) -> str:
        return f"<Module @{self.name}: {len(self.constants)} constants, functions {list(self.functions)}>"
