"""The ``fold-scales`` pass: SmoothQuant-style scale migration before ``quantize``, scale folding after it.

``fold-scales{smooth=0.5}`` does whatever applies to the module it is given:

1. **Smoothing** (float graphs, needs ``calibrate`` first; ``smooth=0`` turns it off). For every
   ``rms_norm`` / ``layer_norm`` weight ``@g`` whose norms feed only ``linear`` ops on constant weights
   (q/k/v; gate/up) -- and whose linear weights are read only by linears on those norms -- the
   per-input-channel factors ``s_j = max|x_j|^a / max|W[:, j]|^(1-a)`` (``a = smooth``; ``max|x_j|``
   from the calibrated channel maxima of the norm outputs, ``max|W[:, j]|`` over every consuming weight)
   divide ``@g`` (and a ``layer_norm`` bias) and multiply the columns of each consuming weight. In float
   this is exact: ``(n * g / s) @ (W * s).T == (n * g) @ W.T``; it moves activation outliers into the
   weights, where per-row weight scales absorb them, so per-tensor / per-token activation quantization
   loses less. A norm weight shared with something else (the final norm of a tied head is fine; a tied
   head *weight* is not) is left alone.

   The same migration applies **inside gated MLPs**: a ``linear`` on ``%mid = mul(%act, %up)`` where ``%up =
   linear %x, @Wu`` (SwiGLU's up projection) gets ``s`` from ``%mid``'s channel maxima and ``@Wd``'s columns;
   the rows of ``@Wu`` (and its bias) are divided by ``s`` -- ``mul(act, up / s) == mid / s`` exactly -- and the
   columns of ``@Wd`` multiplied. The down projection's input carries the largest outliers of a LLaMA-style
   model (the products of two projections), so this is where per-token activation quantization loses most.
   Every use of ``@Wd`` and ``@Wu`` (prefill and decode) must have this shape, or nothing is changed.

   The stored statistics of the smoothed norm outputs are **transformed**, not recomputed: the channel
   maxima become ``chmax / s`` (exact) and the range becomes the exact symmetric bound
   ``[-max(chmax / s), max(chmax / s)]`` (the signs of the extremes are lost). ``quantize{act=static}``
   can use them directly; run ``calibrate`` again (``calibrate,fold-scales,calibrate,quantize...``) for
   the tightest asymmetric range.

2. **Folding** (any graph, typically after ``quantize``): ``quantize(dequantize(q))`` chains become
   ``requantize`` (or disappear) through ``fold-qdq`` (:mod:`qir.passes.cleanup`), and a ``mul`` of a
   ``qmatmul`` / ``linear`` result by a constant per-output-channel vector (shape ``[N]`` or
   ``[1, ..., 1, N]``, or a scalar) is folded into the op: into the per-row / per-group weight scale
   constant of a ``qmatmul`` (the qmatmul epilogue already multiplies by it), into the weight rows of a
   float ``linear``, and into the bias. It folds only when every op that reads the weight is followed by
   the same multiplier (prefill and decode share weights), so no weight is duplicated.

Before (``tests/golden/passes/fold_scales.input.qir``; ``%x`` calibrated, channel maxima ``(1, 16, 4, 0.25)``)::

    const @g : f32[4] = dense(1.0, 0.5, 2.0, 1.0)
    const @c : f32[2] = dense(0.5, 2.0)
    func @main(%h: f32[1,seq,4]) -> (f32[1,seq,3], f32[1,seq,2]) {
      %x = rms_norm %h, @g {eps=1e-05} : f32[1,seq,4]
      %a = linear %x, @wa : f32[1,seq,3]
      %b = linear %x, @wb : f32[1,seq,2]
      %y = mul %b, @c : f32[1,seq,2]
      return %a, %y
    }

After ``fold-scales{smooth=0.5},dce`` (``fold_scales.expected.qir``)::

    const @g : f32[4] = dense(1.4142135, 0.088388346, 1.118034, 2.0)     # @g / s
    const @calib.main.x.chmax : f32[4] = dense(1.4142135, 2.828427, 2.236068, 0.5)   # chmax / s
    func @main(%h: f32[1,seq,4]) -> (f32[1,seq,3], f32[1,seq,2]) {
      %x = rms_norm %h, @g {eps=1e-05} : f32[1,seq,4]
      %a = linear %x, @wa : f32[1,seq,3]                # columns of @wa times s
      %y = linear %x, @wb : f32[1,seq,2]                # columns times s, rows times @c
      return %a, %y
    }

After ``quantize{scheme=w8a8},fold-scales{smooth=0}`` on the same input the ``mul`` is gone too and
``@wb.scale`` (the per-row weight scale qmatmul applies) is multiplied by ``@c``; the i8 codes are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.calibrate import calibration_stats, store_stats
from qir.passes.cleanup import FoldQuantizeDequantize
from qir.passes.observers import Stats
from qir.passes.registry import register_pass

__all__ = ["FoldScales", "smoothing_factors"]

NORMS = ("rms_norm", "layer_norm")


def smoothing_factors(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``s = act_max^alpha / w_max^(1-alpha)``, 1 where either maximum is 0, clipped to [1e-5, 1e5]."""
    a = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


