"""The op registry: one :class:`OpDef` per opcode, declaring everything qir knows about an op.

An ``OpDef`` says what operands the op takes, which attributes (with kinds and
defaults, in the fixed order the printer uses), how to infer result types, and
the numpy reference semantics the interpreter runs. Backends and passes look
ops up here; nothing else in qir hard-codes an op's signature.

Operand names ending in ``?`` are optional (they may be left off at the end);
a name starting with ``*`` takes any number of values (only as the last one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qir.errors import QirError
from qir.types import TensorType

if TYPE_CHECKING:
    from qir.interpreter import RunContext

REQUIRED: Any = object()
"""Default marker of an attribute that must be given."""

ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dims", "int?", "float?", "str?")
"""Attribute kinds. ``dims`` is a list of ints and symbolic sizes (as strings); ``?`` allows None."""


@dataclass(frozen=True)
class Attr:
    """An attribute declaration: name, kind (one of :data:`ATTR_KINDS`), default (or :data:`REQUIRED`)."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise QirError(f"attribute {self.name}: unknown kind {self.kind!r} (kinds: {', '.join(ATTR_KINDS)})")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, opcode: str, value: Any) -> Any:
        """Return ``value`` converted to this attribute's kind, or raise naming op, attribute and kind."""
        kind = self.kind
        if kind.endswith("?"):
            if value is None:
                return None
            kind = kind[:-1]
        ok: bool
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = isinstance(value, float)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "ints":
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
            value = tuple(value) if ok else value
        elif kind == "floats":
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            value = tuple(float(v) for v in value) if ok else value
        elif kind == "dims":
            ok = isinstance(value, (list, tuple)) and all(
                (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:  # pragma: no cover - guarded by __post_init__
            ok = False
        if not ok:
            raise QirError(f"op {opcode}: attribute {self.name} must be {self.kind}, got {value!r}")
        return value


InferFn = Callable[[Sequence[TensorType], Mapping[str, Any], "Sequence[TensorType] | None"], list[TensorType]]
ComputeFn = Callable[["RunContext", Sequence[Any], Mapping[str, Any], Sequence[TensorType]], list[Any]]


@dataclass(frozen=True)
class OpDef:
    """Everything qir knows about one opcode.

    ``infer(operand_types, attrs, declared)`` returns the result types. ``declared``
    is the result types written in the IR (``None`` when an op is being built):
    ops whose result type is a choice (``quantize``, ``cast``) check and return it,
    and raise when it is missing.

    ``compute(ctx, args, attrs, result_types)`` is the numpy reference semantics;
    ``args`` are ``numpy.ndarray`` for plain tensors and :class:`qir.quant.QTensor`
    for quantized ones.
    """

    name: str
    operands: tuple[str, ...]
    attrs: tuple[Attr, ...]
    infer: InferFn
    compute: ComputeFn
    num_results: int = 1
    doc: str = ""
    category: str = "core"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def min_operands(self) -> int:
        return sum(1 for o in self.operands if not o.endswith("?") and not o.startswith("*"))

    @property
    def max_operands(self) -> int | None:
        return None if any(o.startswith("*") for o in self.operands) else len(self.operands)

    def attr(self, name: str) -> Attr:
        for a in self.attrs:
            if a.name == name:
                return a
        raise QirError(f"op {self.name} has no attribute {name!r} (attributes: "
                       f"{', '.join(a.name for a in self.attrs) or 'none'})")

    def complete_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``attrs`` against the declaration and fill in defaults, in declaration order."""
        unknown = [k for k in attrs if k not in {a.name for a in self.attrs}]
        if unknown:
            raise QirError(f"op {self.name}: unknown attribute {unknown[0]!r} (attributes: "
                           f"{', '.join(a.name for a in self.attrs) or 'none'})")
        out: dict[str, Any] = {}
        for a in self.attrs:
            if a.name in attrs:
                out[a.name] = a.check(self.name, attrs[a.name])
            elif a.required:
                raise QirError(f"op {self.name}: missing required attribute {a.name!r} ({a.kind})")
            else:
                out[a.name] = a.default
        return out

    def check_arity(self, count: int) -> None:
        hi = self.max_operands
        if count < self.min_operands or (hi is not None and count > hi):
            want = f"{self.min_operands}" if hi == self.min_operands else (
                f"{self.min_operands} or more" if hi is None else f"{self.min_operands} to {hi}")
            raise QirError(f"op {self.name} takes {want} operands ({', '.join(self.operands)}), got {count}")


_REGISTRY: dict[str, OpDef] = {}


def register_op(opdef: OpDef, *, replace: bool = False) -> OpDef:
    """Add ``opdef`` to the registry (``replace=True`` to override an existing definition)."""
    if opdef.name in _REGISTRY and not replace:
        raise QirError(f"op {opdef.name!r} is already registered")
    _REGISTRY[opdef.name] = opdef
    return opdef


def unregister_op(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins that register temporary ops)."""
    if name not in _REGISTRY:
        raise QirError(f"op {name!r} is not registered")
    del _REGISTRY[name]


def get_op(name: str) -> OpDef:
    """The definition of ``name``; raises with the list of known ops."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QirError(f"unknown op {name!r}; known ops: {', '.join(sorted(_REGISTRY))}") from None


def has_op(name: str) -> bool:
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    """A copy of the registry, by name."""
    return dict(_REGISTRY)
