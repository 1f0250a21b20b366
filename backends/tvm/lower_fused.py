"""Lowering of the ops with a scheduled CPU kernel: ``attention``, ``gelu``, the norms and per-token ``quantize``.

A mixin of :class:`qir.backends.tvm.lower._FunctionLowering` (like :mod:`.lower_quant`). Each ``_kernel_*``
method returns the lowered Relax value, or ``None`` when the kernel does not apply (no scheduled kernels for the
target, a dtype or shape the kernel does not take), and the caller then emits its generic lowering. Why these:
profiled on MiniLM w8a8 (``bench/tvm_profile.py``), the unfused attention (batched matmuls + five softmax passes),
``gelu`` (one scalar ``erff`` call per element), the per-token quantization (``min``, ``max``, scale and codes as
four passes) and ``layer_norm`` took 85% of the run under the generic schedule, the int8 matmuls 12%.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qir.backends.tvm.lower_quant import QVal, add_kernel, layout_of
from qir.backends.tvm.qops import tvm_dtype
from qir.graph import Op, Value
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["FusedLowering"]


def _is_head_transpose(op: Op) -> bool:
    return op.opcode == "transpose" and [int(p) for p in op.attrs["perm"]] == [0, 2, 1, 3]


class FusedLowering:
    """``_kernel_attention``, ``_kernel_gelu``, ``_kernel_norm``, ``_kernel_quantize_rows`` (module docstring)."""

    relax: Any
    tir: Any
    bb: Any
    target: Any
    kernel_counts: dict[str, int]
    names: dict[str, str]

    def _count(self, name: str) -> None:
        self.kernel_counts[name] = self.kernel_counts.get(name, 0) + 1

    def _kernel_attention(self, op: Op, q: Any, k: Any, v: Any) -> Any | None:
        kern = self._kernels()  # type: ignore[attr-defined]
        if kern is None:
            return None
        qt, kt, vt = (o.type for o in op.operands[:3])
        if any(t.dtype.name != "f32" for t in (qt, kt, vt)) or op.result.type.dtype.name != "f32":
            return None
        b, hq, sq, d = qt.shape
        hkv, sk, dv = kt.shape[1], kt.shape[2], vt.shape[3]
        if not all(isinstance(x, int) for x in (hq, hkv, d, dv)):
            return None
        # Read q/k/v through a head transpose ([B, S, H, D] -> [B, H, S, D]) and write the output in [B, S, H, D]
        # when its only use transposes it back: the transposes then cost nothing (the unused ones are removed
        # by DeadCodeElimination in the pipeline).
        (q, lq), (k, lk), (v, lv) = (self._through_head_transpose(o, e)
                                     for o, e in zip(op.operands[:3], (q, k, v)))
        out_t, lo, back = op.result.type, "bhsd", None
        uses = op.result.uses
        if (len(uses) == 1 and _is_head_transpose(uses[0][0])
                and id(op.result) not in self.output_ids):  # type: ignore[attr-defined]
            back = uses[0][0].result
            out_t, lo = back.type, "bshd"
        args = [q, k, v]
        mask = None
        limit = self._filled_prefix(op.operands[3], sk) if len(op.operands) > 3 else None
        if limit is not None:
            args.append(limit)
        elif len(op.operands) > 3:
            mt = op.operands[3].type
            if mt.dtype.name not in ("bool", "f32"):
                return None
            m = self.plain(op, op.operands[3])  # type: ignore[attr-defined]
            shape = (1,) * (4 - mt.rank) + tuple(mt.shape)
            if mt.rank < 4:
                m = self.bb.emit(self.relax.op.reshape(m, self.shape(shape)))  # type: ignore[attr-defined]
            mask = (tvm_dtype(mt.dtype), tuple(s != 1 for s in shape))
            args.append(m)
        scale = op.attrs.get("scale")
        if scale is None:
            scale = 1.0 / float(d) ** 0.5

        def static(x: Any) -> int | None:
            return x if isinstance(x, int) else None

        try:
            prim = kern.attention(static(b), hq, hkv, static(sq), static(sk), d, dv, self.target,
                                  scale=float(scale), causal=bool(op.attrs.get("causal")), mask=mask,
                                  layouts=(lq, lk, lv, lo), limit=limit is not None)
        except Exception:  # noqa: BLE001 - a kernel that cannot be built falls back to the generic lowering
            prim = None
        if prim is None:
            return None
        gv = add_kernel(self.bb, prim, "attention_k")
        self._count("attention")
        out = self.relax.call_tir(gv, args, self.sinfo(out_t))  # type: ignore[attr-defined]
        if back is None:
            return self.emit(out, op.result)  # type: ignore[attr-defined]
        # The attention's own [B, H, S, D] result is never materialized: its transpose is this value.
        var = self.emit(out, back)  # type: ignore[attr-defined]
        self.__dict__.setdefault("prelowered", {})[id(back)] = var
        return var

    def _filled_prefix(self, mask: Value, sk: Any) -> Any | None:
        """``p`` (as a Relax ``[1]`` int64 tensor) when ``mask`` is ``arange(Sk) <= p`` for a one-element ``p``
        (reshaped to ``[1, 1, 1, Sk]`` or less): a decode step's "cache slots filled so far". The kernel then
        reads only keys ``0..p`` instead of masking the other ``Sk - p - 1``."""
        v = mask
        while v.producer is not None and v.producer.opcode in ("reshape", "unsqueeze"):
            if any(d != 1 for d in v.type.shape[:-1]):
                return None
            v = v.producer.operands[0]
        le = v.producer
        if le is None or le.opcode != "le" or v.type.rank != 1 or not isinstance(sk, int):
            return None
        ar, pos = le.operands
        a = ar.producer
        if (a is None or a.opcode != "arange" or int(a.attrs.get("start", 0)) != 0
                or int(a.attrs.get("step", 1)) != 1 or ar.type.shape != (sk,)):
            return None
        if pos.type.dtype.name != "i64" or not pos.type.is_static or pos.type.numel() != 1 or pos.is_constant:
            return None
        e = self.env.get(id(pos))  # type: ignore[attr-defined]
        if e is None or isinstance(e, QVal):
            return None
        return self.bb.emit(self.relax.op.reshape(e, [1])) if pos.type.shape != (1,) else e

    def _through_head_transpose(self, v: Value, e: Any) -> tuple[Any, str]:
        p = v.producer
        if p is not None and _is_head_transpose(p) and not p.operands[0].is_constant:
            src = self.env.get(id(p.operands[0]))  # type: ignore[attr-defined]
            if src is not None and not isinstance(src, QVal) and p.operands[0].type.dtype.name == "f32":
                return src, "bshd"
        return e, "bhsd"

    def _kernel_gelu(self, op: Op, x: Any) -> Any | None:
        """Exact (erf) ``gelu`` with the polynomial ``erf``: an elementwise TE compute the generic CPU rule
        vectorizes (TVM's own ``erf`` is a scalar libm call per element)."""
        kern = self._kernels()  # type: ignore[attr-defined]
        if kern is None or op.attrs.get("approximate", "none") != "none" or op.result.type.dtype.name != "f32":
            return None
        from tvm import te

        gelu = kern.mathfn.gelu_erf
        self._count("gelu")
        return self.emit_te(lambda X: te.compute(X.shape, lambda *i: gelu(X[i]), name="gelu"),  # type: ignore
                            [x], "gelu", op.result)

    def _kernel_norm(self, op: Op, kind: str, x: Any, params: list[Any]) -> Any | None:
        """``layer_norm`` / ``rms_norm`` over the last axis: one kernel, a row per parallel task."""
        kern = self._kernels()  # type: ignore[attr-defined]
        xt = op.operands[0].type
        k = xt.shape[-1]
        if kern is None or xt.dtype.name != "f32" or op.result.type.dtype.name != "f32" or not isinstance(k, int):
            return None
        if any(o.type.dtype.name != "f32" for o in op.operands[1:]):
            return None
        x2, m = self._rows(x, xt)  # type: ignore[attr-defined]
        try:
            prim = kern.norm_rows(self._m_arg(m), k, self.target, kind=kind,  # type: ignore[attr-defined]
                                  eps=float(op.attrs["eps"]))
        except Exception:  # noqa: BLE001
            prim = None
        if prim is None:
            return None
        return self._call_kernel(op, prim, f"{kind}_norm_k", [x2, *params], m, k, xt)  # type: ignore[attr-defined]

    def _kernel_quantize_rows(self, op: Op, x: Any, xt: TensorType, t: TensorType, spec: QuantSpec
                              ) -> QVal | None:
        """Dynamic per-token quantization (one scale, and zero point, per row of the last axis) in one kernel."""
        kern = self._kernels()  # type: ignore[attr-defined]
        if kern is None or not spec.dynamic or xt.dtype.name != "f32":
            return None
        norm = spec.normalized(xt.rank)
        kdim = xt.shape[-1]
        if norm.axis != xt.rank - 1 or not isinstance(kdim, int):
            return None
        if norm.group_size is None or norm.group_size < kdim:  # no group: a scale per column, not per row
            return None
        lay = layout_of(t)
        if lay.packed or t.dtype.name not in ("i8", "u8"):
            return None
        x2, m = self._rows(x, xt)  # type: ignore[attr-defined]
        try:
            prim = kern.quantize_rows(self._m_arg(m), kdim, self.target,  # type: ignore[attr-defined]
                                      out_dtype=tvm_dtype(t.dtype), qmin=lay.qmin, qmax=lay.qmax,
                                      symmetric=not lay.has_zp)
        except Exception:  # noqa: BLE001
            prim = None
        if prim is None:
            return None
        gv = add_kernel(self.bb, prim, "quantize_rows_k")
        self._count("quantize_rows")
        R = self.relax
        outs = [R.TensorType([m, kdim], tvm_dtype(t.dtype)), R.TensorType([m], "float32")]
        if lay.has_zp:
            outs.append(R.TensorType([m], "int32"))
        qrange = R.const(np.array([lay.qmin, lay.qmax], np.float32), "float32")
        res = self.bb.emit(R.call_tir(gv, [x2, qrange], outs))
        lead = self.shape(xt.shape[:-1])  # type: ignore[attr-defined]
        codes = self.bb.emit(R.op.reshape(R.TupleGetItem(res, 0), lead + [kdim]))
        self.names[op.result.name] = codes.name
        # qir's per-row parameter layout: the tensor's shape with the grouped (last) axis of size 1.
        scale = self.bb.emit(R.op.reshape(R.TupleGetItem(res, 1), lead + [1]))
        zp = self.bb.emit(R.op.reshape(R.TupleGetItem(res, 2), lead + [1])) if lay.has_zp else None
        return QVal(codes, scale, zp, lay, t)