@register_pass
@dataclass
class FoldScales(Pass):
    """Smooth norm->linear activation outliers into the weights (SmoothQuant) and fold scale muls into ops."""

    name = "fold-scales"
    smooth: float = 0.5

    def run(self, module: Module) -> None:
        if not 0 <= self.smooth <= 1:
            raise QirError(f"fold-scales: smooth must be in [0, 1] (0 turns smoothing off), got {self.smooth}")
        self.smoothed: list[str] = []
        self.folded: list[str] = []
        if self.smooth > 0:
            self._smooth_all(module)
            self._smooth_mlps(module)
        FoldQuantizeDequantize().run(module)
        self._fold_muls(module)

    # -- 1. smoothing -----------------------------------------------------------------------------------------
    def _smooth_all(self, module: Module) -> None:
        groups: dict[str, list[tuple[Function, Op]]] = {}
        for func in module.functions.values():
            for op in func.ops:
                if op.opcode in NORMS and len(op.operands) >= 2 and op.operands[1].is_constant:
                    groups.setdefault(op.operands[1].name, []).append((func, op))
        has_stats = any(n.startswith("calib.") for n in module.constants)
        candidates = {g: norms for g, norms in groups.items() if self._consumers(module, g, norms) is not None}
        if candidates and not has_stats:
            raise QirError("fold-scales{smooth>0} needs calibration statistics (calib.* constants): run calibrate "
                           "first, e.g. 'calibrate,fold-scales,calibrate,quantize{scheme=w8a8}', or use smooth=0")
        for gname, norms in candidates.items():
            weights = self._consumers(module, gname, norms)
            assert weights is not None
            act_max = None
            for func, op in norms:
                st = calibration_stats(module, op.result.name, func.name)
                if st is not None and st.chmax is not None:
                    act_max = st.chmax if act_max is None else np.maximum(act_max, st.chmax)
            if act_max is None:
                continue
            ws = [np.asarray(module.constant(w).numpy()) for w in weights]
            w_max = np.max(np.stack([np.abs(w).max(axis=0) for w in ws]), axis=0)
            s = smoothing_factors(act_max, w_max, self.smooth)
            g = module.constant(gname)
            g.data = (np.asarray(g.numpy(), dtype=np.float64) / s).astype(g.type.dtype.numpy)
            bias_names = {op.operands[2].name for _, op in norms if len(op.operands) > 2 and op.operands[2].is_constant}
            for b in bias_names:
                bc = module.constant(b)
                bc.data = (np.asarray(bc.numpy(), dtype=np.float64) / s).astype(bc.type.dtype.numpy)
            for wname, w in zip(weights, ws):
                module.constant(wname).data = (w.astype(np.float64) * s[None, :]).astype(w.dtype)
            for func, op in norms:
                st = calibration_stats(module, op.result.name, func.name)
                if st is not None and st.chmax is not None:
                    ch = (np.asarray(st.chmax, dtype=np.float64) / s).astype(np.float32)
                    m = float(ch.max()) if ch.size else 0.0
                    store_stats(module, func.name, op.result.name, Stats(-m, m, ch))
            self.smoothed.append(gname)

    def _smooth_mlps(self, module: Module) -> None:
        """Migrate the outliers of ``mul(act, linear(x, @Wu))`` into the down projection (see the docstring)."""
        for dname in [n for n, c in module.constants.items() if c.has_data and c.type.dtype.is_float
                      and c.type.quant is None and c.type.rank == 2]:
            found = self._gated_pair(module, dname)
            if found is None:
                continue
            uname, mids = found
            act_max = None
            for func, mid in mids:
                st = calibration_stats(module, mid.name, func.name)
                if st is not None and st.chmax is not None:
                    act_max = st.chmax if act_max is None else np.maximum(act_max, st.chmax)
            if act_max is None:
                continue
            wd = np.asarray(module.constant(dname).numpy())
            wu = np.asarray(module.constant(uname).numpy())
            s = smoothing_factors(act_max, np.abs(wd).max(axis=0), self.smooth)
            module.constant(dname).data = (wd.astype(np.float64) * s[None, :]).astype(wd.dtype)
            module.constant(uname).data = (wu.astype(np.float64) / s[:, None]).astype(wu.dtype)
            for b in {op.operands[2].name for op, _ in module.constant(uname).uses if len(op.operands) > 2}:
                bc = module.constant(b)
                bc.data = (np.asarray(bc.numpy(), dtype=np.float64) / s).astype(bc.type.dtype.numpy)
            for func, mid in mids:
                st = calibration_stats(module, mid.name, func.name)
                if st is not None and st.chmax is not None:
                    ch = (np.asarray(st.chmax, dtype=np.float64) / s).astype(np.float32)
                    m = float(ch.max()) if ch.size else 0.0
                    store_stats(module, func.name, mid.name, Stats(-m, m, ch))
            self.smoothed.append(dname)

    @staticmethod
    def _gated_pair(module: Module, dname: str) -> tuple[str, list[tuple[Function, Value]]] | None:
        """``(@Wu, [(function, %mid), ...])`` when every use of ``@dname`` is ``linear(mul(a, linear(x, @Wu)), @dname)``
        and nothing else reads ``%mid``, ``@Wu`` or the up projection's result (so the rescale is exact)."""
        d = module.constant(dname)
        if not d.uses:
            return None
        up_name: str | None = None
        mids: list[tuple[Function, Value]] = []
        up_ops: set[int] = set()
        for op, index in d.uses:
            if op.opcode != "linear" or index != 1:
                return None
            mid = op.operands[0]
            mul = mid.producer
            if mul is None or mul.opcode != "mul" or len(mul.operands) != 2:
                return None
            if (any(u.opcode != "linear" or i != 0 or u.operands[1] is not d for u, i in mid.uses)
                    or op.parent is None or any(v is mid for v in op.parent.outputs)):
                return None  # %mid feeds something else (or is returned), whose meaning would change
            ups = [v for v in mul.operands if v.producer is not None and v.producer.opcode == "linear"
                   and v.producer.operands[1].is_constant and len(v.uses) == 1
                   and all(v is not o for o in op.parent.outputs)]
            if len(ups) != 1 or mul.operands[0] is mul.operands[1]:
                return None
            up = ups[0].producer
            assert up is not None
            w = up.operands[1]
            if w.type.quant is not None or not w.type.dtype.is_float or w.type.rank != 2:
                return None
            if up_name not in (None, w.name):
                return None
            up_name = w.name
            up_ops.add(id(up))
            if all(m is not mid for _, m in mids):
                mids.append((op.parent, mid))
        assert up_name is not None
        u = module.constant(up_name)
        if not u.has_data or any(op.opcode != "linear" or i != 1 or id(op) not in up_ops for op, i in u.uses):
            return None  # the up weight is read elsewhere (tied, or by a linear not feeding this down projection)
        if u.type.shape[0] != d.type.shape[1]:
            return None
        for op, _ in u.uses:
            if len(op.operands) > 2 and (not op.operands[2].is_constant
                                         or any(o.opcode != "linear" or id(o) not in up_ops
                                                for o, _ in module.constant(op.operands[2].name).uses)):
                return None
        return up_name, mids

    @staticmethod
    def _consumers(module: Module, gname: str, norms: list[tuple[Function, Op]]) -> list[str] | None:
        """The linear weights fed by the norms of ``@gname``, or None when smoothing them would not be exact."""
        g = module.constant(gname)
        if not g.has_data or any(o.opcode not in NORMS or i != 1 for o, i in g.uses):
            return None
        results = {id(op.result) for _, op in norms}
        weights: list[str] = []
        for func, op in norms:
            r = op.result
            if any(v is r for v in func.outputs) or not r.uses:
                return None
            for user, index in r.uses:
                if user.opcode != "linear" or index != 0 or not user.operands[1].is_constant:
                    return None
                w = user.operands[1]
                if w.type.quant is not None or not w.type.dtype.is_float or not w.has_data:  # type: ignore[attr-defined]
                    return None
                if w.name not in weights:
                    weights.append(w.name)
            if len(op.operands) > 2 and op.operands[2].is_constant:
                b = op.operands[2]
                if any(o.opcode not in NORMS or i != 2 for o, i in b.uses):
                    return None
        for wname in weights:
            for user, index in module.constant(wname).uses:
                if user.opcode != "linear" or index != 1 or id(user.operands[0]) not in results:
                    return None  # a tied table, or the same weight on another input: columns can't be scaled
        return weights

    # -- 2. folding muls into ops ------------------------------------------------------------------------------
    def _fold_muls(self, module: Module) -> None:
        by_weight: dict[str, list[tuple[Function, Op, Op, Constant]]] = {}
        blocked: set[str] = set()
        for func in module.functions.values():
            for op in func.ops:
                if op.opcode not in ("linear", "qmatmul") or not op.operands[1].is_constant:
                    continue
                wname = op.operands[1].name
                mul, c = self._scale_mul(op)
                if mul is None or c is None:
                    blocked.add(wname)
                    continue
                by_weight.setdefault(wname, []).append((func, op, mul, c))
        for wname, entries in by_weight.items():
            if wname in blocked:
                continue
            w = module.constant(wname)
            if len(w.uses) != len(entries):
                continue  # read by something else (a tied embedding): its rows must stay as they are
            c0 = np.asarray(entries[0][3].numpy(), dtype=np.float64)
            if any(not np.array_equal(np.asarray(e[3].numpy(), dtype=np.float64), c0) for e in entries[1:]):
                continue
            n = int(w.type.shape[0])
            vec = np.broadcast_to(c0.reshape(-1), (n,)) if c0.size in (1, n) else None
            biases = {e[1].operands[2].name for e in entries if len(e[1].operands) > 2}
            if any(len(module.constant(b).uses) != len(entries) for b in biases):
                continue  # a bias shared with other ops keeps its values
            if vec is None or not self._scale_weight(module, w, vec):
                continue
            for b in biases:
                bc = module.constant(b)
                bc.data = (np.asarray(bc.numpy(), dtype=np.float64) * vec).astype(bc.type.dtype.numpy)
            for func, op, mul, _ in entries:
                out = mul.result
                if out.type != op.result.type:
                    continue
                out.replace_all_uses_with(op.result)
                name = out.name
                func.erase_op(mul)
                func.rename(op.result, name)
            self.folded.append(wname)

    @staticmethod
    def _scale_mul(op: Op) -> tuple[Op | None, Constant | None]:
        """The single ``mul`` by a per-output-channel constant that is the only user of ``op``'s result."""
        r = op.result
        users = r.users()
        func = op.parent
        if len(users) != 1 or len(r.uses) != 1 or any(v is r for v in func.outputs):
            return None, None
        mul = users[0]
        if mul.opcode != "mul" or len(mul.operands) != 2:
            return None, None
        other = mul.operands[1] if mul.operands[0] is r else mul.operands[0]
        if not isinstance(other, Constant) or not other.has_data or other.type.quant is not None:
            return None, None
        n = r.type.shape[-1]
        shape = other.type.shape
        if not all(d == 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, n)) or len(shape) > r.type.rank:
            return None, None
        if mul.result.type != r.type or len(op.operands) > 2 and not op.operands[2].is_constant:
            return None, None
        return mul, other

    @staticmethod
    def _scale_weight(module: Module, w: Constant, vec: np.ndarray) -> bool:
        """Multiply output row i of ``w`` by ``vec[i]``: its data (float) or its scale constant (quantized)."""
        spec = w.type.quant
        if spec is None:
            data = np.asarray(w.numpy())
            w.data = (data.astype(np.float64) * vec[:, None]).astype(data.dtype)
            return True
        if spec.dynamic or not isinstance(spec.scale, str) or spec.axis not in (0, 1):
            return False  # a literal per-tensor scale cannot hold one factor per row
        if spec.axis == 1 and spec.group_size is None:
            return False  # per input column: rows share scales
        if np.any(vec <= 0):
            return False  # scales stay positive; a sign flip would need the codes negated
        sc = module.constant(spec.scale)
        if len(module.spec_references().get(sc.name, [])) != 1 or sc.uses:
            return False  # the scale is shared with another constant
        s = np.asarray(sc.numpy(), dtype=np.float64)
        s = s * vec.reshape((-1,) + (1,) * (s.ndim - 1))
        sc.data = s.astype(np.asarray(sc.numpy()).dtype)
        return True
