"""Pattern rewriting: match an op kind, replace or erase it, repeat until nothing changes.

A :class:`RewritePattern` names the opcode it looks at and implements
``match_and_rewrite(op, rewriter) -> bool`` (True when it changed the IR).
:func:`apply_patterns` sweeps every function until a sweep changes nothing, and
raises :class:`RewriteDidNotConvergeError` after ``max_sweeps`` sweeps, naming the
patterns that were still firing — a rewrite that undoes another never hangs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qir.errors import QirError
from qir.graph import Function, Module, Op, Value
from qir.types import TensorType


class RewriteDidNotConvergeError(QirError):
    """Patterns kept changing the IR for ``max_sweeps`` sweeps."""


class Rewriter:
    """The edits a pattern may make, all through the graph core (use lists stay right)."""

    def __init__(self, func: Function) -> None:
        self.func = func

    def create(self, opcode: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None, *,
               before: Op, result_types: Sequence[TensorType] | None = None,
               names: Sequence[str] | None = None) -> Op:
        """A new op inserted before ``before`` (keeps its location unless given another)."""
        return self.func.add_op(opcode, operands, attrs, result_types=result_types, names=names, before=before,
                                loc=before.loc)

    def replace_op(self, op: Op, new_values: Sequence[Value]) -> None:
        """Make every use of ``op``'s results use ``new_values`` instead, then erase ``op``."""
        if len(new_values) != len(op.results):
            raise QirError(f"replace_op: {op.opcode} has {len(op.results)} results, got {len(new_values)} values")
        for old, new in zip(op.results, new_values):
            old.replace_all_uses_with(new)
        self.func.erase_op(op)

    def erase_op(self, op: Op) -> None:
        self.func.erase_op(op)


class RewritePattern:
    """Subclass and set ``opcode`` (``None`` matches every op)."""

    opcode: str | None = None

    def match_and_rewrite(self, op: Op, rewriter: Rewriter) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def apply_patterns(target: Module | Function, patterns: Sequence[RewritePattern], *, max_sweeps: int = 32) -> bool:
    """Apply ``patterns`` to a fixed point; returns whether anything changed."""
    funcs = list(target.functions.values()) if isinstance(target, Module) else [target]
    changed_any = False
    for func in funcs:
        rewriter = Rewriter(func)
        for _sweep in range(max_sweeps):
            fired: list[str] = []
            for op in list(func.ops):
                if op.parent is not func:  # erased by an earlier rewrite in this sweep
                    continue
                for pat in patterns:
                    if pat.opcode is not None and pat.opcode != op.opcode:
                        continue
                    if pat.match_and_rewrite(op, rewriter):
                        fired.append(type(pat).__name__)
                        break
            if not fired:
                break
            changed_any = True
        else:
            raise RewriteDidNotConvergeError(
                f"rewrite patterns did not converge in @{func.name} after {max_sweeps} sweeps; still firing: "
                f"{', '.join(sorted(set(fired)))}")
    return changed_any
