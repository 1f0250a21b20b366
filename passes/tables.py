"""Embedding tables as the vocabulary passes see them: which constants are tables, who reads them, token counts.

``vocab-share`` and ``split-vocab`` both rewrite a float ``[vocab, dim]`` table together with every op that reads
it: its ``embedding`` lookups and a tied, bias-free ``linear`` head. This module finds those tables and readers and
counts token ids in the calibration feeds, so the two passes agree on what a table and its users are.
"""

from __future__ import annotations

import numpy as np

from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op
from qir.passes.context import PassContext

__all__ = ["Lookups", "calibration_token_counts", "float_tables", "table_readers", "token_counts"]

#: The ``embedding`` ops that read one table, with their functions.
Lookups = list[tuple[Function, Op]]


def float_tables(module: Module) -> dict[str, Lookups]:
    """Every float, unquantized constant read as an ``embedding`` table, with the lookups that read it."""
    tables: dict[str, Lookups] = {}
    for func in module.functions.values():
        for op in func.find_ops("embedding"):
            t = op.operands[0]
            if t.is_constant and t.type.quant is None and t.type.dtype.is_float:
                tables.setdefault(t.name, []).append((func, op))
    return tables


def table_readers(const: Constant) -> tuple[Lookups, list[str]]:
    """``(heads, others)`` of a table: its bias-free ``linear`` heads, and every reader that is neither a head nor a
    lookup, described as ``"opcode %result in @function"`` for an error message."""
    heads: Lookups = []
    others: list[str] = []
    for op, index in list(const.uses):
        if op.opcode == "embedding" and index == 0:
            continue
        if op.opcode == "linear" and len(op.operands) == 2 and index == 1:
            heads.append((op.parent, op))
        else:
            others.append(f"{op.opcode} %{op.results[0].name} in @{op.parent.name}")
    return heads, others


def token_counts(feeds: list[dict[str, np.ndarray]], names: set[str], vocab: int) -> np.ndarray:
    """How often each id in ``[0, vocab)`` occurs in the feeds' inputs named ``names``."""
    counts = np.zeros(vocab, dtype=np.int64)
    for feed in feeds:
        for name in names:
            if name in feed:
                ids = np.asarray(feed[name]).reshape(-1).astype(np.int64)
                ids = ids[(ids >= 0) & (ids < vocab)]
                counts += np.bincount(ids, minlength=vocab)
    return counts


def calibration_token_counts(context: PassContext, lookups: Lookups, vocab: int, *, owner: str, purpose: str,
                             hint: str = "") -> np.ndarray:
    """Token counts of the lookups' id inputs over the calibration feeds; an error naming them when none occur.

    ``purpose`` says why the pass needs feeds (the missing-data message); ``hint`` is appended to the error.
    """
    names = {op.operands[1].name for _, op in lookups if not op.operands[1].is_constant}
    counts = token_counts(list(context.batches(purpose)), names, vocab)
    if not counts.any():
        raise QirError(f"{owner}: the calibration feeds have no ids for the lookup inputs "
                       f"{', '.join('%' + n for n in sorted(names))}; give feeds of the function with the lookup"
                       + hint)
    return counts
