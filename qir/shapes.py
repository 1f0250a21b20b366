"""Dimensions and shapes, with symbolic sizes.

A dimension is either a non-negative ``int`` or a :class:`SymDim`: an integer
linear expression over named sizes, such as ``seq``, ``past+1`` or ``2*seq``.
Symbolic sizes come from ``torch.export`` (a dynamic sequence length) and from
decode graphs, whose cache grows by one position (``past+1``).

``SymDim`` is kept in a canonical form (terms sorted by name, the constant
last), so two equal expressions compare and print equal. A ``SymDim`` whose
expression reduces to a plain number is returned as ``int`` by :func:`dim`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qir.errors import QirError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*|\d+)\s*")


@dataclass(frozen=True, order=True)
class SymDim:
    """``sum(coef * name) + const``; ``terms`` is sorted by name and has no zero coefficient."""

    terms: tuple[tuple[str, int], ...]
    const: int = 0

    def __str__(self) -> str:
        parts: list[str] = []
        for name, coef in self.terms:
            sign = "-" if coef < 0 else "+"
            mag = abs(coef)
            body = name if mag == 1 else f"{mag}*{name}"
            parts.append(f"{sign}{body}")
        if self.const:
            parts.append(f"{'-' if self.const < 0 else '+'}{abs(self.const)}")
        text = "".join(parts)
        return text[1:] if text.startswith("+") else text

    def __repr__(self) -> str:
        return f"SymDim({str(self)!r})"

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.terms)


Dim = int | SymDim
Shape = tuple[Dim, ...]


def _make(coefs: dict[str, int], const: int) -> Dim:
    terms = tuple(sorted((n, c) for n, c in coefs.items() if c != 0))
    if not terms:
        return const
    return SymDim(terms, const)


def _coefs(d: Dim) -> tuple[dict[str, int], int]:
    if isinstance(d, int):
        return {}, d
    return dict(d.terms), d.const


def dim(value: int | str | SymDim) -> Dim:
    """Parse a dimension: an int, a name (``"seq"``) or a linear expression (``"past+1"``)."""
    if isinstance(value, SymDim):
        return value
    if isinstance(value, bool):
        raise QirError(f"dimension must be an int or a symbolic expression, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise QirError(f"dimension must be >= 0, got {value}")
        return value
    if not isinstance(value, str) or not value.strip():
        raise QirError(f"dimension must be an int or a symbolic expression, not {value!r}")
    text = value.strip()
    pos = 0
    coefs: dict[str, int] = {}
    const = 0
    first = True
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (not first and m.group(1) is None):
            raise QirError(f"bad symbolic dimension {value!r}: expected terms like 'seq', '2*seq' or 'past+1'")
        sign = -1 if m.group(1) == "-" else 1
        mult = int(m.group(2)) if m.group(2) else 1
        atom = m.group(3)
        if atom.isdigit():
            if m.group(2):
                raise QirError(f"bad symbolic dimension {value!r}: a product needs a name on the right")
            const += sign * int(atom)
        else:
            coefs[atom] = coefs.get(atom, 0) + sign * mult
        pos = m.end()
        first = False
    return _make(coefs, const)


def add(a: Dim, b: Dim) -> Dim:
    """``a + b`` for dimensions (used by concat and cache growth)."""
    ca, ka = _coefs(a)
    cb, kb = _coefs(b)
    for n, c in cb.items():
        ca[n] = ca.get(n, 0) + c
    return _make(ca, ka + kb)


def sub(a: Dim, b: Dim) -> Dim:
    """``a - b`` for dimensions."""
    cb, kb = _coefs(b)
    return add(a, _make({n: -c for n, c in cb.items()}, -kb))


def mul(a: Dim, k: int) -> Dim:
    """``a * k`` for an integer ``k``."""
    ca, ka = _coefs(a)
    return _make({n: c * k for n, c in ca.items()}, ka * k)


def is_static(shape: Shape) -> bool:
    """True when every dimension is a plain int."""
    return all(isinstance(d, int) for d in shape)


def numel(shape: Shape) -> Dim:
    """Number of elements: an int when static; for symbolic shapes raises."""
    n = 1
    for d in shape:
        if not isinstance(d, int):
            raise QirError(f"shape {format_shape(shape)} has a symbolic size; its element count is not a number")
        n *= d
    return n


def evaluate(d: Dim, bindings: dict[str, int]) -> int:
    """The value of ``d`` with its symbols bound (raises naming an unbound symbol)."""
    if isinstance(d, int):
        return d
    total = d.const
    for name, coef in d.terms:
        if name not in bindings:
            raise QirError(f"symbolic size {name!r} has no value (known: {sorted(bindings)})")
        total += coef * bindings[name]
    return total


def bind(shape: Shape, concrete: tuple[int, ...], bindings: dict[str, int]) -> None:
    """Match a concrete shape against ``shape``, filling ``bindings``; raises on mismatch.

    A dimension that is a single symbol with coefficient 1 (``seq``, ``past+1``)
    binds that symbol; other dimensions must evaluate to the concrete size.
    """
    if len(shape) != len(concrete):
        raise QirError(f"rank mismatch: expected {format_shape(shape)}, got {list(concrete)}")
    pending = []
    for d, c in zip(shape, concrete):
        if isinstance(d, SymDim) and len(d.terms) == 1 and d.terms[0][1] == 1 and d.terms[0][0] not in bindings:
            bindings[d.terms[0][0]] = c - d.const
        else:
            pending.append((d, c))
    for d, c in pending:
        if evaluate(d, bindings) != c:
            raise QirError(f"size mismatch: expected {format_shape(shape)} (with {bindings}), got {list(concrete)}")


def format_dim(d: Dim) -> str:
    return str(d)


def format_shape(shape: Shape) -> str:
    return "[" + ",".join(format_dim(d) for d in shape) + "]"


def is_name(text: str) -> bool:
    """True if ``text`` is a valid symbol name."""
    return bool(_NAME.fullmatch(text))


def broadcast(a: Shape, b: Shape) -> Shape:
    """Numpy broadcasting of two shapes (symbolic sizes broadcast only with 1 or themselves)."""
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise QirError(f"shapes {format_shape(a)} and {format_shape(b)} do not broadcast")
    return tuple(reversed(out))
