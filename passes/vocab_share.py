"""The ``vocab-share`` pass: compress an embedding table (and its tied head) by sharing rows between rare tokens.

``vocab-share{clusters=K, keep=N, residual_bits=B, head=shared|separate, iters=4, seed=0, min_rows=1024}``

The ``keep`` most frequent tokens of the calibration text (token ids read from the ``PassContext`` feeds, i.e.
``--calib-text FILE``) keep their own rows; every other row is replaced by the nearest of ``clusters`` k-means
centroids (seeded Lloyd iterations in numpy, ``iters`` of them, initialised from distinct rows) plus, when
``residual_bits`` is 2, 4 or 8, a per-token residual ``row - centroid`` stored as ``i<B>`` codes with one f32 scale
per row, chosen for least squared error (clipping; see :func:`residual_quantize`; kept tokens have a zero
residual). The kept rows and the centroids share ONE table ``@<T>.codebook : f32[keep+K, D]``;
``@<T>.index : i32[V]`` maps each token to its codebook row.

Only existing ops are used. The lookup ``embedding @T, %ids`` becomes::

    %ids.vs   = gather @T.index, %ids                  : i32[1,seq]
    %h.cb     = embedding @T.codebook, %ids.vs         : f32[1,seq,D]
    %h.res    = qembedding @T.residual, %ids           : f32[1,seq,D]
    %h        = add %h.cb, %h.res                      : f32[1,seq,D]

and the tied head ``linear %x, @T`` (``head=shared``, the default) becomes::

    %l.cb     = linear %x, @T.codebook                 : f32[1,seq,keep+K]
    %l.full   = gather %l.cb, @T.index {axis=2}        : f32[1,seq,V]
    %l.res    = qmatmul %x, @T.residual                : f32[1,seq,V]
    %l        = add %l.full, %l.res                    : f32[1,seq,V]

(codebook logits expanded through the index map, plus the residual correction: exactly ``x @ (codebook[index] +
residual).T``). ``head=separate`` leaves the head reading the original table (which then stays), so only the
lookup is compressed. A following ``quantize`` treats ``@T.codebook`` as a (tied) embedding table and quantizes it
like any other (``embedding=i8,head=i8``). Tables with fewer than ``min_rows`` rows, or no more rows than
``keep + clusters``, are left alone.

Before::

    const @emb : f32[6,2] = dense(...)
    func @main(%ids: i64[1,seq], %x: f32[1,seq,2]) -> (f32[1,seq,2], f32[1,seq,6]) {
      %h = embedding @emb, %ids : f32[1,seq,2]
      %l = linear %x, @emb : f32[1,seq,6]
      return %h, %l
    }

After ``vocab-share{clusters=2,keep=1,residual_bits=0,min_rows=1}``::

    const @emb.codebook : f32[3,2] = dense(...)
    const @emb.index : i32[6] = dense(...)
    func @main(%ids: i64[1,seq], %x: f32[1,seq,2]) -> (f32[1,seq,2], f32[1,seq,6]) {
      %h.vs = gather @emb.index, %ids : i32[1,seq]
      %h = embedding @emb.codebook, %h.vs : f32[1,seq,2]
      %l.cb = linear %x, @emb.codebook : f32[1,seq,3]
      %l = gather %l.cb, @emb.index {axis=2} : f32[1,seq,6]
      return %h, %l
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qir.dtypes import dtype
from qir.errors import QirError
from qir.graph import Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.passes.tables import calibration_token_counts, float_tables, table_readers, token_counts
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["VocabShare", "kmeans", "residual_quantize", "token_counts"]


def kmeans(x: np.ndarray, k: int, *, iters: int = 4, seed: int = 0, chunk: int = 4096
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids [k, D], assignment [M])`` of the rows of ``x [M, D]``: seeded Lloyd iterations (deterministic).

    Initialised from ``k`` distinct rows drawn with ``seed``; an emptied cluster keeps its old centroid. Distances
    are computed in chunks of ``chunk`` rows (``|x|^2 - 2 x.c + |c|^2``, float32) so memory stays ``chunk x k``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = x.shape[0]
    if not 0 < k <= m:
        raise QirError(f"vocab-share: k-means needs 0 < clusters <= rows, got clusters={k} for {m} rows")
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(m, size=k, replace=False))].copy()
    assign = np.zeros(m, dtype=np.int64)
    for it in range(iters + 1):
        c2 = np.einsum("ij,ij->i", centroids, centroids)
        for lo in range(0, m, chunk):
            xs = x[lo:lo + chunk]
            assign[lo:lo + chunk] = np.argmin(c2[None, :] - 2.0 * (xs @ centroids.T), axis=1)
        if it == iters:
            break
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return centroids, assign


def residual_quantize(resid: np.ndarray, bits: int, *, steps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(i<bits> codes, f32 scale per row)`` of ``resid [V, D]``: symmetric, the per-row scale chosen for least MSE.

    The candidates are ``absmax / qmax * r`` for ``r`` in ``(1/steps, ..., 1]``: at 2 bits the min/max scale rounds
    most of a row to 0 (codes -2..1), while a clipped scale keeps far more of it; ``r = 1`` (no clipping) is among
    the candidates, so the error is never larger than min/max rounding's.
    """
    d = dtype(f"i{bits}")
    x = np.asarray(resid, np.float32)
    amax = np.abs(x).max(axis=1)
    base = np.where(amax > 0, amax / d.qmax, 1.0).astype(np.float32)
    best_scale = base.copy()
    best_err = np.full(x.shape[0], np.inf, np.float64)
    for r in np.arange(1, steps + 1, dtype=np.float32)[::-1] / steps:
        s = base * r
        q = np.clip(np.rint(x / s[:, None]), d.qmin, d.qmax)
        err = np.square(q * s[:, None] - x).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best_err[better] = err[better]
        best_scale[better] = s[better]
    codes = np.clip(np.rint(x / best_scale[:, None]), d.qmin, d.qmax).astype(d.numpy)
    return codes, best_scale


