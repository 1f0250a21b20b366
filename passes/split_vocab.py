"""The ``split-vocab`` pass: an embedding table (and its tied head) split into frequent and rare rows.

``split-vocab{hot=8192, order=calib|id, min_rows=1024}``

Frequency-aware rows (source document 000): a token's row matters in proportion to how often the token is read
(the lookup) or is the answer (the head), and in an LLM's vocabulary a few thousand tokens cover most text. This
pass splits a ``[V, D]`` table into ``@<T>.hot : [hot, D]`` (the ``hot`` most frequent tokens) and
``@<T>.cold : [V - hot, D]`` (the rest), two ordinary tables, so that ``quantize`` / ``mixed-precision`` can give
them different formats -- e.g. ``quantize{...,overrides="*.hot=i8;*.cold=u2g32"}`` -- and the IR shows which is
which. Nothing is rounded here: the split alone is exact.

``order=calib`` (default) ranks tokens by their count in the calibration feeds (``--calib-text FILE``; ties and
unseen tokens by id); ``order=id`` takes the lowest ids, the BPE / WordPiece merge order, which follows the
frequency in the tokenizer's own training text -- no calibration needed and no index map stored. Within each
part rows keep id order. With ``order=calib`` one map ``@<T>.slot : i32[V]`` gives each token's row in the
concatenation ``[hot; cold]``; with ``order=id`` that row is the id itself.

Only existing ops are used, so every backend lowers the result. The lookup ``embedding @T, %ids`` becomes::

    %h.slot = gather @T.slot, %ids                 : i32[1,seq]        (order=calib only; else %ids)
    %h.ishot = lt %h.slot, @T.split                : bool[1,seq]       (@T.split = hot)
    %h.ih = minimum %h.slot, @T.split_last         : i32[1,seq]        (@T.split_last = hot - 1)
    %h.ic0 = maximum %h.slot, @T.split             : i32[1,seq]
    %h.ic = sub %h.ic0, @T.split                   : i32[1,seq]
    %h.hot = embedding @T.hot, %h.ih               : f32[1,seq,D]
    %h.cold = embedding @T.cold, %h.ic             : f32[1,seq,D]
    %h.sel = unsqueeze %h.ishot {axis=2}           : bool[1,seq,1]
    %h = where %h.sel, %h.hot, %h.cold             : f32[1,seq,D]

and the tied head ``linear %x, @T``::

    %l.hot = linear %x, @T.hot                     : f32[1,seq,hot]
    %l.cold = linear %x, @T.cold                   : f32[1,seq,V-hot]
    %l.cat = concat %l.hot, %l.cold {axis=2}       : f32[1,seq,V]
    %l = gather %l.cat, @T.slot {axis=2}           : f32[1,seq,V]      (order=calib only)

Both lookups run for every token (the unused one reads a valid row and is discarded): two ``[seq, D]`` reads
instead of one, nothing next to the head's ``[seq, V]`` product. A following ``quantize`` treats both parts as
tied embedding tables (``embedding`` / ``head`` / per-name ``overrides``). Tables with fewer than ``min_rows`` rows,
or no more rows than ``hot``, are left alone; a table read by anything other than lookups and a bias-free
linear head is an error that names the reader.

Before::

    const @emb : f32[6,2] = dense(...)
    func @main(%ids: i64[1,seq], %x: f32[1,seq,2]) -> (f32[1,seq,2], f32[1,seq,6]) {
      %h = embedding @emb, %ids : f32[1,seq,2]
      %l = linear %x, @emb : f32[1,seq,6]
      return %h, %l
    }

After ``split-vocab{hot=2,order=id,min_rows=1}``::

    const @emb.hot : f32[2,2] = dense(...)
    const @emb.cold : f32[4,2] = dense(...)
    const @emb.split : i64[] = dense(2)
    const @emb.split_last : i64[] = dense(1)
    func @main(%ids: i64[1,seq], %x: f32[1,seq,2]) -> (f32[1,seq,2], f32[1,seq,6]) {
      %h.ishot = lt %ids, @emb.split : bool[1,seq]
      ...
      %h = where %h.sel, %h.hot, %h.cold : f32[1,seq,2]
      %l.hot = linear %x, @emb.hot : f32[1,seq,2]
      %l.cold = linear %x, @emb.cold : f32[1,seq,4]
      %l = concat %l.hot, %l.cold {axis=2} : f32[1,seq,6]
      return %h, %l
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.passes.tables import calibration_token_counts, float_tables, table_readers

__all__ = ["SplitVocab", "hot_tokens"]


def hot_tokens(counts: np.ndarray | None, vocab: int, hot: int) -> np.ndarray:
    """The ``hot`` most frequent token ids (sorted): by ``counts`` (ties and unseen tokens by id), or lowest ids."""
    if counts is None:
        return np.arange(min(hot, vocab), dtype=np.int64)
    order = np.argsort(-np.asarray(counts), kind="stable")[:hot]  # stable: ties keep id order
    return np.sort(order)


@register_pass
@dataclass
class SplitVocab(Pass):
    """Split embedding tables (and tied heads) into frequent and rare rows, so each part gets its own format."""

    name = "split-vocab"
    hot: int = 8192
    order: Literal["calib", "id"] = "calib"
    min_rows: int = 1024

    def run(self, module: Module) -> None:
        if self.hot < 1:
            raise QirError(f"split-vocab: hot must be >= 1 (rows kept in the frequent part), got {self.hot}")
        for tname, lookups in float_tables(module).items():
            self._split(module, tname, lookups)

    def _split(self, module: Module, tname: str, lookups: list[tuple[Function, Op]]) -> None:
        const = module.constant(tname)
        shape = const.type.shape
        if const.type.rank != 2 or not all(isinstance(d, int) for d in shape):
            raise QirError(f"split-vocab: table @{tname} is {const.type}; only static [vocab, dim] tables split")
        vocab = int(shape[0])
        if vocab < self.min_rows or vocab <= self.hot:
            return
        if not const.has_data:
            raise QirError(f"split-vocab: table @{tname} has no data (read without its .safetensors file); load the "
                           "module with qir.load")
        heads, others = table_readers(const)
        if others:
            raise QirError(f"split-vocab: @{tname} is also read by {', '.join(others)}; only embedding lookups and a "
                           "bias-free linear head can be rewritten onto the split table")

        counts = None
        if self.order == "calib":
            counts = calibration_token_counts(
                self.context, lookups, vocab, owner="split-vocab", hint=", or use order=id",
                purpose="split-vocab{order=calib} (token frequencies; order=id needs none)")
        hot = hot_tokens(counts, vocab, self.hot)
        is_hot = np.zeros(vocab, dtype=bool)
        is_hot[hot] = True
        cold = np.flatnonzero(~is_hot)
        table = const.numpy()
        hot_c = module.add_constant(module.fresh_constant_name(f"{tname}.hot"),
                                    np.ascontiguousarray(table[hot]), after=tname)
        cold_c = module.add_constant(module.fresh_constant_name(f"{tname}.cold"),
                                     np.ascontiguousarray(table[cold]), after=hot_c.name)
        slot: Constant | None = None
        if counts is not None:
            pos = np.empty(vocab, dtype=np.int32)
            pos[hot] = np.arange(len(hot), dtype=np.int32)
            pos[cold] = len(hot) + np.arange(len(cold), dtype=np.int32)
            slot = module.add_constant(module.fresh_constant_name(f"{tname}.slot"), pos, after=cold_c.name)
        scalars: dict[str, tuple[Constant, Constant]] = {}

        def bounds(np_dtype: np.dtype) -> tuple[Constant, Constant]:
            """``(@T.split, @T.split_last)`` in the dtype of the slot values (one pair per dtype)."""
            key = np.dtype(np_dtype).name
            if key not in scalars:
                suffix = "" if not scalars else f".{key}"
                split = module.add_constant(module.fresh_constant_name(f"{tname}.split{suffix}"),
                                            np.asarray(len(hot), dtype=np_dtype))
                last = module.add_constant(module.fresh_constant_name(f"{tname}.split_last{suffix}"),
                                           np.asarray(len(hot) - 1, dtype=np_dtype))
                scalars[key] = (split, last)
            return scalars[key]

        for func, op in lookups:
            self._rewrite_lookup(func, op, hot_c, cold_c, slot, bounds)
        for func, op in heads:
            self._rewrite_head(func, op, hot_c, cold_c, slot)
        if not const.uses and not module.spec_references().get(tname):
            module.remove_constant(tname)

    @staticmethod
    def _rewrite_lookup(func: Function, op: Op, hot: Value, cold: Value, slot: Value | None, bounds: object) -> None:
        result = op.result
        name = result.name
        ids = op.operands[1]
        if not ids.type.dtype.is_integer:
            raise QirError(f"split-vocab: the lookup %{name} in @{func.name} reads ids of type {ids.type}; "
                           "integer ids expected")

        def add(opcode: str, operands: list[Value], suffix: str, attrs: dict[str, object] | None = None) -> Value:
            return func.add_op(opcode, operands, attrs, names=[f"{name}.{suffix}"], before=op, loc=op.loc).result

        pos = ids if slot is None else add("gather", [slot, ids], "slot", {"axis": 0})
        split, last = bounds(pos.type.dtype.numpy)  # type: ignore[operator]
        is_hot = add("lt", [pos, split], "ishot")
        hot_ix = add("minimum", [pos, last], "ih")
        cold_ix = add("sub", [add("maximum", [pos, split], "ic0"), split], "ic")
        rows_hot = add("embedding", [hot, hot_ix], "hot")
        rows_cold = add("embedding", [cold, cold_ix], "cold")
        sel = add("unsqueeze", [is_hot], "sel", {"axis": ids.type.rank})
        out = add("where", [sel, rows_hot, rows_cold], "new")
        result.replace_all_uses_with(out)
        func.erase_op(op)
        func.rename(out, name)

    @staticmethod
    def _rewrite_head(func: Function, op: Op, hot: Value, cold: Value, slot: Value | None) -> None:
        result = op.result
        name = result.name
        x = op.operands[0]
        axis = result.type.rank - 1
        lh = func.add_op("linear", [x, hot], names=[name + ".hot"], before=op, loc=op.loc).result
        lc = func.add_op("linear", [x, cold], names=[name + ".cold"], before=op, loc=op.loc).result
        out = func.add_op("concat", [lh, lc], {"axis": axis}, names=[name + ".cat"], before=op, loc=op.loc).result
        if slot is not None:
            out = func.add_op("gather", [out, slot], {"axis": axis}, names=[name + ".new"], before=op,
                              loc=op.loc).result
        result.replace_all_uses_with(out)
        func.erase_op(op)
        func.rename(out, name)
