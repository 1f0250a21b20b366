"""The ``outlier-split`` pass: LLM.int8-style mixed-precision decomposition of ``linear`` ops.

``outlier-split{threshold=6.0, max_fraction=0.05, weight_outliers=0}`` runs after ``calibrate`` and
before ``quantize``. For each ``linear`` on a constant weight ``W [N, K]`` it reads the calibrated
per-channel |max| of the ``x`` operand (``@calib.<func>.<x>.chmax``, see
:func:`qir.passes.calibrate.calibration_stats`); the input features whose magnitude exceeds
``threshold`` (at most ``max_fraction * K`` of them, the largest first) are the *outlier columns*.
The linear becomes two paths whose results are added:

* the 16-bit path: ``gather`` the outlier columns of ``x`` and multiply them by ``W[:, cols]``,
  stored **f16** and transposed (``@W.outlier : f16[k, N]``), through ``cast`` + ``matmul``;
* the rest: ``gather`` the other columns and ``linear`` them with ``W[:, rest]``, which keeps the
  weight's name (``@W`` shrinks to ``[N, K-k]``), so ``quantize`` -- and its ``overrides`` patterns --
  treat it as before and turn it into ``qmatmul`` with int8 activations.

The outlier path stays f16 through ``quantize`` by construction: ``quantize`` rewrites only
``linear`` ops whose weight is a constant, and the 16-bit path is a ``matmul`` on a ``cast`` value.

``weight_outliers=N`` also moves the N largest-magnitude weights of each matrix (outside the outlier
columns) into the 16-bit path: their columns join the gathered columns, ``@W.outlier`` holds just those
entries there (zeros elsewhere, a dense f16 matrix on the columns they occupy), and they are zeroed in
``@W`` so they no longer stretch its quantization scales.

Statistics: the gathered rest ``%x.rest`` gets calibration statistics derived from ``%x``'s (its
channel maxima are ``chmax[rest]``, its range ``[max(lo, -m), min(hi, m)]`` with ``m = max chmax[rest]``),
so ``quantize{act=static}`` needs no second ``calibrate``. Weights read by anything but a ``linear``
(a tied embedding/head table) and linears without statistics are left alone.

Before (``tests/golden/passes/outlier_split.input.qir``, ``%x`` calibrated with channel 1 at 40)::

    func @main(%x: f32[1,seq,4]) -> (f32[1,seq,3]) {
      %y = linear %x, @w : f32[1,seq,3]
      return %y
    }

After ``outlier-split{max_fraction=0.25}``::

    const @w : f32[3,3] = dense(...)                 # W[:, (0, 2, 3)]
    const @w.outlier_cols : i64[1] = dense(1)
    const @w.rest_cols : i64[3] = dense(0, 2, 3)
    const @w.outlier : f16[1,3] = dense(...)         # W[:, (1,)].T
    func @main(%x: f32[1,seq,4]) -> (f32[1,seq,3]) {
      %x.out = gather %x, @w.outlier_cols {axis=-1} : f32[1,seq,1]
      %y.w16 = cast @w.outlier : f32[1,3]
      %y.out = matmul %x.out, %y.w16 : f32[1,seq,3]
      %x.rest = gather %x, @w.rest_cols {axis=-1} : f32[1,seq,3]
      %y.rest = linear %x.rest, @w : f32[1,seq,3]
      %y = add %y.rest, %y.out : f32[1,seq,3]
      return %y
    }
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.calibrate import calibration_stats, store_stats
from qir.passes.observers import Stats
from qir.passes.registry import register_pass
from qir.types import TensorType

__all__ = ["OutlierSplit", "SplitInfo", "outlier_columns"]


@dataclass(frozen=True)
class SplitInfo:
    """What the pass did to one weight: its input size and the columns that went to the 16-bit path."""

    weight: str
    in_features: int
    outlier_cols: tuple[int, ...]
    weight_outliers: int


def outlier_columns(chmax: np.ndarray, threshold: float, max_fraction: float) -> np.ndarray:
    """The sorted indices of channels with ``chmax > threshold``, keeping the largest ``max_fraction`` at most."""
    k = chmax.shape[0]
    over = np.flatnonzero(chmax > threshold)
    limit = min(int(np.floor(max_fraction * k)), k - 1)
    if over.size > limit:
        over = over[np.argsort(-chmax[over], kind="stable")[:max(limit, 0)]]
    return np.sort(over).astype(np.int64)


@register_pass
@dataclass
class OutlierSplit(Pass):
    """Split each linear into an f16 path on outlier input channels and a (to be quantized) rest; see the docs."""

    name = "outlier-split"
    threshold: float = 6.0
    max_fraction: float = 0.05
    weight_outliers: int = 0

    def run(self, module: Module) -> None:
        if self.threshold < 0 or not 0 <= self.max_fraction <= 1 or self.weight_outliers < 0:
            raise QirError(f"outlier-split: need threshold >= 0, 0 <= max_fraction <= 1 and weight_outliers >= 0, "
                           f"got threshold={self.threshold}, max_fraction={self.max_fraction}, "
                           f"weight_outliers={self.weight_outliers}")
        self.splits: list[SplitInfo] = []
        linears = self._linear_weights(module)
        if linears and not any(n.startswith("calib.") for n in module.constants):
            raise QirError("outlier-split needs calibration statistics (the calib.* constants): run calibrate "
                           "first, e.g. 'calibrate,outlier-split,quantize{scheme=w8a8,act=static}' with "
                           "--calib-text FILE")
        index_consts: dict[bytes, Constant] = {}
        gathers: dict[tuple[int, bytes], Value] = {}
        for wname, ops in linears.items():
            chmax = self._chmax(module, ops)
            if chmax is None:
                continue
            w_const = module.constant(wname)
            w = np.asarray(w_const.numpy())
            n, k = w.shape
            if chmax.shape != (k,):
                raise QirError(f"outlier-split: the channel maxima of the input of @{wname} have shape "
                               f"{list(chmax.shape)}, expected [{k}]; run calibrate again on this module")
            cols = outlier_columns(chmax, self.threshold, self.max_fraction)
            w_rest = w.copy()
            w_rest[:, cols] = 0
            f16_cols = set(cols.tolist())
            moved = 0
            if self.weight_outliers:
                flat = np.argsort(-np.abs(w_rest), axis=None, kind="stable")[:self.weight_outliers]
                rows, wcols = np.unravel_index(flat, w.shape)
                f16_cols.update(int(c) for c in wcols)
                moved = len(flat)
            if not f16_cols:
                continue
            out_cols = np.array(sorted(f16_cols), dtype=np.int64)
            rest_cols = np.setdiff1d(np.arange(k), cols).astype(np.int64)
            if rest_cols.size == 0:
                continue
            w16 = np.zeros((n, out_cols.size), dtype=w.dtype)
            pos = {c: i for i, c in enumerate(out_cols.tolist())}
            for c in cols.tolist():
                w16[:, pos[c]] = w[:, c]
            if moved:
                w16[rows, [pos[int(c)] for c in wcols]] = w[rows, wcols]
                w_rest[rows, wcols] = 0
            self.splits.append(SplitInfo(wname, k, tuple(int(c) for c in cols), moved))
            out_idx = self._index_const(module, index_consts, f"{wname}.outlier_cols", out_cols, after=wname)
            rest_idx = self._index_const(module, index_consts, f"{wname}.rest_cols", rest_cols, after=out_idx.name)
            f16_name = module.fresh_constant_name(f"{wname}.outlier")
            f16 = module.add_constant(f16_name, np.ascontiguousarray(w16.T).astype(np.float16), after=rest_idx.name)
            new_w = module.add_constant(module.fresh_constant_name(f"{wname}.rest"),
                                        np.ascontiguousarray(w_rest[:, rest_cols]), after=wname)
            for func, op in ops:
                self._rewrite(module, func, op, out_idx, rest_idx, f16, new_w, rest_cols, gathers)
            module.remove_constant(wname)
            module.rename_constant(new_w.name, wname)

    # -- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def _linear_weights(module: Module) -> dict[str, list[tuple[Function, Op]]]:
        """Weights read only as the weight of ``linear`` ops (static float 2-D, with data), with those ops."""
        out: dict[str, list[tuple[Function, Op]]] = {}
        for func in module.functions.values():
            for op in func.ops:
                if op.opcode == "linear" and op.operands[1].is_constant:
                    out.setdefault(op.operands[1].name, []).append((func, op))
        keep: dict[str, list[tuple[Function, Op]]] = {}
        for wname, ops in out.items():
            c = module.constant(wname)
            t = c.type
            if t.quant is not None or not t.dtype.is_float or t.rank != 2 or not c.has_data:
                continue
            if not all(isinstance(d, int) for d in t.shape):
                continue
            if any(o.opcode != "linear" or i != 1 for o, i in c.uses):
                continue  # a tied table (embedding + head): splitting it would change the lookup too
            keep[wname] = ops
        return keep

    @staticmethod
    def _chmax(module: Module, ops: list[tuple[Function, Op]]) -> np.ndarray | None:
        """The channel maxima of the weight's input in any function that has them (prefill's serve decode)."""
        for func, op in ops:
            st = calibration_stats(module, op.operands[0].name, func.name)
            if st is not None and st.chmax is not None:
                return np.asarray(st.chmax, dtype=np.float32)
        return None

    @staticmethod
    def _index_const(module: Module, cache: dict[bytes, Constant], name: str, idx: np.ndarray, *, after: str
                     ) -> Constant:
        key = idx.tobytes() + b"/" + str(idx.size).encode()
        c = cache.get(key)
        if c is None:
            c = module.add_constant(module.fresh_constant_name(name), idx, after=after)
            cache[key] = c
        return c

    @staticmethod
    def _rewrite(module: Module, func: Function, op: Op, out_idx: Constant, rest_idx: Constant, f16: Constant,
                 new_w: Constant, rest_cols: np.ndarray, gathers: dict[tuple[int, bytes], Value]) -> None:
        x, y = op.operands[0], op.result

        def gather(idx: Constant, suffix: str) -> Value:
            key = (id(x), idx.name.encode())
            v = gathers.get(key)
            if v is None:
                # before the first user of x that we rewrite: later users (k, v after q) come after it
                v = func.add_op("gather", [x, idx], {"axis": -1}, names=[func.fresh_name(x.name + suffix)],
                                before=op, loc=op.loc).result
                gathers[key] = v
            return v

        x_out = gather(out_idx, ".out")
        w16 = func.add_op("cast", [f16], result_types=[TensorType(x.type.dtype, f16.type.shape)],
                          names=[y.name + ".w16"], before=op, loc=op.loc).result
        y_out = func.add_op("matmul", [x_out, w16], names=[y.name + ".out"], before=op, loc=op.loc).result
        x_rest = gather(rest_idx, ".rest")
        y_rest = func.add_op("linear", [x_rest, new_w, *op.operands[2:]], names=[y.name + ".rest"], before=op,
                             loc=op.loc).result
        total = func.add_op("add", [y_rest, y_out], names=[y.name + ".sum"], before=op, loc=op.loc)
        y.replace_all_uses_with(total.result)
        func.erase_op(op)
        func.rename(total.result, y.name)
        st = calibration_stats(module, x.name, func.name)
        if st is not None and st.chmax is not None and calibration_stats(module, x_rest.name, func.name) is None:
            ch = np.asarray(st.chmax, dtype=np.float32)[rest_cols]
            m = float(ch.max()) if ch.size else 0.0
            lo, hi = max(st.lo, -m), min(st.hi, m)
            store_stats(module, func.name, x_rest.name, Stats(min(lo, hi), max(lo, hi), ch))
