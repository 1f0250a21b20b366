"""qir ``Module`` -> TVM Relax ``IRModule`` (one Relax function per qir function), built with ``relax.BlockBuilder``.

* Float ops become ``relax.op.*`` calls (legalized to TOPI later) or small TE computes where qir's semantics
  need an exact spelling (``slice``, ``index``, ``take_along_axis``, ``arange``).
* Quantized ops become TensorIR functions through ``emit_te`` / ``call_tir`` (:mod:`.qops`): ``quantize`` with
  dynamic (per-token) or static parameters, ``dequantize``, ``requantize``, ``qmatmul`` (int8 x int8 -> int32
  with the scale epilogue fused; weight-only with the weight unpacked and dequantized inside the kernel) and
  ``qembedding``. Where ``qir.backends.tvm.kernels`` has a scheduled kernel for the target it is used instead
  (``bb.add_func`` + ``call_tir``); otherwise the TE compute here, scheduled later by :mod:`.schedule`.
* ``index_copy`` into a function input that nothing else reads (a decode step's KV cache) is written in place
  (``call_tir_inplace``): the cache tensor the caller passes is the one that comes back.
* Module constants become Relax function *parameters* after the function's inputs (``LoweredModule.params``
  holds their data, keyed by parameter name); only tiny constants (<= 16 elements) are inlined. Quantized
  weights are passed as their codes (sub-byte codes packed two int4 per byte), plus their scale/zero-point
  constants.
* Names: each qir value is emitted under its own (sanitized) name; ``LoweredModule.names`` maps qir value
  names to Relax variable names per function, for debuggers.

Symbolic sizes (``batch``, ``seq``, ``past+1``) become ``int64`` TIR variables shared by a function's shapes.
Anything not lowerable raises :class:`~qir.backends.compile.CompileError` naming the op and its result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qir.backends.tvm import qops
from qir.backends.tvm.lower_fused import FusedLowering
from qir.backends.tvm.lower_quant import QuantLowering, QVal, layout_of
from qir.backends.tvm.qops import tvm_dtype
from qir.errors import QirError
from qir.graph import Function, Module, Op, Value
from qir.quant import QTensor
from qir.quantspec import QuantSpec
from qir.shapes import Dim, SymDim
from qir.types import TensorType

__all__ = ["LoweredModule", "LowerError", "lower_module", "INLINE_LIMIT"]

INLINE_LIMIT = 16
"""Constants with at most this many elements are inlined into the Relax module; larger ones are parameters."""


class LowerError(QirError):
    """An op (or type) the TVM lowering cannot express."""


@dataclass
class LoweredModule:
    """What :func:`lower_module` produced.

    ``params``: parameter name -> data (shared by every function that takes it); ``signatures``: per function,
    the input names (qir names, in order), the parameter names that follow them, and the output names;
    ``names``: per function, qir value name -> Relax variable name; ``kernels``: how each matmul was lowered
    (``"qmatmul_i8"``, ``"te:qmatmul"``...) with counts; ``inplace``: per function, ``{output index: input
    index}`` of outputs that alias an input (in-place cache updates).
    """

    mod: Any
    params: dict[str, np.ndarray]
    signatures: dict[str, dict[str, list[str]]]
    names: dict[str, dict[str, str]] = field(default_factory=dict)
    kernels: dict[str, int] = field(default_factory=dict)
    inplace: dict[str, dict[int, int]] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    """Quantized parameter constants the kernels cannot read as stored (three levels, quantized zero points), folded:
    qir constant name -> the parameter that holds its values (f32, or i32 for a zero point), one per block."""


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return s if s and not s[0].isdigit() else "v" + s


_BINARY: dict[str, str] = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide", "pow": "power",
                           "maximum": "maximum", "minimum": "minimum", "eq": "equal", "ne": "not_equal",
                           "lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
                           "and": "logical_and", "or": "logical_or"}
_UNARY: dict[str, str] = {"not": "logical_not", "neg": "negative", "abs": "abs", "sqrt": "sqrt", "rsqrt": "rsqrt",
                          "exp": "exp", "log": "log", "tanh": "tanh", "erf": "erf", "sigmoid": "sigmoid",
                          "sin": "sin", "cos": "cos"}


class _FunctionLowering(QuantLowering, FusedLowering):
    """Lowers one qir function into the shared BlockBuilder."""

    def __init__(self, module: Module, func: Function, bb: Any, target: Any, params: dict[str, np.ndarray],
                 kernels: dict[str, int], use_kernels: bool) -> None:
        from tvm import relax, tirx

        self.relax = relax
        self.tir = tirx
        self.module = module
        self.func = func
        self.bb = bb
        self.target = target
        self.params = params
        self.kernel_counts = kernels
        self.use_kernels = use_kernels
        self.sym: dict[str, Any] = {}
        self.env: dict[int, Any] = {}
        self.names: dict[str, str] = {}
        self.const_vars: dict[str, Any] = {}   # constant name -> Relax param var (or inline const)
        self.fold: dict[str, str] = {}         # quantized parameter constant -> the dtype it is folded to
        self.folded: dict[str, str] = {}       # ... -> the name of the parameter holding its folded values
        self.param_order: list[str] = []
        self.param_vars: list[Any] = []
        self.inplace: dict[int, int] = {}
        self.prepacked: dict[str, Any] = {}  # weight constant -> Relax var of its row sums (prepacked int8)
        from qir.interpreter import RunContext

        self.ctx = RunContext(module)

    # -- shapes and types ------------------------------------------------------------------------------------
    def dim(self, d: Dim) -> Any:
        if isinstance(d, int):
            return self.tir.IntImm("int64", d)
        assert isinstance(d, SymDim)
        expr: Any = self.tir.IntImm("int64", d.const)
        for name, coef in d.terms:
            if name not in self.sym:
                self.sym[name] = self.tir.Var(name, "int64")
            expr = expr + self.sym[name] * coef
        return expr

    def shape(self, shape: Sequence[Dim]) -> list[Any]:
        return [self.dim(d) for d in shape]

    def sinfo(self, t: TensorType) -> Any:
        return self.relax.TensorType(self.shape(t.shape), tvm_dtype(t.dtype))

    # -- errors -------------------------------------------------------------------------------------------
    def fail(self, op: Op, why: str) -> LowerError:
        res = ", ".join(r.ref for r in op.results)
        return LowerError(f"@{self.func.name}: cannot lower op {op.opcode} (result {res}) to TVM: {why}")

    # -- constants ------------------------------------------------------------------------------------------
    def _const_names(self) -> list[str]:
        """Constants the function reads (operands and the scale/zero-point/offset constants their specs name).

        A scale or offset constant that is itself quantized (two-level: ``compress-scales``, K-quants) is declared
        with its own codes and parameters and dequantized where it is read (:meth:`nestable`); anything deeper,
        or a quantized zero point, goes to ``self.fold`` and is folded to one value per block at compile time.
        """
        seen: dict[str, None] = {}

        def add_refs(spec: QuantSpec) -> None:
            roles = ((spec.scale, "float32"), (spec.zero_point, "int32"), (spec.offset, "float32"))
            for ref, dt in roles:
                if not isinstance(ref, str):
                    continue
                if self.module.constant(ref).type.quant is not None and not (dt == "float32" and self.nestable(ref)):
                    self.fold.setdefault(ref, dt)
                else:
                    add(ref)

        def add(name: str) -> None:
            if name in seen:
                return
            seen[name] = None
            c = self.module.constant(name)
            if c.type.quant is not None:
                add_refs(c.type.quant)

        for op in self.func.ops:
            for v in op.operands:
                if v.is_constant:
                    add(v.name)
            for r in op.results:
                if r.type.quant is not None:
                    add_refs(r.type.quant)
        return list(seen)

    def _declare_constants(self) -> None:
        relax = self.relax
        for name in self._const_names():
            c = self.module.constant(name)
            t = c.type
            value = self.ctx.constant(name)
            if isinstance(value, QTensor):
                codes = np.asarray(value.codes)
                lay = layout_of(t)
                data = qops.pack_rows(codes, lay.bits) if lay.packed else codes.astype(tvm_dtype(t.dtype))
            else:
                data = np.asarray(value)
                if t.dtype.is_subbyte:  # a plain int4/int2 constant (a zero point): one value per byte
                    data = data.astype(np.int8 if t.dtype.kind == "int" else np.uint8)
            packed_isa = self._prepack_isa_for(name) if isinstance(value, QTensor) else None
            if packed_isa is not None:  # the int8 matmul kernel's tiles, made once here (lower_quant)
                data, rowsum = self._kernels().qmatmul_vnni.pack_weight(data, packed_isa)
                rs_name = _sanitize(name) + "__rowsum"
                self.params.setdefault(rs_name, rowsum)
                rs_var = relax.Var(rs_name, relax.TensorType(list(rowsum.shape), "int32"))
                self.prepacked[name] = rs_var
                self.param_order.append(rs_name)
                self.param_vars.append(rs_var)
            shape = list(data.shape)
            is_scalarish = data.size <= INLINE_LIMIT and t.quant is None
            if is_scalarish:
                self.const_vars[name] = relax.const(np.ascontiguousarray(data), str(data.dtype))
                continue
            pname = _sanitize(name)
            if pname in self.params and self.params[pname] is not data:
                # Shared by another function of the module: same constant name, same data.
                pass
            self.params.setdefault(pname, np.ascontiguousarray(data))
            var = relax.Var(pname, relax.TensorType(shape, str(data.dtype) if data.dtype != np.bool_ else "bool"))
            self.const_vars[name] = var
            self.param_order.append(pname)
            self.param_vars.append(var)
        for name, dt in self.fold.items():
            # The interpreter's values of a two-level parameter (one per block), computed once here.
            data = np.ascontiguousarray(np.asarray(self.ctx._param(name, np.float32 if dt == "float32" else np.int32)))
            pname = _sanitize(f"{name}.{'f32' if dt == 'float32' else 'i32'}")
            self.params.setdefault(pname, data)
            var = relax.Var(pname, relax.TensorType(list(data.shape), dt))
            self.folded[name] = pname
            self.const_vars[f"{name}.{dt}"] = var
            self.param_order.append(pname)
            self.param_vars.append(var)

    def _param_expr(self, ref: float | int | str | None, dt: str) -> Any:
        """A scale/zero-point reference as a Relax tensor (literals become ``[1]`` constants)."""
        if ref is None:
            return None
        if isinstance(ref, str):
            if ref in self.fold and self.fold[ref] == dt:
                return self.const_vars[f"{ref}.{dt}"]
            e = self.const_vars[ref]
            c = self.module.constant(ref)
            value = self.ctx._param(ref, np.float32 if dt == "float32" else np.int32)
            if c.type.quant is not None or tvm_dtype(c.type.dtype) != dt:
                # A quantized scale (double quantization) or a zero point of another integer type: pass the
                # values the interpreter would use, as their own inline or parameter tensor.
                return self._const_array(f"{ref}.{dt}", np.asarray(value).astype(dt))
            if len(c.type.shape) == 0:
                return self.relax.op.reshape(e, [1])
            return e
        return self.relax.const(np.asarray([ref], dtype=dt), dt)

    def _const_array(self, name: str, data: np.ndarray) -> Any:
        if data.ndim == 0:
            data = data.reshape(1)
        return self.relax.const(np.ascontiguousarray(data), str(data.dtype))

    def nestable(self, ref: str) -> bool:
        """Whether the quantized parameter constant ``@ref`` is read as a :class:`QVal` (dequantized where it is
        used): its own scale, zero point and offset are plain constants or literals (two levels, not three)."""
        spec = self.module.constant(ref).type.quant
        return spec is not None and not spec.dynamic and all(
            self.module.constant(r).type.quant is None for r in spec.constant_refs)

    def weight_param(self, ref: str | None) -> Any:
        """A constant's scale or offset for the dequantizing kernels: an f16 constant stays f16 (GGUF's block
        parameters; the kernels widen it in registers), an f32 one f32, a two-level one a :class:`QVal` (its
        codes, dequantized where they are read), a deeper one its folded f32."""
        if ref is None:
            return None
        c = self.module.constant(ref)
        if c.type.quant is not None and ref not in self.fold and self.nestable(ref):
            return self.qconst_named(ref)
        if c.type.quant is None and c.type.dtype.name in ("f16", "f32") and len(c.type.shape) > 0:
            return self.const_vars[ref]
        return self._param_expr(ref, "float32")

    def qconst(self, v: Value) -> QVal:
        return self.qconst_named(v.name)

    def qconst_named(self, name: str) -> QVal:
        t = self.module.constant(name).type
        assert t.quant is not None
        return QVal(self.const_vars[name], self.weight_param(t.quant.scale)
                    if isinstance(t.quant.scale, str) else self._param_expr(t.quant.scale, "float32"),
                    self._param_expr(t.quant.zero_point, "int32"), layout_of(t), t, self.weight_param(t.quant.offset))

    # -- emission -----------------------------------------------------------------------------------------
    def emit(self, expr: Any, v: Value) -> Any:
        var = self.bb.emit(expr, name_hint=_sanitize(v.name))
        self.names[v.name] = var.name
        return var

    def emit_te(self, fn: Callable[..., Any], args: Sequence[Any], name: str, v: Value | None = None) -> Any:
        var = self.bb.emit_te(fn, *args, primfunc_name_hint=name)
        if v is not None:
            self.names[v.name] = var.name
        return var

    def get(self, v: Value) -> Any:
        if v.is_constant:
            if v.type.quant is not None:
                return self.qconst(v)
            return self.const_vars[v.name]
        return self.env[id(v)]

    def plain(self, op: Op, v: Value) -> Any:
        e = self.get(v)
        if isinstance(e, QVal):
            raise self.fail(op, f"operand {v.ref} is quantized ({v.type}); this op takes plain tensors "
                                "(insert a dequantize)")
        return e

    # -- driver -------------------------------------------------------------------------------------------
    def lower(self) -> dict[str, list[str]]:
        relax = self.relax
        inputs = []
        for v in self.func.inputs:
            if v.type.quant is not None:
                raise LowerError(f"@{self.func.name}: input {v.ref} has the quantized type {v.type}; TVM "
                                 "artifacts take plain tensors as inputs")
            var = relax.Var(_sanitize(v.name), self.sinfo(v.type))
            self.env[id(v)] = var
            self.names[v.name] = var.name
            inputs.append(var)
        self._declare_constants()
        uses = {id(v): len(v.uses) for v in self.func.inputs}
        self.input_index = {id(v): i for i, v in enumerate(self.func.inputs)}
        self.input_uses = uses
        outputs_ids = {id(v) for v in self.func.outputs}
        self.output_ids = outputs_ids
        # num_input: the VM checks the dtype and shape of the real inputs only, not of every weight on every call
        # (SmolLM2's decode takes ~900 weights: two builtin calls each per step, ~5% of a w4a8 step).
        with self.bb.function(self.func.name, inputs + self.param_vars, attrs={"num_input": len(inputs)}):
            with self.bb.dataflow():
                for op in self.func.ops:
                    handler = getattr(self, "op_" + op.opcode, None)
                    if handler is None:
                        raise self.fail(op, "no TVM lowering for this op")
                    try:
                        results = handler(op)
                    except LowerError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - TVM raises many types; name the op
                        raise self.fail(op, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}") from exc
                    for r, e in zip(op.results, results):
                        self.env[id(r)] = e
                outs = []
                for v in self.func.outputs:
                    e = self.get(v)
                    if isinstance(e, QVal):
                        raise LowerError(f"@{self.func.name}: output {v.ref} is quantized ({v.type}); return a "
                                         "dequantized value")
                    outs.append(e)
                out = self.bb.emit_output(relax.Tuple(outs))
            self.bb.emit_func_output(out)
        for oi, v in enumerate(self.func.outputs):
            src = getattr(self, "_aliases", {}).get(id(v))
            if src is not None:
                self.inplace[oi] = src
        return {"inputs": [v.name for v in self.func.inputs], "params": self.param_order,
                "outputs": [v.name for v in self.func.outputs]}

    # -- elementwise ----------------------------------------------------------------------------------------
    def _binary(self, op: Op) -> list[Any]:
        a, b = (self.plain(op, v) for v in op.operands)
        return [self.emit(getattr(self.relax.op, _BINARY[op.opcode])(a, b), op.result)]

    def _unary(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(getattr(self.relax.op, _UNARY[op.opcode])(x), op.result)]

    op_add = op_sub = op_mul = op_div = op_pow = op_maximum = op_minimum = _binary
    op_eq = op_ne = op_lt = op_le = op_gt = op_ge = op_and = op_or = _binary
    op_not = op_neg = op_abs = op_sqrt = op_rsqrt = op_exp = op_log = op_tanh = op_erf = _unary
    op_sigmoid = op_sin = op_cos = _unary

    def op_relu(self, op: Op) -> list[Any]:
        return [self.emit(self.relax.op.nn.relu(self.plain(op, op.operands[0])), op.result)]

    def op_silu(self, op: Op) -> list[Any]:
        return [self.emit(self.relax.op.nn.silu(self.plain(op, op.operands[0])), op.result)]

    def op_gelu(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        fast = self._kernel_gelu(op, x)
        if fast is not None:
            return [fast]
        fn = self.relax.op.nn.gelu_tanh if op.attrs.get("approximate", "none") == "tanh" else self.relax.op.nn.gelu
        return [self.emit(fn(x), op.result)]

    def op_reciprocal(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        one = self.relax.const(1.0, tvm_dtype(op.result.type.dtype))
        return [self.emit(self.relax.op.divide(one, x), op.result)]

    def op_cast(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        src, dst = op.operands[0].type.dtype, op.result.type.dtype
        if dst.kind == "bool" and src.kind != "bool":
            zero = self.relax.const(0, tvm_dtype(src))
            return [self.emit(self.relax.op.not_equal(x, zero), op.result)]
        return [self.emit(self.relax.op.astype(x, tvm_dtype(dst)), op.result)]

    def op_where(self, op: Op) -> list[Any]:
        c, a, b = (self.plain(op, v) for v in op.operands)
        return [self.emit(self.relax.op.where(c, a, b), op.result)]

    # -- indexing -------------------------------------------------------------------------------------------
    def op_arange(self, op: Op) -> list[Any]:
        from tvm import te

        t = op.result.type
        n = self.dim(t.shape[0])
        start, step, dt = int(op.attrs["start"]), int(op.attrs["step"]), tvm_dtype(t.dtype)

        def fn() -> Any:
            return te.compute((n,), lambda i: (start + step * i).astype(dt), name="arange")

        return [self.emit_te(fn, [], "arange", op.result)]

    def op_cumsum(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        dt = tvm_dtype(op.result.type.dtype)
        return [self.emit(self.relax.op.cumsum(x, axis=int(op.attrs["axis"]), dtype=dt), op.result)]

    def _wrap(self, i: Any, n: Any) -> Any:
        """numpy's negative index: ``i + n`` when ``i < 0``."""
        i = i.astype("int64")
        return self.tir.Select(i < 0, i + n, i)

    def op_take_along_axis(self, op: Op) -> list[Any]:
        from tvm import te

        x, idx = (self.plain(op, v) for v in op.operands)
        t = op.result.type
        axis = int(op.attrs["axis"]) % t.rank
        oshape = self.shape(t.shape)
        xshape = op.operands[0].type.shape
        ishape = op.operands[1].type.shape

        def fn(X: Any, Ind: Any) -> Any:
            def f(*i: Any) -> Any:
                ii = tuple(0 if ishape[a] == 1 and oshape_is_not_one(a, ishape) else i[a] for a in range(len(i)))
                j = self._wrap(Ind[ii], X.shape[axis])
                xi = tuple(j if a == axis else (0 if xshape[a] == 1 else i[a]) for a in range(len(i)))
                return X[xi]

            def oshape_is_not_one(a: int, shp: Sequence[Dim]) -> bool:
                return t.shape[a] != 1

            return te.compute(oshape, f, name="take_along_axis")

        return [self.emit_te(fn, [x, idx], "take_along_axis", op.result)]

    def op_index(self, op: Op) -> list[Any]:
        from tvm import te

        x = self.plain(op, op.operands[0])
        idxs = [self.plain(op, v) for v in op.operands[1:]]
        xt = op.operands[0].type
        axes = [int(a) % xt.rank for a in op.attrs["axes"]]
        t = op.result.type
        bshape_rank = max(v.type.rank for v in op.operands[1:])
        adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
        pos = axes[0] if adjacent else 0
        itypes = [v.type for v in op.operands[1:]]

        def fn(X: Any, *Ind: Any) -> Any:
            def f(*i: Any) -> Any:
                b = i[pos:pos + bshape_rank]
                rest = i[:pos] + i[pos + bshape_rank:]
                sel = []
                for it, ind in zip(itypes, Ind):
                    off = bshape_rank - it.rank
                    sel.append(ind[tuple(0 if it.shape[a] == 1 else b[off + a] for a in range(it.rank))])
                out: list[Any] = []
                r = iter(rest)
                for a in range(xt.rank):
                    if a in axes:
                        out.append(self._wrap(sel[axes.index(a)], X.shape[a]))
                    else:
                        out.append(next(r))
                return X[tuple(out)]

            return te.compute(self.shape(t.shape), f, name="index")

        return [self.emit_te(fn, [x, *idxs], "index", op.result)]

    def op_index_copy(self, op: Op) -> list[Any]:
        x_v, idx_v, src_v = op.operands
        x, idx, src = (self.plain(op, v) for v in op.operands)
        t = op.result.type
        axis = int(op.attrs["axis"]) % t.rank
        prim = _index_copy_primfunc(t.rank, axis, tvm_dtype(t.dtype), tvm_dtype(idx_v.type.dtype))
        gv = self.bb.add_func(prim, f"index_copy_r{t.rank}a{axis}_{tvm_dtype(t.dtype)}")
        in_place = (not x_v.is_constant and id(x_v) in self.input_index and self.input_uses.get(id(x_v)) == 1
                    and id(x_v) not in self.output_ids)
        if not in_place:
            # The destination is still read elsewhere (or is a constant): update a copy.
            from tvm import te

            x = self.bb.emit_te(lambda X: te.compute(X.shape, lambda *i: X[i], name="copy"), x,
                                primfunc_name_hint="copy")
        call = self.relax.call_tir_inplace(gv, [x, idx, src], inplace_indices=[0], out_ty=self.sinfo(t))
        var = self.emit(call, op.result)
        if in_place:
            self.__dict__.setdefault("_aliases", {})[id(op.result)] = self.input_index[id(x_v)]
        return [var]

    # -- linear algebra ----------------------------------------------------------------------------------
    def op_linear(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        w = self.plain(op, op.operands[1])
        b = self.plain(op, op.operands[2]) if len(op.operands) > 2 else None
        y = self._kernel_matmul_f32(op, x, w, b)
        if y is not None:
            return [y]
        self.kernel_counts["relax:linear"] = self.kernel_counts.get("relax:linear", 0) + 1
        return [self.emit(self.relax.op.linear(x, w, b), op.result)]

    def op_matmul(self, op: Op) -> list[Any]:
        a, b = (self.plain(op, v) for v in op.operands)
        return [self.emit(self.relax.op.matmul(a, b), op.result)]

    def op_embedding(self, op: Op) -> list[Any]:
        table, ids = (self.plain(op, v) for v in op.operands)
        return [self.emit(self.relax.op.take(table, ids, axis=0), op.result)]

    # -- nn ---------------------------------------------------------------------------------------------
    def op_softmax(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.nn.softmax(x, axis=int(op.attrs["axis"])), op.result)]

    def _vec(self, op: Op, index: int, fill: float) -> Any:
        if len(op.operands) > index:
            return self.plain(op, op.operands[index])
        n = op.operands[0].type.shape[-1]
        if not isinstance(n, int):
            raise self.fail(op, "a norm without weight needs a fixed last axis")
        return self.relax.const(np.full((n,), fill, np.float32), tvm_dtype(op.operands[0].type.dtype))

    def op_layer_norm(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        g, b = self._vec(op, 1, 1.0), self._vec(op, 2, 0.0)
        fast = self._kernel_norm(op, "layer", x, [g, b])
        if fast is not None:
            return [fast]
        return [self.emit(self.relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=float(op.attrs["eps"])),
                          op.result)]

    def op_rms_norm(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        w = self._vec(op, 1, 1.0)
        fast = self._kernel_norm(op, "rms", x, [w])
        if fast is not None:
            return [fast]
        return [self.emit(self.relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=float(op.attrs["eps"])), op.result)]

    def _reduce(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        fn = getattr(self.relax.op, op.opcode)
        return [self.emit(fn(x, axis=[int(a) for a in op.attrs["axes"]], keepdims=bool(op.attrs["keepdim"])),
                          op.result)]

    op_mean = op_sum = op_max = _reduce

    def op_attention(self, op: Op) -> list[Any]:
        R = self.relax.op
        q, k, v = (self.plain(op, o) for o in op.operands[:3])
        qt, kt = op.operands[0].type, op.operands[1].type
        hq, hkv, d = qt.shape[1], kt.shape[1], qt.shape[3]
        dt = tvm_dtype(qt.dtype)
        fused = self._kernel_attention(op, q, k, v)
        if fused is not None:
            return [fused]
        if hq != hkv:
            rep = int(hq) // int(hkv)  # type: ignore[arg-type]
            k = self.bb.emit(R.repeat(k, rep, axis=1))
            v = self.bb.emit(R.repeat(v, rep, axis=1))
        scale = op.attrs.get("scale")
        if scale is None:
            if not isinstance(d, int):
                raise self.fail(op, "the default scale needs a fixed head_dim")
            scale = 1.0 / float(np.sqrt(d))
        s = self.bb.emit(R.multiply(R.matmul(q, R.permute_dims(k, [0, 1, 3, 2])), self.relax.const(scale, dt)))
        allowed = None
        if len(op.operands) > 3:
            m = self.plain(op, op.operands[3])
            if op.operands[3].type.dtype.kind == "bool":
                allowed = m
            else:
                s = self.bb.emit(R.add(s, m))
        if op.attrs.get("causal"):
            from tvm import te

            sq, sk = self.dim(qt.shape[2]), self.dim(kt.shape[2])
            causal = self.bb.emit_te(lambda: te.compute((sq, sk), lambda i, j: j <= i + (sk - sq), name="causal"),
                                     primfunc_name_hint="causal_mask")
            allowed = causal if allowed is None else self.bb.emit(R.logical_and(allowed, causal))
        if allowed is None:
            p = self.bb.emit(R.nn.softmax(s, axis=-1))
        else:
            # qir's rule: a row with no key left gives p = 0 (numpy's where(isfinite(top), top, 0) form).
            s = self.bb.emit(R.where(allowed, s, self.relax.const(float("-inf"), dt)))
            top = self.bb.emit(R.max(s, axis=[-1], keepdims=True))
            top = self.bb.emit(R.where(R.isfinite(top), top, self.relax.const(0.0, dt)))
            e = self.bb.emit(R.exp(R.subtract(s, top)))
            total = self.bb.emit(R.sum(e, axis=[-1], keepdims=True))
            total = self.bb.emit(R.where(R.greater(total, self.relax.const(0.0, dt)), total,
                                         self.relax.const(1.0, dt)))
            p = self.bb.emit(R.divide(e, total))
        return [self.emit(R.matmul(p, v), op.result)]

    # -- shape --------------------------------------------------------------------------------------------
    def op_reshape(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.reshape(x, self.shape(op.result.type.shape)), op.result)]

    def op_transpose(self, op: Op) -> list[Any]:
        pre = self.__dict__.get("prelowered", {}).get(id(op.result))
        if pre is not None:  # computed by the fused attention kernel in this layout (lower_fused)
            return [pre]
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.permute_dims(x, [int(p) for p in op.attrs["perm"]]), op.result)]

    def op_slice(self, op: Op) -> list[Any]:
        from tvm import te

        x = self.plain(op, op.operands[0])
        xt, t = op.operands[0].type, op.result.type
        axis = int(op.attrs["axis"]) % xt.rank
        start, step = int(op.attrs["start"]), int(op.attrs["step"])
        end = op.attrs["end"]
        n = self.dim(xt.shape[axis])
        tir = self.tir
        # Python slice semantics: the first index taken along the axis.
        if step > 0:
            first = tir.min(tir.max(start + n, 0), n) if start < 0 else tir.min(tir.IntImm("int64", start), n)
        else:
            first = tir.min(tir.max(start + n, -1), n - 1) if start < 0 else tir.min(tir.IntImm("int64", start),
                                                                                     n - 1)
        del end  # the extent is the declared result shape

        def fn(X: Any) -> Any:
            return te.compute(self.shape(t.shape),
                              lambda *i: X[tuple(first + i[a] * step if a == axis else i[a] for a in range(len(i)))],
                              name="slice")

        return [self.emit_te(fn, [x], "slice", op.result)]

    def op_concat(self, op: Op) -> list[Any]:
        xs = [self.plain(op, v) for v in op.operands]
        return [self.emit(self.relax.op.concat(xs, axis=int(op.attrs["axis"])), op.result)]

    def op_gather(self, op: Op) -> list[Any]:
        x, idx = (self.plain(op, v) for v in op.operands)
        return [self.emit(self.relax.op.take(x, idx, axis=int(op.attrs["axis"]), mode="wrap"), op.result)]

    def op_unsqueeze(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.expand_dims(x, int(op.attrs["axis"])), op.result)]

    def op_squeeze(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.squeeze(x, [int(op.attrs["axis"])]), op.result)]

    def op_expand(self, op: Op) -> list[Any]:
        x = self.plain(op, op.operands[0])
        return [self.emit(self.relax.op.broadcast_to(x, self.shape(op.result.type.shape)), op.result)]

