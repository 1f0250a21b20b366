"""Lower one qir function to an ONNX model (opset 21) that ONNX Runtime runs.

Naming: every qir value keeps its name as the ONNX value name (``%linear_3`` is ``linear_3``), and every qir
constant its name as the initializer name (``@w.scale`` is ``w.scale``), so tensors can be compared by name
against :func:`qir.interpreter.run` (``observer``). Helper tensors a lowering needs are named
``<result>::<what>``. Initializers stored in another layout than the qir constant carry a suffix: ``<w>::T`` is
``w`` transposed to ``[K, N]`` (quantized matmul weights), ``<w>::nbits`` the packed ``MatMulNBits`` blob.
Symbolic sizes become ``dim_param`` (``seq``, ``past+1``); ops whose attributes hold symbolic sizes
(``reshape``, ``expand``, ``arange``) read them at run time with ``Shape`` from an input that carries them.

Float ops map one to one where ONNX has the op (``layer_norm`` -> ``LayerNormalization``, ``gelu`` -> ``Gelu``);
``rms_norm`` is spelled ``Pow, ReduceMean, Add, Sqrt, Div, Mul`` (the pattern ORT fuses into
``SimplifiedLayerNormalization``); ``attention`` is decomposed (grouped-query heads expanded, a boolean or
bottom-right causal mask added as one finite bias per mask, fully masked rows give 0 as in qir). On ORT CPU
(``contrib_ops``) an add that a norm or a gelu reads is ``Sum``, which ORT leaves unfused (its fused kernels are
slower, see :meth:`_Lowerer.add_kind`).

Quantized ops (semantics of :mod:`qir.ops.quantized` and :mod:`qir.quant`):

* ``quantize`` static -> ``QuantizeLinear`` (per tensor / ``axis`` / ``block_size``); dynamic -> the explicit
  min/max graph (``ReduceMax(Abs)``, ``Div``, ``Max``, then a blocked ``QuantizeLinear`` per token, or ``Round``,
  ``Clip``, ``Cast``) that reproduces :func:`qir.quant.quantize_dynamic`'s codes bit for bit, per tensor or per
  token.
* ``dequantize`` -> ``DequantizeLinear`` (static parameters) or ``Cast, Sub, Mul`` (dynamic).
* ``qmatmul`` with float ``x`` (weight-only): 4-bit per-group weights -> ``com.microsoft.MatMulNBits`` on
  ``ort-cpu`` (``int4="nbits"``); otherwise ``DequantizeLinear`` (axis / block_size) on the transposed codes ->
  ``MatMul``.
* ``qmatmul`` with quantized ``x``: ``mode="integer"`` -> ``MatMulInteger`` (int32 accumulation) -> ``Cast`` ->
  ``Mul(sx * sw)`` -> ``Add(bias)``: the interpreter's integer path, exact (symmetric per-token activations:
  ``com.microsoft.MatMulIntegerToFloat`` with the weight scale, then ``Mul(sx)``; the projections that read one
  activation, Q/K/V, share one such GEMM and a ``Split``); ``mode="qdq"`` -> ``DequantizeLinear`` on both sides
  -> ``MatMul`` (the form ORT's QDQ optimizer fuses, and what Ascend's ``convert_qat_model`` reads).
* ``qembedding`` -> ``Gather`` of codes and of per-row / per-group scales, then the dequantization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qir.dtypes import DType, i8
from qir.dtypes import u8 as u8_dtype
from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op, Value
from qir.ops import get_op
from qir.quant import expand_params
from qir.quantspec import QuantSpec
from qir.shapes import Dim, SymDim, dim
from qir.types import TensorType

__all__ = ["LowerError", "LowerOptions", "LoweredFunction", "ONNX_DTYPES", "lower_function", "onnx_dtype"]

OPSET = 21
MS_DOMAIN = "com.microsoft"
INT64_MAX = 2**63 - 1

ONNX_DTYPES: dict[str, int] = {
    "f64": TensorProto.DOUBLE, "f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
    "i64": TensorProto.INT64, "i32": TensorProto.INT32, "i16": TensorProto.INT16, "i8": TensorProto.INT8,
    "u8": TensorProto.UINT8, "i4": TensorProto.INT4, "u4": TensorProto.UINT4, "bool": TensorProto.BOOL,
}


class LowerError(QirError):
    """A qir function cannot be lowered to ONNX (an op or a type the lowering does not support)."""


def onnx_dtype(dt: DType) -> int:
    """The ``TensorProto`` element type of a qir dtype (raises for dtypes ONNX opset 21 lacks)."""
    try:
        return ONNX_DTYPES[dt.name]
    except KeyError:
        raise LowerError(f"dtype {dt} has no ONNX opset-{OPSET} element type (2-bit types need opset 25)") from None


@dataclass(frozen=True)
class LowerOptions:
    """Choices of the lowering.

    ``qmatmul``: ``"integer"`` (exact ``MatMulInteger`` path where ``x`` is quantized) or ``"qdq"`` (dequantize
    both operands, float ``MatMul``; what ORT's QDQ optimizer and Ascend's converter read). ``int4``: ``"nbits"``
    (``com.microsoft.MatMulNBits`` for 4-bit per-group weight-only matmuls) or ``"qdq"``. ``act_u8``: feed
    symmetric int8 activation codes to ``MatMulInteger`` as ``u8`` with zero point 128 (the same integers; the
    U8S8 kernels are ORT's fast CPU path). ``act_i8``: store static per-tensor ``u8`` activations as ``i8``
    (codes and zero point minus 128: the same real values; Ascend's AscendQuant is int8). ``opset``: 21, or
    17 for ATC (reduce axes as attributes, ``Gelu`` decomposed, no blocked or 4-bit Q/DQ). ``bind``: symbolic
    sizes fixed to numbers (static shapes). ``fallback_float``: result names of ``qmatmul`` / ``qembedding`` ops
    lowered in f16 from their dequantized weights instead of quantized (the ``--fallback`` option).
    """

    qmatmul: str = "integer"
    int4: str = "nbits"
    act_u8: bool = True
    act_i8: bool = False
    contrib_ops: bool = True
    opset: int = OPSET
    bind: tuple[tuple[str, int], ...] = ()
    fallback_float: frozenset[str] = frozenset()


@dataclass
class LoweredFunction:
    """The result of :func:`lower_function`: the model and what the lowering decided."""

    model: onnx.ModelProto
    function: str
    notes: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _NBits:
    """MatMulNBits initializers of one weight: codes ``[N, nb, blob]``, scales, zero points (or the default)."""

    codes: str
    scale: str
    zp: str | None
    bits: int
    group: int
    default_zp: int | None  # the zero point MatMulNBits assumes when ``zp`` is None


@dataclass
class _QInfo:
    """A quantized activation in the ONNX graph: codes, and scale / zero point broadcastable against the codes."""

    codes: str
    dtype: DType
    spec: QuantSpec
    scale_b: str            # f32, broadcastable against codes (scalar for per tensor)
    zp_b: str | None        # int32, broadcastable; None when symmetric
    rounded: str | None = None  # f32 codes before the cast (to derive other storage cheaply)
    q_scale: str | None = None  # the QuantizeLinear parameters, reused by the paired DequantizeLinear
    u8: str | None = None       # symmetric int8 codes + 128 as uint8 (for MatMulInteger's U8S8 kernels)
    q_zp: str | None = None


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


class _Lowerer:
    def __init__(self, module: Module, func: Function, opts: LowerOptions) -> None:
        self.module = module
        self.func = func
        self.opts = opts
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.names: set[str] = set()
        self.tname: dict[str, str] = {}  # constant -> its transposed initializer
        self.vname: dict[int, str] = {}
        self.cname: dict[str, str] = {}
        self.nbits: dict[str, _NBits] = {}
        self.pvals: dict[str, str | None] = {}
        self.qinfo: dict[int, _QInfo] = {}
        self.syms: dict[str, tuple[str, int, int]] = {}
        self.dim_cache: dict[str, str] = {}
        self.lit_cache: dict[tuple[Any, ...], str] = {}
        self.helper_cache: dict[tuple[Any, ...], str] = {}
        self.uses_ms = False
        self.notes: list[str] = []
        self.fallbacks: list[str] = []
        self.node_count = 0
        for v in func.inputs:
            self.names.add(v.name)
        for op in func.ops:
            for r in op.results:
                self.names.add(r.name)

    # -- names, initializers, nodes -----------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name = base
        i = 1
        while name in self.names:
            name = f"{base}:{i}"
            i += 1
        self.names.add(name)
        return name

    def init(self, base: str, arr: np.ndarray, *, exact: bool = False) -> str:
        name = base if exact and base not in self.names else self.fresh(base)
        self.names.add(name)
        self.inits[name] = numpy_helper.from_array(np.asarray(arr), name)
        return name

    def lit(self, value: Any, dt: Any) -> str:
        """A small literal initializer (cached by value)."""
        arr = np.asarray(value, dtype=dt)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.lit_cache:
            self.lit_cache[key] = self.init(f"c::{arr.dtype.name}::{'_'.join(map(str, arr.ravel()[:4]))}", arr)
        return self.lit_cache[key]

    def i64(self, values: Sequence[int]) -> str:
        return self.lit(list(values), np.int64)

    def reduce(self, op_type: str, x: str, axes: Sequence[int], out: str | None = None, *, hint: str = "t",
               keepdims: int = 1) -> str:
        """A reduction over ``axes``; axes are an input from opset 18 (13 for ReduceSum), an attribute before."""
        if op_type == "ReduceSum" or self.opts.opset >= 18:
            return self.node(op_type, [x, self.i64(list(axes))], out, hint=hint, keepdims=keepdims)
        return self.node(op_type, [x], out, hint=hint, keepdims=keepdims, axes=list(axes))

    def node(self, op_type: str, inputs: Sequence[str | None], out: str | Sequence[str] | None = None, *,
             hint: str = "t", domain: str = "", **attrs: Any) -> str:
        if isinstance(out, str) or out is None:
            outs = [out if out is not None else self.fresh(f"{hint}::{op_type}")]
        else:
            outs = list(out)
        if domain == MS_DOMAIN:
            self.uses_ms = True
        self.node_count += 1
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=f"{outs[0]}#{op_type}", domain=domain or None,
                                           **attrs))
        return outs[0]

    def const(self, c: Constant) -> str:
        """The initializer of qir constant ``c`` in qir's layout (codes for quantized constants)."""
        if c.name not in self.cname:
            arr = np.asarray(c.numpy())
            base = c.name if c.name not in self.names else f"const::{c.name}"
            self.cname[c.name] = self.init(base, arr, exact=True)
        return self.cname[c.name]

    def const_data(self, name: str) -> np.ndarray:
        c = self.module.constant(name)
        arr = np.asarray(c.numpy())
        if c.type.quant is not None:
            from qir.interpreter import RunContext

            ctx = RunContext(self.module)
            return np.asarray(ctx.constant(name).dequantize())
        return arr

    def val(self, v: Value) -> str:
        if v.is_constant:
            assert isinstance(v, Constant)
            return self.const(v)
        try:
            return self.vname[id(v)]
        except KeyError:
            raise LowerError(f"value {v.ref} is used before the op that defines it was lowered") from None

    # -- static quantization parameters ---------------------------------------------------------------------
    def params(self, t: TensorType, owner: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Scale (f32) and zero point (int64) arrays of a static quantized type, in the spec's layout."""
        spec = t.quant
        assert spec is not None and not spec.dynamic
        if isinstance(spec.scale, str):
            scale = _f32(self.const_data(spec.scale))
        else:
            scale = _f32(spec.scale)
        zp: np.ndarray | None
        if spec.zero_point is None:
            zp = None
        elif isinstance(spec.zero_point, str):
            zp = np.asarray(self.const_data(spec.zero_point)).astype(np.int64)
        else:
            zp = np.asarray(spec.zero_point, np.int64)
        return scale, zp

    def offset_data(self, t: TensorType) -> np.ndarray | None:
        """The f32 offset of a static quantized type in the spec's layout (dequantized if two-level), or None."""
        spec = t.quant
        if spec is None or spec.offset is None:
            return None
        return _f32(self.const_data(spec.offset))

    def param_value(self, name: str) -> str | None:
        """The f32 value of a two-level parameter constant, computed in the graph from its stored codes, or None.

        ``compress-scales`` stores block scales and minimums as u8 codes against an fp16 scale and base per row
        (``values = f32(code) * f32(row) + f32(base)``, the interpreter's order). Written as f32 initializers they
        took 4x their qir bytes (``w4a16-split`` on SmolLM2: 111 MB of files for 80 MB of weights); kept as codes,
        a ``Cast``/``Mul``/``Add`` recomputes them, which ONNX Runtime constant-folds when it loads the model (its
        ``MatMulNBits`` runs as fast with them: 5.6 vs 5.8 ms at 512 x 576 x 1536). None for any other constant
        (plain float, per tensor, zero points, three levels): those stay f32 arrays.
        """
        if name in self.pvals:
            return self.pvals[name]
        c = self.module.constant(name)
        q = c.type.quant
        self.pvals[name] = None
        if (q is None or q.dynamic or c.type.rank != 2 or q.axis != 0 or q.group_size is not None
                or q.zero_point is not None or not isinstance(q.scale, str) or c.type.dtype.kind != "uint"
                or not (q.offset is None or isinstance(q.offset, str))):
            return None
        parts = [q.scale] + ([q.offset] if isinstance(q.offset, str) else [])
        if any(self.module.constant(p).type.quant is not None for p in parts):
            return None
        codes = self.init(f"{name}::codes", np.asarray(c.numpy()).astype(np.uint8), exact=True)
        y = self.node("Cast", [codes], hint=name, to=TensorProto.FLOAT)
        for op_type, part in zip(("Mul", "Add"), parts, strict=False):
            arr = np.asarray(self.module.constant(part).numpy()).reshape(-1, 1)
            v = self.init(f"{part}::col", arr, exact=True)
            if arr.dtype != np.float32:
                v = self.node("Cast", [v], hint=part, to=TensorProto.FLOAT)
            y = self.node(op_type, [y, v], hint=name)
        self.pvals[name] = y
        return y

    def param_blocks(self, name: str | None, arr: np.ndarray | None, init_name: str, shape: Sequence[int]) -> str:
        """A per-block parameter in ``shape`` (a reshape of its ``[rows, blocks]`` layout): computed from its codes
        when ``name`` is two-level (:meth:`param_value`), else an initializer of ``arr``."""
        pv = self.param_value(name) if name is not None else None
        if pv is not None:
            return self.node("Reshape", [pv, self.i64(list(shape))], hint=init_name)
        assert arr is not None
        return self.init(init_name, np.ascontiguousarray(np.asarray(arr, np.float32).reshape(shape)))

    def zp_init(self, name: str, zp: np.ndarray) -> str:
        """A table's zero points as an initializer in the narrowest integer type that holds them (u8/i8: what qir
        stores; int32 expanded them 4x, 1.5 MB of MiniLM's 12 MB), read back through :meth:`as_int32`."""
        z = np.asarray(zp)
        for dt in (np.uint8, np.int8):
            if z.size and z.min() >= np.iinfo(dt).min and z.max() <= np.iinfo(dt).max:
                return self.init(name, z.astype(dt))
        return self.init(name, z.astype(np.int32))

    def as_int32(self, x: str, h: str) -> str:
        """``x`` (gathered from a :meth:`zp_init` initializer) as int32, for arithmetic with int32 codes."""
        return self.node("Cast", [x], hint=h, to=TensorProto.INT32)

    def param_inits(self, t: TensorType, owner: str, *, transpose: bool = False) -> tuple[str, str | None]:
        """ONNX ``(scale, zero_point)`` initializers for a static quantized type (zero point in the storage type)."""
        spec = t.quant
        assert spec is not None
        scale, zp = self.params(t, owner)
        if transpose:
            scale = scale.T if scale.ndim == 2 else scale
            zp = zp.T if zp is not None and zp.ndim == 2 else zp
        sname = spec.scale if isinstance(spec.scale, str) and not transpose else f"{owner}::scale"
        s = self.init(sname, np.ascontiguousarray(scale), exact=isinstance(spec.scale, str) and not transpose)
        z = None
        if zp is not None:
            z = self.init(f"{owner}::zp", np.ascontiguousarray(zp).astype(t.dtype.numpy))
        return s, z

    # -- symbolic sizes -------------------------------------------------------------------------------------
    def note_dims(self, onnx_name: str, t: TensorType) -> None:
        for axis, d in enumerate(t.shape):
            if isinstance(d, SymDim) and len(d.terms) == 1 and d.terms[0][1] == 1 and d.terms[0][0] not in self.syms:
                self.syms[d.terms[0][0]] = (onnx_name, axis, d.const)

    def dim_value(self, d: Dim) -> str:
        """A 1-element int64 tensor holding size ``d`` (computed at run time when symbolic)."""
        d = self.bound(d)
        if isinstance(d, int):
            return self.i64([d])
        key = str(d)
        if key in self.dim_cache:
            return self.dim_cache[key]
        total: str | None = None
        for sym, coef in d.terms:
            if sym not in self.syms:
                raise LowerError(f"@{self.func.name}: no input or earlier result carries the symbolic size {sym!r}")
            src, axis, const = self.syms[sym]
            piece = self.node("Shape", [src], hint=f"dim.{sym}", start=axis, end=axis + 1)
            if const:
                piece = self.node("Sub", [piece, self.i64([const])], hint=f"dim.{sym}")
            if coef != 1:
                piece = self.node("Mul", [piece, self.i64([coef])], hint=f"dim.{key}")
            total = piece if total is None else self.node("Add", [total, piece], hint=f"dim.{key}")
        assert total is not None
        if d.const:
            total = self.node("Add", [total, self.i64([d.const])], hint=f"dim.{key}")
        self.dim_cache[key] = total
        return total

    def shape_value(self, dims: Sequence[int | Dim | None], hint: str) -> str:
        """A 1-D int64 shape tensor; ``None`` entries become -1."""
        dims = [None if d is None else self.bound(d) for d in dims]
        if all(isinstance(d, int) or d is None for d in dims):
            return self.i64([-1 if d is None else int(d) for d in dims])
        parts = [self.i64([-1]) if d is None else self.dim_value(d) for d in dims]
        return self.node("Concat", parts, hint=hint, axis=0)

    @staticmethod
    def attr_dims(values: Sequence[int | str]) -> list[Dim | None]:
        return [None if (isinstance(v, int) and v == -1) else dim(v) for v in values]

    # -- value info -----------------------------------------------------------------------------------------
    def value_info(self, name: str, t: TensorType) -> onnx.ValueInfoProto:
        shape = [self.bound(d) for d in t.shape]
        return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), [d if isinstance(d, int) else str(d)
                                                                        for d in shape])

    def stored_type(self, v: Value) -> TensorType:
        """The type a value has in the ONNX graph (``act_i8`` stores u8 activations as i8)."""
        info = self.qinfo.get(id(v))
        return v.type.with_quant(None).with_dtype(info.dtype) if info is not None else v.type.with_quant(None)

    def bound(self, d: Dim) -> Dim:
        """``d`` with the bound symbols substituted (an int when all of them are bound)."""
        if isinstance(d, int) or not self.opts.bind:
            return d
        b = dict(self.opts.bind)
        if all(sym in b for sym in d.symbols):
            return d.const + sum(c * b[sym] for sym, c in d.terms)
        return d

    # -- the function ---------------------------------------------------------------------------------------
    def lower(self) -> LoweredFunction:
        func = self.func
        graph_inputs = []
        for v in func.inputs:
            self.vname[id(v)] = v.name
            graph_inputs.append(self.value_info(v.name, v.type))
            self.note_dims(v.name, v.type)
            if v.type.quant is not None:
                if v.type.quant.dynamic:
                    raise LowerError(f"input %{v.name} of @{func.name} has the dynamic quantized type {v.type}: an "
                                     "ONNX input cannot carry its run-time scale; quantize inside the function")
                self.qinfo[id(v)] = self.static_qinfo(v.name, v.type)
        for op in func.ops:
            self.lower_op(op)
            for r in op.results:
                if id(r) in self.vname:
                    self.note_dims(self.vname[id(r)], r.type)
        outputs = []
        seen: set[str] = set()
        for v in func.outputs:
            name = self.val(v)
            if name in seen or v.is_constant or name in {i.name for i in graph_inputs}:
                name = self.node("Identity", [name], hint=v.name)
            seen.add(name)
            outputs.append(self.value_info(name, self.stored_type(v)))
        infos = []
        out_names = {o.name for o in outputs}
        in_names = {i.name for i in graph_inputs}
        for op in func.ops:
            for r in op.results:
                n = self.vname.get(id(r))
                if n is not None and n not in out_names and n not in in_names:
                    infos.append(self.value_info(n, self.stored_type(r)))
        graph = helper.make_graph(self.nodes, func.name, graph_inputs, outputs, initializer=list(self.inits.values()),
                                  value_info=infos)
        opsets = [helper.make_opsetid("", self.opts.opset)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qir",
                                  doc_string=f"qir module @{self.module.name}, function @{func.name}")
        model.ir_version = 10 if self.opts.opset >= 21 else 8
        return LoweredFunction(model=model, function=func.name, notes=self.notes, fallbacks=self.fallbacks)

    def lower_op(self, op: Op) -> None:
        handler = getattr(self, f"op_{op.opcode}", None)
        if handler is None:
            handler = _SIMPLE.get(op.opcode)
            if handler is None:
                raise LowerError(f"@{self.func.name}: op {op.opcode} (result %{op.results[0].name}) has no ONNX "
                                 "lowering yet")
            out = self.node(handler, [self.val(v) for v in op.operands], op.result.name)
            self.vname[id(op.result)] = out
            return
        attrs = get_op(op.opcode).complete_attrs(op.attrs)
        try:
            handler(op, attrs)
        except LowerError:
            raise
        except QirError as exc:
            raise LowerError(f"@{self.func.name}: op {op.opcode} -> %{op.results[0].name}: {exc}") from None

    def set(self, op: Op, name: str) -> None:
        self.vname[id(op.result)] = name

    def out(self, op: Op) -> str:
        return op.result.name

    # -- elementwise ----------------------------------------------------------------------------------------
    def add_kind(self, v: Value) -> str:
        """``Add``, or ``Sum`` (the same float addition) where ORT's CPU fusion of the ``Add`` would be slower.

        With contrib ops (ORT CPU), an add whose result a ``layer_norm`` / ``rms_norm`` normalizes or a ``gelu``
        reads is emitted as ``Sum``, which ORT does not fuse. Measured on ORT 1.32 (MiniLM shapes, one thread):
        ``Add -> LayerNormalization`` fuses into ``SkipLayerNormalization``, whose CPU kernel is a scalar loop with
        a division per element and a one-pass variance, 5x slower than the pair (8x128x384: 1.75 vs 0.35 ms);
        ``Add -> Gelu`` fuses into ``BiasGelu``, 1.3x slower than the pair (8x128x1536: 1.27 vs 1.0 ms).
        """
        if not self.opts.contrib_ops:
            return "Add"
        for u in v.users():
            if (u.opcode in ("layer_norm", "rms_norm") and u.operands[0] is v) or u.opcode == "gelu":
                return "Sum"
        return "Add"

    def op_add(self, op: Op, a: Any) -> None:
        x, y = (self.val(v) for v in op.operands)
        self.set(op, self.node(self.add_kind(op.result), [x, y], self.out(op)))

    def op_ne(self, op: Op, a: Any) -> None:
        eq = self.node("Equal", [self.val(v) for v in op.operands], hint=self.out(op))
        self.set(op, self.node("Not", [eq], self.out(op)))

    def op_rsqrt(self, op: Op, a: Any) -> None:
        s = self.node("Sqrt", [self.val(op.operands[0])], hint=self.out(op))
        self.set(op, self.node("Reciprocal", [s], self.out(op)))

    def op_relu(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Relu", [self.val(op.operands[0])], self.out(op)))

    def op_silu(self, op: Op, a: Any) -> None:
        x = self.val(op.operands[0])
        s = self.node("Sigmoid", [x], hint=self.out(op))
        self.set(op, self.node("Mul", [x, s], self.out(op)))

    def op_gelu(self, op: Op, a: Any) -> None:
        x = self.val(op.operands[0])
        if self.opts.opset >= 20:
            self.set(op, self.node("Gelu", [x], self.out(op), approximate=a["approximate"]))
            return
        h = self.out(op)
        np_dt = op.operands[0].type.dtype.numpy
        if a["approximate"] == "tanh":
            cube = self.node("Mul", [self.node("Mul", [x, x], hint=h), x], hint=h)
            inner = self.node("Add", [x, self.node("Mul", [cube, self.lit(0.044715, np_dt)], hint=h)], hint=h)
            t = self.node("Tanh", [self.node("Mul", [inner, self.lit(math.sqrt(2.0 / math.pi), np_dt)], hint=h)],
                          hint=h)
        else:
            t = self.node("Erf", [self.node("Div", [x, self.lit(math.sqrt(2.0), np_dt)], hint=h)], hint=h)
        half_x = self.node("Mul", [x, self.lit(0.5, np_dt)], hint=h)
        self.set(op, self.node("Mul", [half_x, self.node("Add", [t, self.lit(1.0, np_dt)], hint=h)], h))

    def op_cast(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Cast", [self.val(op.operands[0])], self.out(op),
                               to=onnx_dtype(op.result.type.dtype)))

    # -- linear algebra ----------------------------------------------------------------------------------------
    def op_linear(self, op: Op, a: Any) -> None:
        x = self.val(op.operands[0])
        w = op.operands[1]
        wt = self.transposed_float(w)
        y = self.node("MatMul", [x, wt], None if len(op.operands) > 2 else self.out(op), hint=self.out(op))
        if len(op.operands) > 2:
            y = self.node(self.add_kind(op.result), [y, self.val(op.operands[2])], self.out(op))
        self.set(op, y)

    def transposed_float(self, w: Value) -> str:
        """``w.T`` of a 2-D weight. A constant read only as a ``linear`` weight is stored transposed (``<w>::T``,
        ``[K, N]``), the layout ``torch.onnx.export`` writes: ORT would fold a ``Transpose`` at load anyway, but
        tools that rewrite the file (ONNX Runtime's own quantizers, NPU converters) only recognise a ``MatMul``
        whose weight is an initializer. Anything else (a weight tied to an embedding) keeps a ``Transpose``."""
        if w.is_constant and w.type.quant is None and all(
                u.opcode == "linear" and u.operands[1] is w and u.operands[0] is not w for u in w.users()):
            if w.name not in self.tname:
                self.tname[w.name] = self.init(f"{w.name}::T", np.ascontiguousarray(self.const_data(w.name).T),
                                               exact=True)
            return self.tname[w.name]
        return self.node("Transpose", [self.val(w)], hint=f"{w.name}::T", perm=[1, 0])

    def op_embedding(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Gather", [self.val(op.operands[0]), self.val(op.operands[1])], self.out(op), axis=0))

    # -- nn -----------------------------------------------------------------------------------------------
    def op_softmax(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Softmax", [self.val(op.operands[0])], self.out(op), axis=a["axis"]))

    def op_layer_norm(self, op: Op, a: Any) -> None:
        x = op.operands[0]
        size = x.type.shape[-1]
        np_dt = x.type.dtype.numpy
        if len(op.operands) > 1:
            w = self.val(op.operands[1])
        else:
            if not isinstance(size, int):
                raise LowerError(f"layer_norm -> %{op.result.name}: a symbolic feature size needs a weight operand")
            w = self.lit(np.ones(size), np_dt)
        ins = [self.val(x), w]
        if len(op.operands) > 2:
            ins.append(self.val(op.operands[2]))
        self.set(op, self.node("LayerNormalization", ins, self.out(op), axis=-1, epsilon=float(a["eps"])))

    def op_rms_norm(self, op: Op, a: Any) -> None:
        x = self.val(op.operands[0])
        np_dt = op.operands[0].type.dtype.numpy
        h = self.out(op)
        sq = self.node("Pow", [x, self.lit(2.0, np_dt)], hint=h)
        ms = self.reduce("ReduceMean", sq, [-1], hint=h)
        ad = self.node("Add", [ms, self.lit(a["eps"], np_dt)], hint=h)
        rt = self.node("Sqrt", [ad], hint=h)
        if len(op.operands) > 1:
            y = self.node("Div", [x, rt], hint=h)
            y = self.node("Mul", [y, self.val(op.operands[1])], h)
        else:
            y = self.node("Div", [x, rt], h)
        self.set(op, y)

    def _reduce(self, op: Op, a: Any, onnx_op: str) -> None:
        self.set(op, self.reduce(onnx_op, self.val(op.operands[0]), a["axes"], self.out(op), hint=self.out(op),
                                 keepdims=int(bool(a["keepdim"]))))

    def op_mean(self, op: Op, a: Any) -> None:
        self._reduce(op, a, "ReduceMean")

    def op_sum(self, op: Op, a: Any) -> None:
        self._reduce(op, a, "ReduceSum")

    def op_max(self, op: Op, a: Any) -> None:
        self._reduce(op, a, "ReduceMax")

    def op_attention(self, op: Op, a: Any) -> None:
        """Scores, mask, softmax, weighted values; a boolean / causal mask is an additive finite bias.

        ``Where(allowed, s, -inf)`` before the softmax and ``Where(IsNaN(p), 0, p)`` after it (the NaN of a row with
        no key left) cost two passes over the ``[b, h, sq, sk]`` scores per layer, and a 3-input broadcasting
        ``Where`` is one of ORT's slow CPU kernels. Instead the mask becomes one bias ``Where(allowed, 0, lowest)``
        built once per mask (shared by every layer) and added to the scores, and a fully masked row is zeroed on
        the ``[b, h, sq, dv]`` output by a per-row 0/1 factor (also built once). For a row with a key left this is
        the same softmax input as the ``-inf`` form on every allowed key, and the masked keys' exponentials are 0
        either way; a fully masked row gives 0, qir's definition (its softmax of ``s + lowest`` is finite unless
        every score there is below about -1e31). An additive float mask (which may hold ``-inf``) keeps the NaN
        guard.
        """
        q, k, v = op.operands[:3]
        h = self.out(op)
        b_, hq, sq, d = q.type.shape
        hkv, sk = k.type.shape[1], k.type.shape[2]
        np_dt = np.float32 if q.type.dtype.name != "f64" else np.float64
        kn, vn = self.val(k), self.val(v)
        if hq != hkv:
            if not (isinstance(hq, int) and isinstance(hkv, int)):
                raise LowerError(f"attention -> %{h}: grouped-query heads need fixed head counts, got {q.type}")
            rep = hq // hkv
            kn = self._repeat_heads(kn, rep, hq, k.type.shape[3], f"{h}::k")
            vn = self._repeat_heads(vn, rep, hq, v.type.shape[3], f"{h}::v")
        kt = self.node("Transpose", [kn], hint=h, perm=[0, 1, 3, 2])
        s = self.node("MatMul", [self.val(q), kt], hint=f"{h}::scores")
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
        s = self.node("Mul", [s, self.lit(scale, np_dt)], hint=f"{h}::scores")
        allowed: str | None = None
        may_empty = False  # whether the boolean part can leave a row without keys
        float_mask = False
        if len(op.operands) > 3:
            m = op.operands[3]
            if m.type.dtype.name == "bool":
                allowed = self.val(m)
                may_empty = True
            else:
                s = self.node("Add", [s, self.val(m)], hint=f"{h}::scores")
                float_mask = True
        # Bottom-right causal: with one query, or as many queries as keys, every row keeps a key.
        if a["causal"] and not (sq == 1 and isinstance(sq, int)):
            causal = self.causal_mask(sq, sk)
            may_empty = may_empty or sq != sk
            allowed = causal if allowed is None else self.cached(
                ("and", allowed, causal), lambda: self.node("And", [allowed, causal], hint=f"{h}::allowed"))
        if allowed is not None:
            s = self.node("Add", [s, self.mask_bias(allowed, np_dt, h)], hint=f"{h}::scores")
        p = self.node("Softmax", [s], hint=f"{h}::probs", axis=-1)
        if float_mask:
            # A row the float mask leaves with only -inf is NaN after Softmax; qir defines its output as 0.
            p = self.node("Where", [self.node("IsNaN", [p], hint=h), self.lit(0.0, np_dt), p], hint=f"{h}::probs")
        if allowed is not None and may_empty:
            o = self.node("MatMul", [p, vn], hint=h)
            self.set(op, self.node("Mul", [o, self.mask_rows(allowed, np_dt, h)], h))
            return
        self.set(op, self.node("MatMul", [p, vn], h))

    def cached(self, key: tuple[Any, ...], make: Any) -> str:
        """A helper tensor built once per ``key`` (masks shared by every layer)."""
        if key not in self.helper_cache:
            self.helper_cache[key] = make()
        return self.helper_cache[key]

    def causal_mask(self, sq: Dim, sk: Dim) -> str:
        """bool ``[sq, sk]``: key ``j`` is visible from query ``i`` when ``j <= i + (sk - sq)`` (bottom-right)."""
        def make() -> str:
            hint = "causal"
            sq_v = self.node("Squeeze", [self.dim_value(sq)], hint=hint)
            sk_v = self.node("Squeeze", [self.dim_value(sk)], hint=hint)
            zero, one = self.lit(0, np.int64), self.lit(1, np.int64)
            rows = self.node("Range", [zero, sq_v, one], hint=hint)
            cols = self.node("Range", [zero, sk_v, one], hint=hint)
            lim = self.node("Unsqueeze", [self.node("Add", [rows, self.node("Sub", [sk_v, sq_v], hint=hint)],
                                                    hint=hint), self.i64([1])], hint=hint)
            return self.node("LessOrEqual", [self.node("Unsqueeze", [cols, self.i64([0])], hint=hint), lim],
                             hint="causal::allowed")
        return self.cached(("causal", str(sq), str(sk)), make)

    def mask_bias(self, allowed: str, np_dt: Any, h: str) -> str:
        """``Where(allowed, 0, lowest)``: the additive form of a boolean mask (once per mask and dtype)."""
        return self.cached(("bias", allowed, np.dtype(np_dt).name), lambda: self.node(
            "Where", [allowed, self.lit(0.0, np_dt), self.lit(np.finfo(np_dt).min, np_dt)], hint=f"{allowed}::bias"))

    def mask_rows(self, allowed: str, np_dt: Any, h: str) -> str:
        """1 where a query row keeps at least one key, else 0 (``[..., sq, 1]``, once per mask and dtype)."""
        def make() -> str:
            to = TensorProto.DOUBLE if np.dtype(np_dt) == np.float64 else TensorProto.FLOAT
            f = self.node("Cast", [allowed], hint=f"{allowed}::rows", to=to)
            return self.reduce("ReduceMax", f, [-1], hint=f"{allowed}::rows")
        return self.cached(("rows", allowed, np.dtype(np_dt).name), make)

    def _repeat_heads(self, x: str, rep: int, hq: int, d: Dim, hint: str) -> str:
        u = self.node("Unsqueeze", [x, self.i64([2])], hint=hint)
        e = self.node("Expand", [u, self.i64([1, 1, rep, 1, 1])], hint=hint)
        return self.node("Reshape", [e, self.i64([0, hq, -1, int(d)])], hint=hint)

    # -- shape ops -----------------------------------------------------------------------------------------
    def op_reshape(self, op: Op, a: Any) -> None:
        dims = self.attr_dims(a["shape"])
        shape = self.shape_value(dims, self.out(op))
        allowzero = int(any(d == 0 for d in dims))
        self.set(op, self.node("Reshape", [self.val(op.operands[0]), shape], self.out(op), allowzero=allowzero))

    def op_transpose(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Transpose", [self.val(op.operands[0])], self.out(op), perm=list(a["perm"])))

    def op_slice(self, op: Op, a: Any) -> None:
        step = a["step"]
        end = a["end"] if a["end"] is not None else (INT64_MAX if step > 0 else -INT64_MAX - 1)
        self.set(op, self.node("Slice", [self.val(op.operands[0]), self.i64([a["start"]]), self.i64([end]),
                                         self.i64([a["axis"]]), self.i64([step])], self.out(op)))

    def op_concat(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Concat", [self.val(v) for v in op.operands], self.out(op), axis=a["axis"]))

    def op_gather(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Gather", [self.val(op.operands[0]), self.val(op.operands[1])], self.out(op),
                               axis=a["axis"]))

    def op_unsqueeze(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Unsqueeze", [self.val(op.operands[0]), self.i64([a["axis"]])], self.out(op)))

    def op_squeeze(self, op: Op, a: Any) -> None:
        self.set(op, self.node("Squeeze", [self.val(op.operands[0]), self.i64([a["axis"]])], self.out(op)))

    def op_expand(self, op: Op, a: Any) -> None:
        dims = [1 if d is None else d for d in self.attr_dims(a["shape"])]
        shape = self.shape_value(dims, self.out(op))
        self.set(op, self.node("Expand", [self.val(op.operands[0]), shape], self.out(op)))

    # -- indexing -----------------------------------------------------------------------------------------
    def op_arange(self, op: Op, a: Any) -> None:
        n = self.node("Squeeze", [self.dim_value(dim(a["size"][0]))], hint=self.out(op))
        start, step = a["start"], a["step"]
        limit = self.node("Mul", [n, self.lit(step, np.int64)], hint=self.out(op))
        if start:
            limit = self.node("Add", [limit, self.lit(start, np.int64)], hint=self.out(op))
        dt = op.result.type.dtype
        if dt.name == "i64":
            r = self.node("Range", [self.lit(start, np.int64), limit, self.lit(step, np.int64)], self.out(op))
        else:
            r = self.node("Range", [self.lit(start, np.int64), limit, self.lit(step, np.int64)], hint=self.out(op))
            r = self.node("Cast", [r], self.out(op), to=onnx_dtype(dt))
        self.set(op, r)

    def op_cumsum(self, op: Op, a: Any) -> None:
        self.set(op, self.node("CumSum", [self.val(op.operands[0]), self.lit(a["axis"], np.int64)], self.out(op)))

    def op_index_copy(self, op: Op, a: Any) -> None:
        x, index, src = op.operands
        axis = a["axis"] % x.type.rank
        view = [1] * x.type.rank
        view[axis] = -1
        idx = self.node("Reshape", [self.val(index), self.i64(view)], hint=self.out(op))
        shape = self.node("Shape", [self.val(src)], hint=self.out(op))
        idx = self.node("Expand", [idx, shape], hint=self.out(op))
        self.set(op, self.node("ScatterElements", [self.val(x), idx, self.val(src)], self.out(op), axis=axis))

    def op_take_along_axis(self, op: Op, a: Any) -> None:
        x, idx = op.operands
        axis = a["axis"] % x.type.rank
        out_t = op.result.type
        xn, ixn = self.val(x), self.val(idx)
        if any(xd != od for i, (xd, od) in enumerate(zip(x.type.shape, out_t.shape)) if i != axis):
            dims: list[Dim | None] = [od if i != axis else x.type.shape[axis] for i, od in enumerate(out_t.shape)]
            xn = self.node("Expand", [xn, self.shape_value([1 if i == axis else d for i, d in enumerate(dims)],
                                                            self.out(op))], hint=self.out(op))
        if idx.type.shape != out_t.shape:
            ixn = self.node("Expand", [ixn, self.shape_value(list(out_t.shape), self.out(op))], hint=self.out(op))
        self.set(op, self.node("GatherElements", [xn, ixn], self.out(op), axis=axis))

    def op_index(self, op: Op, a: Any) -> None:
        x = op.operands[0]
        axes = [ax % x.type.rank for ax in a["axes"]]
        h = self.out(op)
        idx_types = [v.type for v in op.operands[1:]]
        bshape: tuple[Dim, ...] = ()
        from qir.shapes import broadcast

        for t in idx_types:
            bshape = broadcast(bshape, t.shape)
        bs = self.shape_value(list(bshape), h)
        cols = []
        for v in op.operands[1:]:
            e = self.node("Expand", [self.val(v), bs], hint=h)
            cols.append(self.node("Unsqueeze", [e, self.i64([-1])], hint=h))
        ind = cols[0] if len(cols) == 1 else self.node("Concat", cols, hint=h, axis=-1)
        rank = x.type.rank
        rest = [i for i in range(rank) if i not in axes]
        xn = self.val(x)
        if axes != list(range(len(axes))):
            xn = self.node("Transpose", [xn], hint=h, perm=axes + rest)
        adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
        pos = axes[0] if adjacent else 0
        if pos == 0:
            self.set(op, self.node("GatherND", [xn, ind], h))
            return
        g = self.node("GatherND", [xn, ind], hint=h)
        nb = len(bshape)
        perm = list(range(nb, nb + pos)) + list(range(nb)) + list(range(nb + pos, nb + len(rest)))
        self.set(op, self.node("Transpose", [g], h, perm=perm))

    # -- quantized ------------------------------------------------------------------------------------------
    def static_qinfo(self, codes: str, t: TensorType) -> _QInfo:
        """Broadcastable parameters of a statically quantized value."""
        spec = t.quant
        assert spec is not None
        scale, zp = self.params(t, codes)
        rank = t.rank
        if spec.axis is None:
            sb, zb = scale.reshape(()), None if zp is None else zp.reshape(())
        elif spec.group_size is None:
            view = [1] * rank
            view[spec.axis] = -1
            sb, zb = scale.reshape(view), None if zp is None else zp.reshape(view)
        else:
            raise LowerError(f"%{codes}: a per-group quantized activation ({t}) is only supported as a constant")
        s = self.init(f"{codes}::scale", sb)
        z = None if zb is None else self.init(f"{codes}::zp", zb.astype(np.int32))
        return _QInfo(codes, t.dtype, spec, s, z)

    def op_quantize(self, op: Op, a: Any) -> None:
        x = op.operands[0]
        t = op.result.type
        spec = t.quant
        assert spec is not None
        xn = self.val(x)
        if x.type.dtype.name != "f32":
            xn = self.node("Cast", [xn], hint=self.out(op), to=TensorProto.FLOAT)
        if spec.dynamic:
            info = self.quantize_dynamic(xn, x.type, t, self.out(op), need_codes=self.codes_needed(op.result))
            self.qinfo[id(op.result)] = info
            self.set(op, info.codes)
            return
        name, info = self.quantize_static(xn, t, self.out(op))
        self.set(op, name)
        if info is not None:
            self.qinfo[id(op.result)] = info

    def quantize_static(self, xn: str, t: TensorType, out: str) -> tuple[str, _QInfo | None]:
        """``QuantizeLinear`` to a static quantized type; the activation's broadcastable parameters."""
        spec = t.quant
        assert spec is not None
        if self.opts.act_i8 and t.dtype.name == "u8" and spec.axis is None:
            scale, zp = self.params(t, out)
            zp8 = (0 if zp is None else int(zp)) - 128
            s, z = self.lit(scale.reshape(()), np.float32), self.lit(zp8, np.int8)
            q = self.node("QuantizeLinear", [xn, s, z], out)
            self.notes.append(f"%{out}: u8 activation stored as i8 (codes and zero point minus 128, same values)")
            return q, _QInfo(q, i8, spec, s, self.lit(zp8, np.int32), q_scale=s, q_zp=z)
        s, z = self.param_inits(t, out)
        kw: dict[str, Any] = {}
        if z is None:
            if self.opts.opset >= 21:
                kw["output_dtype"] = onnx_dtype(t.dtype)
            else:
                z = self.lit(np.zeros(np.shape(numpy_helper.to_array(self.inits[s]))), t.dtype.numpy)
        if spec.axis is not None:
            kw["axis"] = spec.axis
        if spec.group_size is not None:
            kw["block_size"] = spec.group_size
        q = self.node("QuantizeLinear", [xn, s, z], out, **kw)
        if spec.group_size is not None:
            return q, None
        info = self.static_qinfo(q, t)
        info.q_scale, info.q_zp = s, z
        return q, info

    def codes_needed(self, v: Value) -> bool:
        """Whether a dynamic quantize result is read as int8 codes (not only by MatMulInteger as u8)."""
        if not (self.opts.act_u8 and self.opts.qmatmul == "integer") or any(o is v for o in self.func.outputs):
            return True
        return any(u.opcode != "qmatmul" or u.results[0].name in self.opts.fallback_float for u in v.users())

    def quantize_dynamic(self, xn: str, xt: TensorType, t: TensorType, out: str, *,
                         need_codes: bool = True) -> _QInfo:
        spec = t.quant
        assert spec is not None
        rank = xt.rank
        dt = t.dtype
        if spec.axis is None:
            axes = list(range(rank))
        elif spec.group_size is None:
            axes = [i for i in range(rank) if i != spec.axis]
        elif isinstance(xt.shape[spec.axis], int) and spec.group_size >= xt.shape[spec.axis]:
            axes = [spec.axis]  # one group spans the axis: one scale per position of the other axes
        else:
            raise LowerError(f"%{out}: dynamic quantization in groups of {spec.group_size} smaller than the axis "
                             f"({t}) has no ONNX lowering yet; use one group per token (group >= the axis size)")
        h = out
        tiny = self.lit(np.finfo(np.float32).tiny, np.float32)
        one = self.lit(1.0, np.float32)
        zero = self.lit(0.0, np.float32)
        zp_b: str | None = None
        if spec.symmetric:
            amax = self.reduce("ReduceMax", self.node("Abs", [xn], hint=h), axes, hint=f"{h}::amax")
            sc = self.node("Div", [amax, self.lit(float(dt.qmax), np.float32)], hint=h)
            # qir's scale is 1 where the group is all zeros (amax = 0); here it is `tiny` there, which gives the
            # same codes (0) and the same dequantized values (0) in every use, two small ops fewer per site.
            scale = self.node("Max", [sc, tiny], hint=f"{h}::scale")
            blocked = self.blocked_quantize(xn, xt, scale, axes, t, out, need_codes)
            if blocked is not None:
                return blocked
            r = self.node("Round", [self.node("Div", [xn, scale], hint=h)], hint=h)
        else:
            lo = self.node("Min", [self.reduce("ReduceMin", xn, axes, hint=h), zero], hint=h)
            hi = self.node("Max", [self.reduce("ReduceMax", xn, axes, hint=h), zero], hint=h)
            width = self.node("Sub", [hi, lo], hint=h)
            sc = self.node("Div", [width, self.lit(float(dt.qmax - dt.qmin), np.float32)], hint=h)
            sc = self.node("Where", [self.node("Greater", [width, zero], hint=h), sc, one], hint=h)
            scale = self.node("Max", [sc, tiny], hint=f"{h}::scale")
            zpf = self.node("Sub", [self.lit(float(dt.qmin), np.float32),
                                    self.node("Round", [self.node("Div", [lo, scale], hint=h)], hint=h)], hint=h)
            zpf = self.node("Clip", [zpf, self.lit(float(dt.qmin), np.float32), self.lit(float(dt.qmax), np.float32)],
                            hint=h)
            zp_b = self.node("Cast", [zpf], hint=f"{h}::zp", to=TensorProto.INT32)
            r = self.node("Add", [self.node("Round", [self.node("Div", [xn, scale], hint=h)], hint=h), zpf], hint=h)
        r = self.node("Clip", [r, self.lit(float(dt.qmin), np.float32), self.lit(float(dt.qmax), np.float32)],
                      hint=f"{h}::rounded")
        codes = self.node("Cast", [r], out, to=onnx_dtype(dt))
        return _QInfo(codes, dt, spec, scale, zp_b, rounded=r)

    def blocked_quantize(self, xn: str, xt: TensorType, scale: str, axes: list[int], t: TensorType,
                         out: str, need_codes: bool) -> _QInfo | None:
        """Symmetric 8-bit per-token codes as one blocked ``QuantizeLinear`` (opset 21), which computes
        ``saturate(round(x / scale) + zp)`` exactly as qir does; also a ``u8`` copy (zero point 128) for
        ``MatMulInteger``. When only ``MatMulInteger`` reads the value, the ``u8`` copy alone is emitted and
        stands for the value (named ``<value>::u8``)."""
        last = xt.rank - 1
        k = xt.shape[last]
        dt = t.dtype
        assert t.quant is not None
        if self.opts.opset < 21 or axes != [last] or not isinstance(k, int) or dt.name != "i8":
            return None
        u8 = None
        if self.opts.act_u8:
            # One zero-point tensor for every site whose scale has the same shape (all the [batch, seq, 1] ones).
            zp = self.cached(("zp128", tuple(str(d) for d in xt.shape[:-1])), lambda: self.node(
                "Expand", [self.lit(128, np.uint8), self.node("Shape", [scale], hint=out)], hint=f"{out}::zp128"))
            u8 = self.node("QuantizeLinear", [xn, scale, zp], self.fresh(f"{out}::u8"), axis=last, block_size=k)
            if not need_codes:
                return _QInfo(u8, u8_dtype, t.quant, scale, None, u8=u8)
        codes = self.node("QuantizeLinear", [xn, scale], out, axis=last, block_size=k,
                          output_dtype=TensorProto.INT8)
        return _QInfo(codes, dt, t.quant, scale, None, u8=u8)

    def qvalue(self, v: Value) -> _QInfo:
        if v.is_constant:
            raise LowerError(f"{v.ref}: a quantized constant is used where an activation is expected")
        info = self.qinfo.get(id(v))
        if info is None:
            raise LowerError(f"%{v.name}: quantized per group; only constants may be (use per tensor or per token)")
        return info

    def op_dequantize(self, op: Op, a: Any) -> None:
        q = op.operands[0]
        t = q.type
        out_dt = op.result.type.dtype
        h = self.out(op)
        final = h if out_dt.name == "f32" else None
        if q.is_constant or (t.quant is not None and not t.quant.dynamic):
            s, z = self.param_inits(t, h)
            kw: dict[str, Any] = {}
            if t.quant is not None and t.quant.axis is not None:
                kw["axis"] = t.quant.axis
            if t.quant is not None and t.quant.group_size is not None:
                kw["block_size"] = t.quant.group_size
            off = self.offset_data(t) if q.is_constant else None
            y = self.node("DequantizeLinear", [self.val(q), s, z], final if off is None else None, hint=h, **kw)
            if off is not None:
                full = expand_params(off, t.quant, tuple(int(d) for d in t.shape)) if t.quant else off
                y = self.node("Add", [y, self.init(f"{q.name}::offset.full", np.ascontiguousarray(full))], final,
                              hint=h)
        else:
            info = self.qvalue(q)
            y = self.dequant_explicit(info, final, h)
        if final is None:
            y = self.node("Cast", [y], h, to=onnx_dtype(out_dt))
        self.set(op, y)

    def dequant_explicit(self, info: _QInfo, out: str | None, h: str) -> str:
        c = self.node("Cast", [info.codes], hint=h, to=TensorProto.INT32)
        if info.zp_b is not None:
            c = self.node("Sub", [c, info.zp_b], hint=h)
        c = self.node("Cast", [c], hint=h, to=TensorProto.FLOAT)
        return self.node("Mul", [c, info.scale_b], out, hint=h)

    def op_requantize(self, op: Op, a: Any) -> None:
        q = op.operands[0]
        h = self.out(op)
        if q.is_constant or (q.type.quant is not None and not q.type.quant.dynamic and q.type.quant.group_size is None
                             and id(q) in self.qinfo):
            info = self.qvalue(q) if not q.is_constant else None
        else:
            info = self.qvalue(q)
        if info is None:
            raise LowerError(f"requantize -> %{h}: requantizing a constant is a compile-time job; fold it first")
        f = self.dequant_explicit(info, None, h)
        t = op.result.type
        assert t.quant is not None
        if t.quant.dynamic:
            self.qinfo[id(op.result)] = self.quantize_dynamic(f, q.type, t, h)
            self.set(op, h)
            return
        name, info = self.quantize_static(f, t, h)
        self.set(op, name)
        if info is not None:
            self.qinfo[id(op.result)] = info

    # qmatmul -------------------------------------------------------------------------------------------------
    def op_qmatmul(self, op: Op, a: Any) -> None:
        if id(op.result) in self.vname:  # lowered with the first op of its sibling_group
            return
        group = self.sibling_group(op)
        if group:
            self.qmatmul_group(group)
            return
        x, w = op.operands[0], op.operands[1]
        if not w.is_constant:
            raise LowerError(f"qmatmul -> %{op.result.name}: the weight must be a constant, got %{w.name}")
        h = self.out(op)
        out_dt = op.result.type.dtype
        final = h if out_dt.name == "f32" and len(op.operands) < 3 else None
        if h in self.opts.fallback_float:
            y = self.fallback_matmul(x, w, final, h)
        elif x.type.quant is None:
            y = self.weight_only(x, w, final, h)
        else:
            # A float minimum per group (w4a8 with zero=float) is not part of the integer product: it adds
            # offset * (block sums of the dequantized x), as the interpreter's integer path does.
            off = self.offset_data(w.type)
            main_out = final if off is None else None
            if self.opts.qmatmul == "qdq":
                y = self.qmatmul_qdq(x, w, main_out, h)
            else:
                y = self.qmatmul_integer(x, w, main_out, h)
            if off is not None:
                xf = self.x_dequantized(x, h)
                y = self.node("Add", [y, self.offset_term(xf, x.type.rank, w, off, h)], final, hint=h)
        if len(op.operands) > 2:
            b = self.val(op.operands[2])
            if op.operands[2].type.dtype.name != "f32":
                b = self.node("Cast", [b], hint=h, to=TensorProto.FLOAT)
            y = self.node(self.add_kind(op.result), [y, b], h if out_dt.name == "f32" else None, hint=h)
        if out_dt.name != "f32":
            y = self.node("Cast", [y], h, to=onnx_dtype(out_dt))
        self.set(op, y)

    def fallback_matmul(self, x: Value, w: Value, out: str | None, h: str) -> str:
        """The ``--fallback`` form: f16 ``MatMul`` on the dequantized weight (stored f16, ``[K, N]``)."""
        wt = np.ascontiguousarray(self.const_data(w.name).T.astype(np.float16))
        wn = self.init(f"{w.name}::f16.T", wt, exact=True)
        xf = self.dequant_explicit(self.qvalue(x), None, h) if x.type.quant is not None else self.val(x)
        x16 = self.node("Cast", [xf], hint=h, to=TensorProto.FLOAT16)
        y = self.node("MatMul", [x16, wn], hint=h)
        self.fallbacks.append(f"qmatmul %{h} (weight @{w.name} {w.type}) kept in f16")
        return self.node("Cast", [y], out, hint=h, to=TensorProto.FLOAT)

    def tied_codes_t(self, w: Value, h: str) -> str | None:
        """``codes(w).T`` as a ``Transpose`` of the codes initializer that an embedding lookup also reads, so a
        tied 8-bit embedding/head table is stored once (ORT folds the Transpose when it loads the model); None
        when ``w`` is not such a table (then the caller stores the transposed codes)."""
        if w.type.dtype.bits != 8 or all(u.opcode == "qmatmul" for u in w.users()):
            return None
        return self.node("Transpose", [self.const(w)], hint=f"{w.name}::T", perm=[1, 0])

    def weight_t_dq(self, w: Value, h: str) -> str:
        """``dequantize(w).T`` as ``DequantizeLinear`` on the transposed codes (``[K, N]``)."""
        t = w.type
        spec = t.quant
        assert spec is not None
        if w.name in self.cname and t.dtype.bits == 8 and spec.axis == 1 and spec.group_size is not None:
            # The codes are already in the file untransposed (a tied embedding table): dequantize those and
            # transpose the result rather than storing the table twice.
            s, z = self.param_inits(t, w.name)
            dq = self.node("DequantizeLinear", [self.cname[w.name], s, z], hint=f"{h}::w", axis=1,
                           block_size=spec.group_size)
            return self.node("Transpose", [dq], hint=f"{h}::w", perm=[1, 0])
        codes = np.asarray(self.module.constant(w.name).numpy())
        cn = self.tied_codes_t(w, h)
        if cn is None:
            cn = self.init(f"{w.name}::T", np.ascontiguousarray(codes.T), exact=True)
        s, z = self.param_inits(t, f"{w.name}::T", transpose=True)
        if z is None and not t.dtype.is_signed and spec.group_size is not None:
            # ORT (1.32) fuses blocked DequantizeLinear + MatMul into MatMulNBits, whose default zero point is
            # 2**(bits-1), not DequantizeLinear's 0: an explicit 0 keeps unsigned codes (GGUF Q5_1) right.
            kn, nn = codes.T.shape
            z = self.init(f"{w.name}::T::zp0", np.zeros((-(-kn // spec.group_size), nn), t.dtype.numpy))
        kw: dict[str, Any] = {}
        if spec.axis is not None:
            kw["axis"] = 1 - spec.axis
        if spec.group_size is not None:
            kw["block_size"] = spec.group_size
        return self.node("DequantizeLinear", [cn, s, z], hint=f"{h}::w", **kw)

    def weight_only(self, x: Value, w: Value, out: str | None, h: str) -> str:
        xn = self.val(x)
        if x.type.dtype.name != "f32":
            xn = self.node("Cast", [xn], hint=h, to=TensorProto.FLOAT)
        spec = w.type.quant
        assert spec is not None
        n, k = w.type.shape
        off = self.offset_data(w.type)
        main_out = out if off is None else None
        if self.nbits_fits(w):
            y = self.matmul_nbits(xn, w, main_out, h)
        else:
            y = self.node("MatMul", [xn, self.weight_t_dq(w, h)], main_out, hint=h)
        if off is None:
            return y
        return self.node("Add", [y, self.offset_term(xn, x.type.rank, w, off, h)], out, hint=h)

    def nbits_group(self, w: Value) -> int | None:
        """The MatMulNBits block size for a weight-only qmatmul on ``w``, or None when it does not lower so.

        4- or 8-bit groups of ``2**j >= 16`` along K are blocks as they are. An 8-bit weight per output row (or
        per tensor) becomes blocks too, the largest power of two <= 256 that divides K, each block repeating its
        row's scale: the same values, but MatMulNBits reads the int8 bytes in its GEMV/GEMM instead of a
        ``DequantizeLinear`` expanding every weight to f32 at each run (which made w8a16 decode ~5x slower).
        """
        spec = w.type.quant
        if not (self.opts.int4 == "nbits" and self.opts.contrib_ops and spec is not None
                and w.type.dtype.bits in (4, 8)):
            return None
        g = spec.group_size
        if spec.axis == 1 and g is not None:
            return g if g >= 16 and g & (g - 1) == 0 else None
        if w.type.dtype.bits == 8 and g is None and spec.axis in (0, None) and spec.offset is None:
            k = int(w.type.shape[1])
            return next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
        return None

    def nbits_fits(self, w: Value) -> bool:
        """Whether a weight-only qmatmul on ``w`` lowers to MatMulNBits (see :meth:`nbits_group`)."""
        return self.nbits_group(w) is not None

    def offset_term(self, xn: str, rank: int, w: Value, off: np.ndarray, h: str) -> str:
        """``x @ offset_full.T`` for a weight ``x~ = scale*q + offset`` (GGUF minimums) without expanding it.

        The offset is constant over each block of ``g`` inputs, so ``sum_k x_k m_b(k) = sum_b (sum_{k in b} x_k)
        m_b``: block sums of ``x`` (``Reshape`` + ``ReduceSum``) times the ``[K/g, N]`` offsets. Exact in real
        arithmetic; the extra work is ``1/g`` of the main matmul. MatMulNBits itself has no float minimum.
        """
        spec = w.type.quant
        assert spec is not None and spec.group_size is not None
        n, k = (int(d) for d in w.type.shape)
        g = spec.group_size
        if k % g:
            raise LowerError(f"qmatmul with @{w.name}: an offset needs whole groups ({k} inputs, groups of {g})")
        nb = k // g
        xs = self.node("Reshape", [xn, self.i64([0] * (rank - 1) + [nb, g])], hint=f"{h}::xblk")
        sums = self.node("ReduceSum", [xs, self.i64([-1])], hint=f"{h}::xblk", keepdims=0)
        mt_arr = np.ascontiguousarray(off.reshape(n, nb).T)
        half = mt_arr.astype(np.float16)
        pv = self.param_value(spec.offset) if isinstance(spec.offset, str) else None
        if pv is not None:  # compressed minimums: kept as codes (see param_value)
            mt = self.node("Transpose", [pv], hint=f"{h}::offset", perm=[1, 0])
        elif np.array_equal(half.astype(np.float32), mt_arr):
            # GGUF minimums are fp16: store them so (half the bytes); ORT folds the Cast when it loads the model.
            mt = self.node("Cast", [self.init(f"{w.name}::offset.T.f16", half)], hint=f"{h}::offset",
                           to=TensorProto.FLOAT)
        else:
            mt = self.init(f"{w.name}::offset.T", mt_arr)
        return self.node("MatMul", [sums, mt], hint=f"{h}::offset")

    def matmul_nbits(self, xn: str, w: Value, out: str | None, h: str) -> str:
        """``com.microsoft.MatMulNBits``: 4-bit codes as unsigned nibbles (low nibble first) or 8-bit codes as
        bytes, blocks along K, fp32 compute (``accuracy_level=0``)."""
        t = w.type
        n, k = (int(d) for d in t.shape)
        blob = self.nbits_blob(w)
        ins = [xn, blob.codes, blob.scale] + ([blob.zp] if blob.zp is not None else [])
        return self.node("MatMulNBits", ins, out, hint=h, domain=MS_DOMAIN, K=k, N=n, bits=blob.bits,
                         block_size=blob.group, accuracy_level=0)

    def nbits_blob(self, w: Value) -> _NBits:
        """The MatMulNBits initializers of a per-group 4- or 8-bit weight (made once per weight).

        Codes are unsigned with a default zero point of ``2**(bits-1)``: signed codes are shifted by it (``q - zp``
        unchanged); unsigned codes without a zero point get an explicit 0.
        """
        if w.name in self.nbits:
            return self.nbits[w.name]
        t = w.type
        spec = t.quant
        g = self.nbits_group(w)
        assert spec is not None and g is not None
        bits = t.dtype.bits
        n, k = (int(d) for d in t.shape)
        nb = -(-k // g)
        codes = np.asarray(self.module.constant(w.name).numpy()).astype(np.int16)
        scale, zp = self.params(t, w.name)
        if spec.group_size is None:  # per row / per tensor: every block of a row repeats the row's parameters
            scale = np.ascontiguousarray(np.broadcast_to(np.asarray(scale).reshape(-1, 1), (n, nb)))
            if zp is not None:
                zp = np.ascontiguousarray(np.broadcast_to(np.asarray(zp).reshape(-1, 1), (n, nb)))
        mid = 1 << (bits - 1)
        if t.dtype.is_signed:
            u = codes + mid
            zpu = None if zp is None else zp + mid
        else:
            # GGUF Q4_1 / Q4_K / Q5_1: unsigned codes whose minimum is a separate offset; zero point 0 explicitly.
            u = codes
            zpu = zp if zp is not None else np.zeros((n, nb), np.int64)
        padded = np.zeros((n, nb * g), np.uint8)
        padded[:, :k] = u.astype(np.uint8)
        blocks = padded.reshape(n, nb, g)
        if bits == 4:
            packed = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
        else:
            packed = blocks
        bn = self.init(f"{w.name}::nbits", packed, exact=True)
        sn = self.param_blocks(spec.scale if isinstance(spec.scale, str) and spec.group_size is not None else None,
                               scale, f"{w.name}::nbits.scale", [n * nb])
        zn = None
        if zpu is not None:
            if bits == 4:
                zb = np.full((n, nb + (nb % 2)), mid, np.uint8)
                zb[:, :nb] = np.broadcast_to(zpu, (n, nb)).astype(np.uint8)
                zpacked = (zb[:, 0::2] | (zb[:, 1::2] << 4)).astype(np.uint8)
            else:
                zpacked = np.ascontiguousarray(np.broadcast_to(zpu, (n, nb)).astype(np.uint8))
            zn = self.init(f"{w.name}::nbits.zp", zpacked.reshape(-1))
        blob = _NBits(bn, sn, zn, bits, g, mid if zpu is None else None)
        self.nbits[w.name] = blob
        return blob

    def qmatmul_qdq(self, x: Value, w: Value, out: str | None, h: str) -> str:
        return self.node("MatMul", [self.x_dequantized(x, h), self.weight_t_dq(w, h)], out, hint=h)

    def x_dequantized(self, x: Value, h: str) -> str:
        """The float value of a quantized activation ``x`` (its codes times its scale, as stored here)."""
        xq = self.qvalue(x)
        t = x.type
        assert t.quant is not None
        if xq.q_scale is not None:
            kw: dict[str, Any] = {"axis": t.quant.axis} if t.quant.axis is not None else {}
            return self.node("DequantizeLinear", [xq.codes, xq.q_scale, xq.q_zp], hint=f"{h}::x", **kw)
        if xq.u8 is not None and xq.codes == xq.u8:  # only the uint8 copy (int8 codes + 128) was emitted
            c = self.node("Cast", [xq.u8], hint=f"{h}::x", to=TensorProto.FLOAT)
            c = self.node("Sub", [c, self.lit(128.0, np.float32)], hint=f"{h}::x")
            return self.node("Mul", [c, xq.scale_b], hint=f"{h}::x")
        return self.dequant_explicit(xq, None, f"{h}::x")

    def act_codes(self, x: Value, xq: _QInfo, h: str) -> tuple[str, str | None]:
        """The activation codes ``MatMulInteger`` reads and their zero point (``u8`` + 128 for symmetric i8)."""
        if self.opts.act_u8 and xq.u8 is not None:
            return xq.u8, self.lit(128, np.uint8)
        if self.opts.act_u8 and xq.dtype.name == "i8" and xq.zp_b is None:
            r = xq.rounded
            if r is None:
                r = self.node("Cast", [xq.codes], hint=h, to=TensorProto.FLOAT)
            a_codes = self.node("Cast", [self.node("Add", [r, self.lit(128.0, np.float32)], hint=h)],
                                hint=f"{x.name}::u8", to=TensorProto.UINT8)
            return a_codes, self.lit(128, np.uint8)
        if xq.zp_b is not None and self.is_scalar_init(xq.zp_b):
            return xq.codes, self.lit(int(numpy_helper.to_array(self.inits[xq.zp_b])), xq.dtype.numpy)
        return xq.codes, None

    def sibling_group(self, op: Op) -> list[Op]:
        """The w8a8 qmatmuls that read ``op``'s per-token activation and lower to one GEMM with it (or ``[]``).

        Q, K and V projections (gate and up in an LLM) read one quantized activation. With their int8 weights side
        by side they make one ``MatMulIntegerToFloat`` on ``[K, N1 + N2 + ...]``, one per-token ``Mul``, one bias
        ``Add`` and a ``Split`` whose outputs carry the ops' result names. Columns are independent, so each element
        is the one the separate ops compute (the same products, the same order); ORT runs 4 nodes instead of 9
        (MiniLM: 30 nodes fewer, the GEMMs about 10% faster at N = 1152 than three at N = 384).
        """
        x = op.operands[0]
        xq = self.qinfo.get(id(x))
        if not (self.opts.contrib_ops and self.opts.qmatmul == "integer") or xq is None or xq.spec.axis is None \
                or xq.zp_b is not None:
            return []
        bias = len(op.operands) > 2

        def fits(u: Op) -> bool:
            if u.opcode != "qmatmul" or u.operands[0] is not x or u.parent is not self.func:
                return False
            w = u.operands[1]
            spec = w.type.quant
            return (w.is_constant and spec is not None and w.type.dtype.name == "i8" and spec.group_size is None
                    and spec.zero_point is None and spec.offset is None and spec.axis in (0, None)
                    and all(v.opcode == "qmatmul" for v in w.users()) and u.result.type.dtype.name == "f32"
                    and u.result.name not in self.opts.fallback_float and (len(u.operands) > 2) == bias
                    and (not bias or (u.operands[2].is_constant and u.operands[2].type.dtype.name == "f32")))

        if not fits(op):
            return []
        # Ops are lowered in order, so the siblings not lowered yet come after ``op``: emitting them here is valid
        # (they read only ``x`` and constants).
        group = [op] + [u for u in x.users() if u is not op and fits(u) and id(u.result) not in self.vname]
        return group if len(group) > 1 else []

    def qmatmul_group(self, group: list[Op]) -> None:
        """Lower a :meth:`sibling_group` as one GEMM and a ``Split`` into the ops' results."""
        x = group[0].operands[0]
        xq = self.qvalue(x)
        h0 = self.out(group[0])
        a_codes, a_zp = self.act_codes(x, xq, h0)
        ws = [u.operands[1] for u in group]
        ns = [int(w.type.shape[0]) for w in ws]
        codes = np.concatenate([np.asarray(self.module.constant(w.name).numpy()).T for w in ws], axis=1)
        wt = self.init(f"{h0}::wcat.T", np.ascontiguousarray(codes.astype(np.int8)), exact=True)
        scales = [np.broadcast_to(_f32(self.params(w.type, w.name)[0]).reshape(-1), (n,)) for w, n in zip(ws, ns)]
        sw = self.init(f"{h0}::wcat.scale", np.ascontiguousarray(np.concatenate(scales)))
        y = self.node("MatMulIntegerToFloat", [a_codes, wt, self.lit(1.0, np.float32), sw, a_zp],
                      hint=f"{h0}::wcat.acc_sw", domain=MS_DOMAIN)
        y = self.node("Mul", [y, xq.scale_b], hint=f"{h0}::wcat")
        if len(group[0].operands) > 2:
            bias = np.concatenate([_f32(self.const_data(u.operands[2].name)).reshape(-1) for u in group])
            y = self.node("Add", [y, self.init(f"{h0}::wcat.bias", bias)], hint=f"{h0}::wcat")
        self.node("Split", [y, self.i64(ns)], [self.out(u) for u in group], axis=-1)
        for u in group:
            self.set(u, self.out(u))

    def qmatmul_integer(self, x: Value, w: Value, out: str | None, h: str) -> str:
        xq = self.qvalue(x)
        t = w.type
        spec = t.quant
        assert spec is not None
        n, k = (int(d) for d in t.shape)
        codes = np.asarray(self.module.constant(w.name).numpy())
        wdt = np.int8 if t.dtype.is_signed else np.uint8
        scale, zp = self.params(t, w.name)
        a_codes, a_zp = self.act_codes(x, xq, h)
        groups = [(0, k)] if spec.group_size is None else [(lo, min(lo + spec.group_size, k))
                                                             for lo in range(0, k, spec.group_size)]
        y: str | None = None
        for gi, (lo, hi) in enumerate(groups):
            sub = f"{w.name}::T" if len(groups) == 1 else f"{w.name}::T.g{gi}"
            wt = self.tied_codes_t(w, h) if len(groups) == 1 else None
            if wt is None:
                wt = self.init(sub, np.ascontiguousarray(codes[:, lo:hi].T.astype(wdt)), exact=True)
            b_zp = None
            wz = None
            if zp is not None:
                wz = zp.reshape(-1) if spec.group_size is None else zp[:, gi]
                wz = np.broadcast_to(wz, (n,)) if wz.ndim == 0 or wz.size == 1 else wz
                b_zp = self.init(f"{sub}::zp", np.ascontiguousarray(wz).astype(wdt))
            xa = a_codes
            if len(groups) > 1:
                xa = self.node("Slice", [a_codes, self.i64([lo]), self.i64([hi]), self.i64([-1])], hint=h)
            if len(groups) == 1 and xq.spec.axis is not None and xq.zp_b is None and spec.group_size is None:
                # Symmetric per-token activations (qir's order: (acc * sw) * sx, see qir.ops.quantized):
                # MatMulIntegerToFloat applies the per-column weight scale inside its GEMM (a_scale = 1; its
                # a_scale is per tensor only, so sx cannot go there) and one Mul the per-row scale -- two passes
                # over the output fewer than Cast -> Mul(acc, sx * sw).
                sw1 = self.init(f"{sub}::scale", _f32(scale.reshape(()) if spec.axis is None else scale.reshape(n)))
                if self.opts.contrib_ops:
                    yw = self.node("MatMulIntegerToFloat", [xa, wt, self.lit(1.0, np.float32), sw1, a_zp, b_zp],
                                   hint=f"{h}::acc_sw", domain=MS_DOMAIN)
                else:
                    acc = self.node("MatMulInteger", [xa, wt, a_zp, b_zp], hint=f"{h}::acc")
                    yw = self.node("Mul", [self.node("Cast", [acc], hint=h, to=TensorProto.FLOAT), sw1], hint=h)
                return self.node("Mul", [yw, xq.scale_b], out, hint=h)
            acc = self.node("MatMulInteger", [xa, wt, a_zp, b_zp], hint=f"{h}::acc")
            if xq.zp_b is not None and a_zp is None:
                # Per-row activation zero points: sum_k (x - zx) w' = sum_k x w' - zx * sum_k w'.
                wprime = codes[:, lo:hi].astype(np.int64) - (0 if wz is None else np.asarray(wz)[:, None])
                colsum = self.init(f"{sub}::colsum", wprime.sum(axis=1).astype(np.int32))
                acc = self.node("Sub", [acc, self.node("Mul", [xq.zp_b, colsum], hint=h)], hint=f"{h}::acc")
            accf = self.node("Cast", [acc], hint=h, to=TensorProto.FLOAT)
            if spec.axis is None:
                sw = scale.reshape(())
            elif spec.group_size is None:
                sw = scale.reshape(n)
            else:
                sw = scale[:, gi]
            if self.is_scalar_init(xq.scale_b) or sw.ndim == 0:
                comb = self.node("Mul", [xq.scale_b, self.init(f"{sub}::scale", _f32(sw))], hint=f"{h}::scale")
            else:
                # sx * sw as a K=1 MatMul (one exact product per element): ORT 1.32's MatMulIntegerToFloatFusion
                # turns Cast->Mul(Mul(sx, sw)) into MatMulIntegerToFloat, whose a_scale is per tensor only, and
                # then silently computes wrong results for per-token scales.
                row = self.init(f"{sub}::scale", _f32(sw).reshape(1, -1))
                comb = self.node("MatMul", [xq.scale_b, row], hint=f"{h}::scale")
            last = gi == len(groups) - 1
            term = self.node("Mul", [accf, comb], out if last and y is None else None, hint=h)
            y = term if y is None else self.node("Add", [y, term], out if last else None, hint=h)
        assert y is not None
        return y

    def is_scalar_init(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and int(np.prod(t.dims)) == 1

    def packed_rows(self, table: Value, ids: Value, h: str) -> str:
        """int32 codes of the rows ``ids`` of a sub-byte table stored packed (``8 // bits`` codes per byte).

        The table is stored as ``uint8 [V, ceil(D / per)]`` holding ``code - qmin`` little-end first; the looked-
        up rows are unpacked with ``BitShift`` / ``BitwiseAnd`` (exact), so a 2-bit table takes a quarter of the
        bytes an int8 copy would.
        """
        t = table.type
        bits = t.dtype.bits
        per = 8 // bits
        v, d = (int(x) for x in t.shape)
        dp = -(-d // per) * per
        if table.name not in self.tname and self.tied_nbits(table, 4):
            # A tied 4-bit table whose head is a MatMulNBits: its blob ``[V, nb, g/2]`` holds exactly these bytes
            # (``code - qmin`` = the blob's unsigned code, low nibble first, no padding as g divides D): the lookup
            # reads the head's bytes instead of a second copy of the table.
            blob = self.nbits_blob(table)
            self.tname[table.name] = self.node("Reshape", [blob.codes, self.i64([v, d // 2])], hint=f"{h}::rows")
        if table.name not in self.tname:
            codes = np.asarray(self.module.constant(table.name).numpy()).astype(np.int32) - t.dtype.qmin
            padded = np.zeros((v, dp), np.uint8)
            padded[:, :d] = codes.astype(np.uint8)
            shifts = (np.arange(per, dtype=np.uint8) * bits)
            packed = np.bitwise_or.reduce(padded.reshape(v, dp // per, per) << shifts, axis=2).astype(np.uint8)
            self.tname[table.name] = self.init(f"{table.name}::packed{bits}", packed, exact=True)
        rows = self.node("Gather", [self.tname[table.name], self.val(ids)], hint=h, axis=0)
        rows = self.node("Unsqueeze", [rows, self.i64([-1])], hint=h)
        shifted = self.node("BitShift", [rows, self.lit(np.arange(per) * bits, np.uint8)], hint=h,
                            direction="RIGHT")
        u = self.node("BitwiseAnd", [shifted, self.lit((1 << bits) - 1, np.uint8)], hint=h)
        u = self.node("Reshape", [u, self.i64([0] * ids.type.rank + [dp])], hint=h)
        if dp != d:
            u = self.node("Slice", [u, self.i64([0]), self.i64([d]), self.i64([-1])], hint=h)
        c = self.node("Cast", [u], hint=h, to=TensorProto.INT32)
        return self.node("Add", [c, self.lit(t.dtype.qmin, np.int32)], hint=f"{h}::codes") if t.dtype.qmin else c

    def group_rows(self, params: str, ids: Value, group: int, d: int, h: str) -> str:
        """Per-group parameters ``[V, G]`` of the rows ``ids``, each repeated over its group: ``[*ids, d]``."""
        g = self.node("Gather", [params, self.val(ids)], hint=h, axis=0)
        g = self.node("Unsqueeze", [g, self.i64([-1])], hint=h)
        shape = self.node("Concat", [self.node("Shape", [g], hint=h, end=-1), self.lit([group], np.int64)], hint=h,
                          axis=0)
        g = self.node("Expand", [g, shape], hint=h)
        g = self.node("Reshape", [g, self.i64([0] * ids.type.rank + [-1])], hint=h)
        if d % group == 0:
            return g
        return self.node("Slice", [g, self.i64([0]), self.i64([d]), self.i64([-1])], hint=h)

    def op_qembedding(self, op: Op, a: Any) -> None:
        table, ids = op.operands
        t = table.type
        spec = t.quant
        assert spec is not None
        h = self.out(op)
        if h in self.opts.fallback_float:
            tab = self.init(f"{table.name}::f16", self.const_data(table.name).astype(np.float16), exact=True)
            rows = self.node("Gather", [tab, self.val(ids)], hint=h, axis=0)
            self.fallbacks.append(f"qembedding %{h} (table @{table.name} {t}) kept in f16")
            self.set(op, self.node("Cast", [rows], h, to=onnx_dtype(op.result.type.dtype)))
            return
        if self.tied_nbits(table, 8):
            self.set(op, self.embedding_from_nbits(op, h))
            return
        if t.dtype.bits == 8:
            rows = self.node("Gather", [self.const(table), self.val(ids)], hint=h, axis=0)
            c = self.node("Cast", [rows], hint=h, to=TensorProto.INT32)
        else:
            c = self.packed_rows(table, ids, h)
        if spec.offset is not None and spec.group_size is None:
            raise LowerError(f"qembedding -> %{h}: @{table.name} has an offset without groups; only per-group "
                             f"offsets (GGUF blocks) lower to ONNX")
        scale, zp = self.params(t, table.name)
        if spec.axis is None:
            sb = self.lit(scale.reshape(()), np.float32)
            zb = None if zp is None else self.lit(int(zp), np.int32)
        elif spec.group_size is None:
            sname = self.init(f"{table.name}::scale.col", scale.reshape(-1, 1))
            sb = self.node("Gather", [sname, self.val(ids)], hint=h, axis=0)
            zb = None
            if zp is not None:
                zb = self.as_int32(self.node("Gather", [self.zp_init(f"{table.name}::zp.col", zp.reshape(-1, 1)),
                                                        self.val(ids)], hint=h, axis=0), h)
        elif int(t.shape[1]) % spec.group_size == 0:
            self.set(op, self.embedding_blocks(op, c, scale, zp, h))
            return
        else:
            if spec.offset is not None:
                raise LowerError(f"qembedding -> %{h}: an offset needs whole groups along the row of @{table.name}")
            # Gather the looked-up rows' group scales, then repeat each over its group (at run time, on the few
            # rows looked up, rather than storing a scale per table element).
            sb = self.group_rows(self.init(f"{table.name}::scale", _f32(scale)), ids, spec.group_size,
                                 int(t.shape[1]), h)
            zb = None
            if zp is not None:
                zb = self.as_int32(self.group_rows(self.zp_init(f"{table.name}::zp", np.asarray(zp)), ids,
                                                   spec.group_size, int(t.shape[1]), h), h)
        if zb is not None:
            c = self.node("Sub", [c, zb], hint=h)
        cf = self.node("Cast", [c], hint=h, to=TensorProto.FLOAT)
        out_dt = op.result.type.dtype
        y = self.node("Mul", [cf, sb], h if out_dt.name == "f32" else None, hint=h)
        if out_dt.name != "f32":
            y = self.node("Cast", [y], h, to=onnx_dtype(out_dt))
        self.set(op, y)


    def tied_nbits(self, table: Value, bits: int) -> bool:
        """Whether ``table`` is a tied ``bits``-bit per-group table (groups dividing the row) whose head lowers to
        MatMulNBits in this function: then the lookup reads the head's blob instead of a copy of its own."""
        g = self.nbits_group(table)
        if table.type.dtype.bits != bits or g is None or int(table.type.shape[1]) % g:
            return False
        return any(op.opcode == "qmatmul" and i == 1 and op.parent is self.func and op.operands[0].type.quant is None
                   and op.result.name not in self.opts.fallback_float for op, i in table.uses)

    def embedding_from_nbits(self, op: Op, h: str) -> str:
        """Rows of a tied 8-bit table from its MatMulNBits blob ``[vocab, nb, g]`` (stored once for both users)."""
        table, ids = op.operands
        t = table.type
        spec = t.quant
        assert spec is not None
        blob = self.nbits_blob(table)
        d = int(t.shape[1])
        nb = d // blob.group
        idn = self.val(ids)
        c = self.node("Cast", [self.node("Gather", [blob.codes, idn], hint=h, axis=0)], hint=h, to=TensorProto.INT32)
        if blob.zp is not None:
            zb = self.node("Gather", [self.node("Reshape", [blob.zp, self.i64([-1, nb, 1])], hint=h), idn], hint=h,
                           axis=0)
            c = self.node("Sub", [c, self.node("Cast", [zb], hint=h, to=TensorProto.INT32)], hint=h)
        else:
            c = self.node("Sub", [c, self.lit(blob.default_zp or 0, np.int32)], hint=h)
        cf = self.node("Cast", [c], hint=h, to=TensorProto.FLOAT)
        sb = self.node("Gather", [self.node("Reshape", [blob.scale, self.i64([-1, nb, 1])], hint=h), idn], hint=h,
                       axis=0)
        return self.blocks_to_rows(op, cf, sb, nb, h)

    def blocks_to_rows(self, op: Op, cf: str, sb: str, nb: int, h: str) -> str:
        """The shared tail of the per-block embedding lookups: f32 codes ``[.., nb, g]`` times the gathered block
        scales ``sb`` (plus the table's offset, gathered per block), reshaped to rows ``[.., d]`` in the result's
        dtype."""
        table, ids = op.operands
        t = table.type
        r = ids.type.rank
        d = int(t.shape[1])
        y = self.node("Mul", [cf, sb], hint=h)
        off = self.offset_data(t)
        if off is not None:
            assert t.quant is not None
            offset = t.quant.offset if isinstance(t.quant.offset, str) else None
            ob = self.node("Gather", [self.param_blocks(offset, off, f"{table.name}::offset.blk", [-1, nb, 1]),
                                      self.val(ids)], hint=h, axis=0)
            y = self.node("Add", [y, ob], hint=h)
        out_dt = op.result.type.dtype
        y = self.node("Reshape", [y, self.i64([0] * r + [d])], h if out_dt.name == "f32" else None, hint=h)
        if out_dt.name != "f32":
            y = self.node("Cast", [y], h, to=onnx_dtype(out_dt))
        return y

    def embedding_blocks(self, op: Op, c: str, scale: np.ndarray, zp: np.ndarray | None, h: str) -> str:
        """Rows of a per-group table: the looked-up int32 codes ``c`` as ``[.., nb, g]`` times gathered
        ``[.., nb, 1]`` scales (plus the offset), so the scales stay one per group in the file instead of one
        per element."""
        table, ids = op.operands
        t = table.type
        spec = t.quant
        assert spec is not None and spec.group_size is not None
        d = int(t.shape[1])
        g = spec.group_size
        nb = d // g
        r = ids.type.rank
        idn = self.val(ids)
        blk = self.i64([0] * r + [nb, g])
        if zp is not None:
            zb = self.as_int32(self.node("Gather", [self.zp_init(f"{table.name}::zp.blk", zp.reshape(-1, nb, 1)),
                                                    idn], hint=h, axis=0), h)
            c = self.node("Sub", [self.node("Reshape", [c, blk], hint=h), zb], hint=h)
        else:
            c = self.node("Reshape", [c, blk], hint=h)
        cf = self.node("Cast", [c], hint=h, to=TensorProto.FLOAT)
        sb = self.node("Gather", [self.param_blocks(spec.scale if isinstance(spec.scale, str) else None, scale,
                                                    f"{table.name}::scale.blk", [-1, nb, 1]), idn], hint=h, axis=0)
        return self.blocks_to_rows(op, cf, sb, nb, h)


_SIMPLE: dict[str, str] = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
    "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
    "and": "And", "or": "Or", "not": "Not", "neg": "Neg", "abs": "Abs", "sqrt": "Sqrt", "exp": "Exp", "log": "Log",
    "tanh": "Tanh", "erf": "Erf", "sigmoid": "Sigmoid", "sin": "Sin", "cos": "Cos", "reciprocal": "Reciprocal",
    "matmul": "MatMul", "where": "Where",
}


def lower_function(module: Module, function: str | None = None, *,
                   options: LowerOptions | None = None) -> LoweredFunction:
    """Lower ``function`` (default: the module's main, or ``prefill``) of ``module`` to an ONNX model.

    Constants must have their data (a module read with :func:`qir.serialize.load`). Raises :class:`LowerError`
    naming the op and the reason when something has no lowering.
    """
    if function is None and "prefill" in module.functions and "main" not in module.functions:
        function = "prefill"
    func = module.function(function)
    _ = ml_dtypes  # int4 / bf16 initializers go through ml_dtypes arrays
    return _Lowerer(module, func, options or LowerOptions()).lower()
