"""Lowering of qir's quantized ops (and the matmuls that may use scheduled kernels) to TVM: a mixin of the lowering.

:class:`QuantLowering` holds the methods of :class:`qir.backends.tvm.lower._FunctionLowering` for ``quantize``,
``dequantize``, ``requantize``, ``qembedding`` and ``qmatmul`` (integer path and weight-only), and the calls into
``qir.backends.tvm.kernels`` (``qmatmul_i8``, ``wmatmul``, ``matmul_f32``) with their fallbacks to the TE computes
of :mod:`.qops`. A quantized value is a :class:`QVal` while it is lowered: its codes, scale, zero point and offset
as Relax expressions and its :class:`~qir.backends.tvm.qops.QLayout`.

Weights in a GGUF block format (``qir import --keep-quantized``) arrive with ``offset=@...`` specs (the block
minimum: ``x = scale*q + offset``), fp16 block parameters and, after ``compress-scales`` or for K-quants,
two-level parameters (the scale/offset constants are quantized themselves). The weight codes stay packed; fp16
parameters are passed as fp16 and widened inside the kernels; a two-level parameter is a :class:`QVal` itself
(its codes stay as stored, :class:`~qir.backends.tvm.qops.NestedParam` dequantizes them where they are read); a
deeper one is folded to one f32 per block at compile time
(:meth:`qir.backends.tvm.lower._FunctionLowering.weight_param`, listed in the artifact's ``report.json``). The
weight-only kernels dequantize ``f32(q - zp) * scale + offset`` in registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qir.backends.tvm import qops
from qir.backends.tvm.qops import QLayout, tvm_dtype
from qir.graph import Op, Value
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["QVal", "QuantLowering", "add_kernel", "layout_of"]


def add_kernel(bb: Any, prim: Any, name: str) -> Any:
    """Add a scheduled kernel from :mod:`qir.backends.tvm.kernels` to the module; returns its ``GlobalVar``.

    It becomes a private helper (``add_func`` names it) marked ``tirx.is_scheduled``, so the default schedules
    of :mod:`.schedule` leave it alone. Unmarked, DLight's ``ApplyDefaultSchedule`` ran the generic CPU rule over
    it again, which inlined the f32 GEMM's packed weight panels back into the FMA loop (strided gathers: SmolLM2's
    down projection at 512 tokens took 22 ms instead of 4.3).
    """
    if "global_symbol" in (prim.attrs or {}):
        prim = prim.without_attr("global_symbol")
    return bb.add_func(prim.with_attr("tirx.is_scheduled", True), name)


@dataclass(frozen=True)
class QVal:
    """A quantized value during lowering: Relax expressions for its codes and parameters, plus their layout."""

    codes: Any
    scale: Any
    zp: Any | None
    lay: QLayout
    type: TensorType
    offset: Any | None = None


def layout_of(t: TensorType) -> QLayout:
    """The :class:`QLayout` of a quantized tensor type."""
    spec = t.quant
    assert spec is not None
    norm = spec.normalized(t.rank)
    dt = t.dtype
    return QLayout(axis=norm.axis, group=norm.group_size, bits=dt.bits if dt.bits < 8 else 8,
                   signed=dt.kind == "int", has_zp=not spec.symmetric, qmin=dt.qmin, qmax=dt.qmax)


class QuantLowering:
    """Quantized-op handlers (``op_<opcode>``); mixed into the function lowering, whose helpers they use."""

    relax: Any
    tir: Any
    bb: Any
    target: Any
    use_kernels: bool
    kernel_counts: dict[str, int]
    names: dict[str, str]

    # -- quantized ------------------------------------------------------------------------------------
    def _quantize_float(self, op: Op, x: Any, xt: TensorType, t: TensorType, v: Value) -> QVal:
        R = self.relax.op
        spec = t.quant
        assert spec is not None
        lay = layout_of(t)
        if lay.packed:
            raise self.fail(op, f"quantizing activations to the sub-byte type {t.dtype} is not supported by the "
                                "TVM backend (use 8-bit activations)")
        if spec.dynamic:
            fused = self._kernel_quantize_rows(op, x, xt, t, spec)  # type: ignore[attr-defined]
            if fused is not None:
                return fused
            scale, zp = self._dynamic_params(op, x, xt, spec.normalized(xt.rank), lay, t)
        else:
            scale = self._param_expr(spec.scale, "float32")
            zp = self._param_expr(spec.zero_point, "int32")
        if scale is not None and not isinstance(scale, self.relax.Var):
            scale = self.bb.emit(scale)
        if zp is not None and not isinstance(zp, self.relax.Var):
            zp = self.bb.emit(zp)
        dt = tvm_dtype(t.dtype)
        args = [x, scale] + ([zp] if zp is not None else [])
        codes = self.emit_te(lambda X, S, *Z: qops.quantize_te(X, S, Z[0] if Z else None, lay, dt), args,
                             "quantize", v)
        del R
        return QVal(codes, scale, zp, lay, t)

    def _dynamic_params(self, op: Op, x: Any, xt: TensorType, spec: QuantSpec, lay: QLayout,
                        t: TensorType) -> tuple[Any, Any | None]:
        R = self.relax.op
        rank = xt.rank
        if spec.axis is None:
            lo, hi = R.reshape(R.min(x), [1]), R.reshape(R.max(x), [1])
        elif spec.group_size is None:
            others = [a for a in range(rank) if a != spec.axis]
            lo, hi = (R.min(x, axis=others), R.max(x, axis=others)) if others else (x, x)
        else:
            n = xt.shape[spec.axis]
            g = spec.group_size
            if isinstance(n, int) and g >= n:
                lo, hi = R.min(x, axis=[spec.axis], keepdims=True), R.max(x, axis=[spec.axis], keepdims=True)
            elif isinstance(n, int) and n % g == 0:
                split = self.shape(xt.shape[:spec.axis]) + [n // g, g] + self.shape(xt.shape[spec.axis + 1:])
                xr = R.reshape(x, split)
                lo, hi = R.min(xr, axis=[spec.axis + 1]), R.max(xr, axis=[spec.axis + 1])
            else:
                raise self.fail(op, f"dynamic groups of {g} must divide the axis size {n}")
        zero = self.relax.const(0.0, "float32")
        lo = self.bb.emit(R.minimum(R.astype(lo, "float32"), zero))
        hi = self.bb.emit(R.maximum(R.astype(hi, "float32"), zero))
        scale = self.bb.emit_te(lambda L, H: qops.dyn_scale_te(L, H, lay.qmin, lay.qmax, not lay.has_zp), lo, hi,
                                primfunc_name_hint="qscale")
        zp = None
        if lay.has_zp:
            zp = self.bb.emit_te(lambda L, S: qops.dyn_zp_te(L, S, lay.qmin, lay.qmax), lo, scale,
                                 primfunc_name_hint="qzp")
        return scale, zp

    def op_quantize(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self._quantize_float(op, x, op.operands[0].type, op.result.type, op.result)]

    @staticmethod
    def _flat(*params: Any) -> list[Any]:
        """Relax arguments of block parameters, in order: a plain tensor as itself, a two-level one (a
        :class:`QVal`) as its codes, scale, zero point and offset (what :meth:`_te_params` takes back)."""
        out: list[Any] = []
        for p in params:
            if isinstance(p, QVal):
                out += [p.codes, p.scale] + [e for e in (p.zp, p.offset) if e is not None]
            elif p is not None:
                out.append(p)
        return out

    @staticmethod
    def _te_params(it: Any, *params: Any) -> list[Any]:
        """The TE tensors for ``params`` from the iterator ``it`` over ``emit_te``'s arguments (see :meth:`_flat`):
        ``None`` stays ``None``, a two-level parameter becomes a :class:`~.qops.NestedParam`."""
        out: list[Any] = []
        for p in params:
            if isinstance(p, QVal):
                codes, scale = next(it), next(it)
                zp = next(it) if p.zp is not None else None
                off = next(it) if p.offset is not None else None
                out.append(qops.NestedParam(codes, scale, zp, off, p.lay))
            else:
                out.append(next(it) if p is not None else None)
        return out

    def _dequantize(self, q: QVal, out_dtype: str, v: Value | None) -> Any:
        shape = self.shape(q.type.shape)
        args = [q.codes] + self._flat(q.scale, q.zp, q.offset)

        def fn(C: Any, *rest: Any) -> Any:
            s, z, o = self._te_params(iter(rest), q.scale, q.zp, q.offset)
            return qops.dequantize_te(C, s, z, q.lay, shape, out_dtype, o)

        return self.emit_te(fn, args, "dequantize", v)

    def _f32(self, e: Any) -> Any:
        """``e`` as a float32 Relax tensor (fp16 block scales of GGUF weights are widened for the integer path,
        two-level ones dequantized)."""
        if isinstance(e, QVal):
            return self._dequantize(e, "float32", None)
        if e is None or e.ty.dtype == "float32":
            return e
        return self.bb.emit(self.relax.op.astype(e, "float32"))

    def op_dequantize(self, op: Op) -> list[Any]:
        q = self.get(op.operands[0])
        if not isinstance(q, QVal):
            raise self.fail(op, "operand is not quantized")
        return [self._dequantize(q, tvm_dtype(op.result.type.dtype), op.result)]

    def op_requantize(self, op: Op) -> list[Any]:
        q = self.get(op.operands[0])
        assert isinstance(q, QVal)
        f = self._dequantize(q, "float32", None)
        return [self._quantize_float(op, f, q.type, op.result.type, op.result)]

    def op_qembedding(self, op: Op) -> list[Any]:
        table = self.get(op.operands[0])
        ids = self.plain(op, op.operands[1])
        assert isinstance(table, QVal)
        dim = table.type.shape[1]
        dt = tvm_dtype(op.result.type.dtype)
        if op.operands[0].name in self.prepacked:  # type: ignore[attr-defined]
            # A tied int8 table stored as the int8 matmul's tiles: element (row, d) is Wp[row / L, d / 4, row % L,
            # d % 4] (prepacking only takes symmetric per-row int8 tables: no zero point, no offset).
            args = [table.codes] + self._flat(table.scale) + [ids]

            def fn(tab: Any, *rest: Any) -> Any:
                it = iter(rest)
                (s,) = self._te_params(it, table.scale)
                return qops.qembedding_tiles_te(tab, s, table.lay, next(it), dim, dt)
        else:
            args = [table.codes, ids] + self._flat(table.scale, table.zp, table.offset)

            def fn(tab: Any, ids_te: Any, *rest: Any) -> Any:
                s, z, o = self._te_params(iter(rest), table.scale, table.zp, table.offset)
                return qops.qembedding_te(tab, s, z, table.lay, ids_te, dim, dt, o)

        return [self.emit_te(fn, args, "qembedding", op.result)]

    def op_qmatmul(self, op: Op) -> list[Any]:
        x = self.get(op.operands[0])
        w = self.get(op.operands[1])
        b = self.plain(op, op.operands[2]) if len(op.operands) > 2 else None
        if not isinstance(w, QVal):
            raise self.fail(op, "the weight is not quantized")
        n, k = w.type.shape
        if not isinstance(n, int) or not isinstance(k, int):
            raise self.fail(op, "the weight needs fixed sizes")
        out_dt = tvm_dtype(op.result.type.dtype)
        if isinstance(x, QVal) and (y := self._kernel_w4a8(op, x, w, b, n, k)) is not None:
            pass  # one token of int8 codes times grouped 4-bit weights: integer dot products
        elif isinstance(x, QVal) and w.offset is not None:
            # A float minimum per group (w4a8 with zero=float) outside the decode kernel: the float product of the
            # dequantized operands (the interpreter's integer path up to float rounding), which takes the weight-
            # only kernels (a prefill GEMM dequantizes the weight once per call either way).
            xf = self._dequantize(x, "float32", None)
            xt = x.type.with_quant(None).with_dtype("f32")
            y = self._kernel_wmatmul(op, xf, w, b, n, k, xt)
            if y is None:
                y = self._te_wmatmul(op, xf, w, b, n, k, out_dt)
        elif isinstance(x, QVal):
            w = QVal(w.codes, self._f32(w.scale), w.zp, w.lay, w.type)
            y = self._kernel_qmatmul_i8(op, x, w, b, n, k)
            if y is None:
                self.kernel_counts["te:qmatmul"] = self.kernel_counts.get("te:qmatmul", 0) + 1
                # 8-bit weights are read transposed ([K, N], one transpose per call) so the output features
                # form the contiguous inner loop the generic CPU schedule vectorizes.
                w_kn = not w.lay.packed
                wcodes = self.bb.emit(self.relax.op.permute_dims(w.codes, [1, 0])) if w_kn else w.codes
                args = [x.codes, x.scale, wcodes, w.scale]
                extra = [e for e in (x.zp, w.zp, b) if e is not None]
                xz, wz, hb = x.zp is not None, w.zp is not None, b is not None

                def fn(XQ: Any, SX: Any, WQ: Any, SW: Any, *rest: Any) -> Any:
                    it = iter(rest)
                    zx = next(it) if xz else None
                    zw = next(it) if wz else None
                    bias = next(it) if hb else None
                    return qops.qmatmul_int_te(XQ, SX, zx, x.lay, WQ, SW, zw, w.lay, n, k, bias, w_kn=w_kn)

                y = self.emit_te(fn, args + extra, "qmatmul", None if out_dt != "float32" else op.result)
        else:
            y = self._kernel_wmatmul(op, x, w, b, n, k)
            if y is None:
                y = self._te_wmatmul(op, x, w, b, n, k, out_dt)
        if out_dt != "float32":
            y = self.emit(self.relax.op.astype(y, out_dt), op.result)
        self.names[op.result.name] = y.name
        return [y]

    # -- scheduled kernels (qir.backends.tvm.kernels) ---------------------------------------------------
    def _kernels(self) -> Any | None:
        if not self.use_kernels or self.target is None:
            return None
        try:
            from qir.backends.tvm import kernels
        except ImportError:
            return None
        return kernels

    def _rows(self, e: Any, t: TensorType) -> tuple[Any, Any]:
        """``e [..., K]`` as ``[M, K]`` (a reshape) and ``M`` (an int or a TIR expression)."""
        lead = t.shape[:-1]
        m: Any = 1
        for d in lead:
            m = m * self.dim(d) if not (isinstance(m, int) and isinstance(d, int)) else m * d
        if len(lead) == 1:
            return e, m
        return self.bb.emit(self.relax.op.reshape(e, [m, self.dim(t.shape[-1])])), m

    def _call_kernel(self, op: Op, prim: Any, name: str, args: list[Any], m: Any, n: int, lead_type: TensorType
                     ) -> Any:
        gv = add_kernel(self.bb, prim, name)
        y2 = self.bb.emit(self.relax.call_tir(gv, args, self.relax.TensorType([m, n], "float32")))
        out_shape = self.shape(lead_type.shape[:-1]) + [self.tir.IntImm("int64", n)]
        key = name.removesuffix("_k")
        self.kernel_counts[key] = self.kernel_counts.get(key, 0) + 1
        if len(lead_type.shape) == 2:
            self.names[op.result.name] = y2.name
            return y2
        return self.emit(self.relax.op.reshape(y2, out_shape), op.result)

    def _m_arg(self, m: Any) -> Any:
        """``M`` for a kernel builder: an int, or a fresh TIR var (the kernel binds it from the buffer shape)."""
        if isinstance(m, int):
            return m
        if isinstance(m, self.tir.IntImm):
            return int(m.value)
        return self.tir.Var("m", "int64")

    def _kernel_matmul_f32(self, op: Op, x: Any, w: Any, b: Any | None) -> Any | None:
        kern = self._kernels()
        wt = op.operands[1].type
        if kern is None or wt.rank != 2 or not isinstance(wt.shape[0], int) or not isinstance(wt.shape[1], int):
            return None
        n, k = int(wt.shape[0]), int(wt.shape[1])
        xt = op.operands[0].type
        x2, m = self._rows(x, xt)
        try:
            prim = kern.matmul_f32(self._m_arg(m), n, k, self.target, b_layout="NK", bias=b is not None)
        except Exception:  # noqa: BLE001 - a kernel that cannot be built falls back to the plain lowering
            prim = None
        if prim is None:
            return None
        args = [x2, w] + ([b] if b is not None else [])
        return self._call_kernel(op, prim, "matmul_f32_k", args, m, n, xt)

    @staticmethod
    def _i8_kernel_mode(xt: TensorType, wt: TensorType) -> tuple[bool, int] | None:
        """``(per_token, activation zero point)`` when ``qmatmul(x, w)`` fits the int8 kernel, else ``None``."""
        xs, wl = xt.quant, layout_of(wt)
        if xs is None or wt.dtype.name != "i8" or wl.has_zp or wl.group is not None:
            return None
        if xt.dtype.name not in ("i8", "u8"):
            return None
        xl = layout_of(xt)
        per_token = xl.axis == xt.rank - 1 and xl.group is not None
        if not (per_token or xl.axis is None):
            return None
        a_zp = 0
        if not xs.symmetric:
            if xs.dynamic or not isinstance(xs.zero_point, int):
                return None
            a_zp = int(xs.zero_point)
        return per_token, a_zp

    def _prepack_isa_for(self, name: str) -> str | None:
        """The ISA whose int8 kernel will read constant ``name`` prepacked, when every use of it in the module is
        the weight of such a ``qmatmul`` or (a tied embedding/head table) a ``qembedding`` lookup."""
        kern = self._kernels()
        t = self.module.constant(name).type  # type: ignore[attr-defined]
        if kern is None or t.quant is None or t.rank != 2 or not isinstance(t.shape[1], int):
            return None
        if t.quant.offset is not None or (isinstance(t.quant.scale, str)
                                          and self.module.constant(t.quant.scale).type.quant is not None):  # type: ignore[attr-defined]
            return None  # GGUF minimums and two-level scales stay on the generic (weight-only) paths
        uses = [(op, i) for fname in self.module.functions  # type: ignore[attr-defined]
                for op in self.module.function(fname).ops  # type: ignore[attr-defined]
                for i, v in enumerate(op.operands) if v.is_constant and v.name == name]
        for op, i in uses:
            if op.opcode == "qembedding" and i == 0 and t.dtype.name == "i8" and not layout_of(t).has_zp:
                continue  # a tied table: the lookup reads the tiles (qops.qembedding_tiles_te)
            if op.opcode != "qmatmul" or i != 1 or self._i8_kernel_mode(op.operands[0].type, t) is None:
                return None
        if not any(op.opcode == "qmatmul" for op, _ in uses):
            return None
        return kern.prepack_isa(int(t.shape[1]), self.target) if uses else None

    def _kernel_qmatmul_i8(self, op: Op, x: QVal, w: QVal, b: Any | None, n: int, k: int) -> Any | None:
        kern = self._kernels()
        if kern is None:
            return None
        mode = self._i8_kernel_mode(x.type, w.type)
        if mode is None:
            return None
        per_token, a_zp = mode
        rowsum = self.prepacked.get(op.operands[1].name)  # type: ignore[attr-defined]
        x2, m = self._rows(x.codes, x.type)
        try:
            prim = kern.qmatmul_i8(self._m_arg(m), n, k, self.target, a_dtype=tvm_dtype(x.type.dtype),
                                   a_scale="token" if per_token else "tensor", a_zero_point=a_zp,
                                   bias=b is not None, prepacked=rowsum is not None)
        except Exception:  # noqa: BLE001 - fall back to the TE compute
            if rowsum is not None:
                raise  # the weight is stored packed: there is no other lowering for it
            prim = None
        if prim is None:
            return None
        sx = x.scale
        if per_token:
            sx = self.bb.emit(self.relax.op.reshape(sx, [m]))
        sw = w.scale
        if w.lay.axis is None:
            sw = self.bb.emit(self.relax.op.broadcast_to(sw, [n]))
        wargs = [w.codes] if rowsum is None else [w.codes, rowsum]
        args = [x2, *wargs, sx, sw] + ([b] if b is not None else [])
        return self._call_kernel(op, prim, "qmatmul_i8_k", args, m, n, x.type)

    def _te_wmatmul(self, op: Op, x: Any, w: QVal, b: Any | None, n: int, k: int, out_dt: str) -> Any:
        """The weight-only ``qmatmul`` as a plain TE compute (no scheduled kernel for this case)."""
        self.kernel_counts["te:wmatmul"] = self.kernel_counts.get("te:wmatmul", 0) + 1
        args = [x, w.codes] + self._flat(w.scale, w.zp, w.offset, b)

        def wfn(X: Any, WQ: Any, *rest: Any) -> Any:
            sw, zw, ow, bias = self._te_params(iter(rest), w.scale, w.zp, w.offset, b)
            return qops.wmatmul_te(X, WQ, sw, zw, w.lay, n, k, bias, ow)

        return self.emit_te(wfn, args, "wmatmul", None if out_dt != "float32" else op.result)

    def _w4a8_forms(self, w: QVal) -> tuple[Any, Any, str | None] | None:
        """The w4a8 GEMV's parameter forms for ``w`` (scale, offset, zero-point dtype), or ``None`` where it has none:
        4-bit codes in groups of a multiple of 32 along K, unsigned when they have zero points, and block parameters
        plain f32/f16 or two-level (``compress-scales``)."""
        wl = w.lay
        if wl.bits != 4 or wl.axis != 1 or not wl.group or wl.group % 32:
            return None
        if wl.has_zp and wl.signed:
            return None

        def form(p: Any) -> Any:
            if isinstance(p, QVal):
                if p.zp is not None or p.offset is None or p.lay.axis != 0 or p.lay.group is not None:
                    return False
                return (p.codes.ty.dtype, p.scale.ty.dtype, p.offset.ty.dtype)
            return p.ty.dtype if p.ty.dtype in ("float32", "float16") else False

        sform = form(w.scale)
        oform = form(w.offset) if w.offset is not None else None
        if sform is False or oform is False:
            return None
        return sform, oform, (w.zp.ty.dtype if w.zp is not None else None)

    def _kernel_w4a8(self, op: Op, x: QVal, w: QVal, b: Any | None, n: int, k: int) -> Any | None:
        """The w4a8 decode GEMV (:mod:`~qir.backends.tvm.kernels.w4a8_gemv`) for one token of symmetric int8
        per-token codes times a 4-bit weight in groups of 32s along K, or ``None``."""
        kern = self._kernels()
        xt, wl = x.type, w.lay
        forms = self._w4a8_forms(w)
        if kern is None or forms is None or k % wl.group:
            return None
        if xt.dtype.name != "i8" or x.zp is not None or x.lay.axis != xt.rank - 1 or x.lay.group is None:
            return None
        if any(d != 1 for d in xt.shape[:-1]):  # a static single token only (a symbolic dim is not 1 either)
            return None
        sform, oform, zdt = forms
        # The token's own quantize folded into the kernel when it is the usual dynamic symmetric per-token one of
        # an f32 value (the separate quantize_rows call is then unused and removed): one launch instead of two.
        src = op.operands[0].producer
        fold = (src is not None and src.opcode == "quantize" and xt.quant is not None and xt.quant.dynamic
                and src.operands[0].type.dtype.name == "f32" and x.lay.group is not None
                and x.lay.group >= xt.shape[-1])
        prim = None
        for quantize_x in ([(x.lay.qmin, x.lay.qmax)] if fold else []) + [None]:
            try:
                prim = kern.w4a8_gemv(n, k, wl.group, self.target, signed=wl.signed, zp_dtype=zdt, scale=sform,
                                      offset=oform, bias=b is not None, quantize_x=quantize_x)
            except Exception:  # noqa: BLE001 - a kernel that cannot be built falls back to the other lowerings
                prim = None
            if prim is not None:
                break
        if prim is None:
            return None
        if quantize_x is not None:
            xf, _ = self._rows(self.plain(src, src.operands[0]), src.operands[0].type)
            args = [xf, w.codes] + self._flat(w.scale, w.zp, w.offset, b)
        else:
            x2, _ = self._rows(x.codes, xt)
            sx = self.bb.emit(self.relax.op.reshape(x.scale, [1]))
            args = [x2, sx, w.codes] + self._flat(w.scale, w.zp, w.offset, b)
        return self._call_kernel(op, prim, "w4a8_k", args, 1, n, xt)

    def _kernel_w4a16_dot(self, op: Op, x: Any, w: QVal, b: Any | None, n: int, k: int, xt: TensorType
                          ) -> Any | None:
        """A float token times 4-bit weights in groups of 32 on the w4a8 GEMV's dot products (``float_x``: the
        token split into two int8 parts per chunk of 32, carried to 1.6e-5 of the chunk's largest magnitude), or
        ``None`` (not one static token of f32, no x86 dot-product path, another layout)."""
        kern = self._kernels()
        forms = self._w4a8_forms(w)
        if kern is None or forms is None or w.lay.group != 32 or k % 64 or xt.dtype.name != "f32":
            return None
        if any(d != 1 for d in xt.shape[:-1]):
            return None
        sform, oform, zdt = forms
        try:
            prim = kern.w4a8_gemv(n, k, 32, self.target, signed=w.lay.signed, zp_dtype=zdt, scale=sform,
                                  offset=oform, bias=b is not None, float_x=True)
        except Exception:  # noqa: BLE001 - fall back to the float GEMV
            prim = None
        if prim is None:
            return None
        x2, _ = self._rows(x, xt)
        args = [x2, w.codes] + self._flat(w.scale, w.zp, w.offset, b)
        return self._call_kernel(op, prim, "w4a16dot_k", args, 1, n, xt)

    def _kernel_wmatmul(self, op: Op, x: Any, w: QVal, b: Any | None, n: int, k: int,
                        xt: TensorType | None = None) -> Any | None:
        kern = self._kernels()
        if kern is None:
            return None
        xt = xt or op.operands[0].type
        wl = w.lay
        if (y := self._kernel_w4a16_dot(op, x, w, b, n, k, xt)) is not None:
            return y  # one token: the dot-product GEMV, twice the float one's speed
        if wl.bits not in (4, 8) or (wl.axis is not None and wl.axis != (1 if wl.group else 0)):
            return None
        if wl.axis is None or (wl.bits == 4 and k % 2) or xt.dtype.name != "f32":
            return None
        if wl.has_zp and wl.signed:  # the kernel's zero points go with unsigned codes (qir's asymmetric specs)
            return None
        x2, m = self._rows(x, xt)
        sdt, odt = self._kernel_param_dtype(kern, w.scale), self._kernel_param_dtype(kern, w.offset)
        try:
            prim = kern.wmatmul(self._m_arg(m), n, k, wl.bits, wl.group or 0, self.target,
                                symmetric=not wl.has_zp, signed=wl.signed, bias=b is not None,
                                offset=w.offset is not None, scale_dtype=sdt, offset_dtype=odt)
        except Exception:  # noqa: BLE001 - fall back to the TE compute
            prim = None
        if prim is None:
            return None
        args = [x2, w.codes] + self._flat(w.scale, w.zp, w.offset, b)
        return self._call_kernel(op, prim, f"wmatmul{wl.bits}_k", args, m, n, xt)

    @staticmethod
    def _kernel_param_dtype(kern: Any, p: Any) -> Any:
        """What :func:`~qir.backends.tvm.kernels.wmatmul` takes for a block parameter: its dtype, or a ``Nested``."""
        if p is None:
            return "float32"
        if isinstance(p, QVal):
            return kern.Nested(p.lay, p.scale.ty.dtype, None if p.offset is None else p.offset.ty.dtype)
        return p.ty.dtype