def _index_copy_primfunc(rank: int, axis: int, dtype: str, idx_dtype: str) -> Any:
    """``X[..., I[i], ...] = S[..., i, ...]`` in place (TVMScript source for this rank, axis and dtype)."""
    import tvm

    dims = [f"d{a}" for a in range(rank)]
    sdims = ["n" if a == axis else d for a, d in enumerate(dims)]
    loops = [f"i{a}" for a in range(rank)]
    vs = [f"v{a}" for a in range(rank)]
    xi = ", ".join(f"T.Cast('int64', I[{vs[axis]}]) + T.Select(T.Cast('int64', I[{vs[axis]}]) < T.int64(0), "
                   f"d{axis}, T.int64(0))" if a == axis else vs[a] for a in range(rank))
    src = f"""

@T.prim_func(private=True, s_tir=True)
def index_copy(x: T.handle, idx: T.handle, src: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    {", ".join(dims + ["n"])} = {", ".join(["T.int64()"] * (rank + 1))}
    X = T.match_buffer(x, ({", ".join(dims)},), "{dtype}")
    I = T.match_buffer(idx, (n,), "{idx_dtype}")
    S = T.match_buffer(src, ({", ".join(sdims)},), "{dtype}")
    for {", ".join(loops)} in T.grid({", ".join(sdims)}):
        with T.sblock("index_copy"):
            {", ".join(vs)} = T.axis.remap("{"S" * rank}", [{", ".join(loops)}])
            X[{xi}] = S[{", ".join(vs)}]
"""
    return tvm.script.from_source(src)


def lower_module(module: Module, *, target: Any = None, functions: Sequence[str] | None = None,
                 use_kernels: bool = True) -> LoweredModule:
    """Lower ``functions`` (default: all) of ``module`` into one Relax ``IRModule``.

    ``target`` (a ``tvm.target.Target``) lets scheduled kernels from ``qir.backends.tvm.kernels`` be chosen
    for it; ``use_kernels=False`` keeps the plain TE computes (for differential tests of the lowering itself).
    """
    from tvm import relax

    bb = relax.BlockBuilder()
    params: dict[str, np.ndarray] = {}
    kernels: dict[str, int] = {}
    sigs: dict[str, dict[str, list[str]]] = {}
    names: dict[str, dict[str, str]] = {}
    inplace: dict[str, dict[int, int]] = {}
    folded: dict[str, str] = {}
    for fname in functions or list(module.functions):
        fl = _FunctionLowering(module, module.function(fname), bb, target, params, kernels, use_kernels)
        sigs[fname] = fl.lower()
        folded.update(fl.folded)
        names[fname] = fl.names
        inplace[fname] = fl.inplace
    mod = bb.get()
    return LoweredModule(mod, params, sigs, names, kernels, inplace, folded)