@register_pass
@dataclass
class VocabShare(Pass):
    """Share embedding rows of rare tokens through a k-means codebook plus a low-bit residual (tied head kept)."""

    name = "vocab-share"
    clusters: int = 8192
    keep: int = 1024
    residual_bits: int = 2
    head: Literal["shared", "separate"] = "shared"
    iters: int = 4
    seed: int = 0
    min_rows: int = 1024

    def run(self, module: Module) -> None:
        if self.clusters < 1 or self.keep < 0:
            raise QirError(f"vocab-share: clusters must be >= 1 and keep >= 0, got clusters={self.clusters}, "
                           f"keep={self.keep}")
        if self.residual_bits not in (0, 2, 4, 8):
            raise QirError(f"vocab-share: residual_bits must be 0 (no residual), 2, 4 or 8, got {self.residual_bits}")
        for tname, lookups in float_tables(module).items():
            self._share(module, tname, lookups)

    # -- one table ----------------------------------------------------------------------------------------------
    def _share(self, module: Module, tname: str, lookups: list[tuple[Function, Op]]) -> None:
        const = module.constant(tname)
        shape = const.type.shape
        if const.type.rank != 2 or not all(isinstance(d, int) for d in shape):
            raise QirError(f"vocab-share: table @{tname} is {const.type}; only static [vocab, dim] tables are shared")
        vocab, dim = int(shape[0]), int(shape[1])
        if vocab < self.min_rows or vocab <= self.keep + self.clusters:
            return
        if not const.has_data:
            raise QirError(f"vocab-share: table @{tname} has no data (read without its .safetensors file); load the "
                           "module with qir.load")
        table = np.asarray(const.numpy(), dtype=np.float32)
        heads, others = table_readers(const)
        if others and self.head == "shared":
            raise QirError(f"vocab-share: @{tname} is also read by {', '.join(others)}; only embedding lookups and a "
                           "bias-free linear head can be rewritten (use head=separate to keep the table for them)")

        kept = self._kept_tokens(lookups, vocab)
        rest = np.setdiff1d(np.arange(vocab), kept)
        centroids, assign = kmeans(table[rest], self.clusters, iters=self.iters, seed=self.seed)
        codebook = np.concatenate([table[kept], centroids], axis=0)
        index = np.empty(vocab, dtype=np.int32)
        index[kept] = np.arange(len(kept), dtype=np.int32)
        index[rest] = (len(kept) + assign).astype(np.int32)

        cb = module.add_constant(module.fresh_constant_name(f"{tname}.codebook"), codebook, after=tname)
        ix = module.add_constant(module.fresh_constant_name(f"{tname}.index"), index, after=cb.name)
        res = None
        if self.residual_bits:
            resid = table - codebook[index]
            bits = self.residual_bits
            codes, scale = residual_quantize(resid, bits)
            rname = module.fresh_constant_name(f"{tname}.residual")
            sname = module.fresh_constant_name(f"{rname}.scale")
            rtype = TensorType.of(f"i{bits}", [vocab, dim], QuantSpec.per_axis(0, sname, None))
            res = module.add_constant(rname, codes, type=rtype, after=ix.name)
            module.add_constant(sname, np.asarray(scale, np.float32), after=rname)

        for func, op in lookups:
            self._rewrite_lookup(func, op, cb, ix, res)
        if self.head == "shared":
            for func, op in heads:
                self._rewrite_head(func, op, cb, ix, res)
        if not const.uses and not module.spec_references().get(tname):
            module.remove_constant(tname)

    def _kept_tokens(self, lookups: list[tuple[Function, Op]], vocab: int) -> np.ndarray:
        if self.keep == 0:
            return np.zeros(0, dtype=np.int64)
        counts = calibration_token_counts(self.context, lookups, vocab, owner="vocab-share",
                                          purpose="vocab-share{keep>0} (token frequencies)")
        # most frequent first, ties by id; stable so the choice is deterministic
        order = np.argsort(-counts, kind="stable")[: self.keep]
        return np.sort(order)

    @staticmethod
    def _rewrite_lookup(func: Function, op: Op, cb: Value, ix: Value, res: Value | None) -> None:
        result = op.result
        name = result.name
        ids = op.operands[1]
        mapped = func.add_op("gather", [ix, ids], {"axis": 0}, names=[name + ".vs"], before=op, loc=op.loc).result
        rows = func.add_op("embedding", [cb, mapped], names=[name + ".cb"], before=op, loc=op.loc).result
        out = rows
        if res is not None:
            corr = func.add_op("qembedding", [res, ids], result_types=[rows.type], names=[name + ".res"],
                               before=op, loc=op.loc).result
            out = func.add_op("add", [rows, corr], names=[name + ".new"], before=op, loc=op.loc).result
        result.replace_all_uses_with(out)
        func.erase_op(op)
        func.rename(out, name)

    @staticmethod
    def _rewrite_head(func: Function, op: Op, cb: Value, ix: Value, res: Value | None) -> None:
        result = op.result
        name = result.name
        x = op.operands[0]
        axis = result.type.rank - 1
        small = func.add_op("linear", [x, cb], names=[name + ".cb"], before=op, loc=op.loc).result
        full = func.add_op("gather", [small, ix], {"axis": axis}, names=[name + ".full"], before=op,
                           loc=op.loc).result
        out = full
        if res is not None:
            corr = func.add_op("qmatmul", [x, res], result_types=[result.type], names=[name + ".res"], before=op,
                               loc=op.loc).result
            out = func.add_op("add", [full, corr], names=[name + ".new"], before=op, loc=op.loc).result
        result.replace_all_uses_with(out)
        func.erase_op(op)
        func.rename(out, name)
