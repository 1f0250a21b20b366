"""The table of aten op converters: one small function per aten op, registered by its name.

A converter receives the :class:`~qir.frontend.torch_export.ConversionContext` and the node's arguments (FX
nodes already replaced by qir :class:`~qir.graph.Value` s, symbolic sizes by qir dims) and returns the qir value
of the node (or a tuple of them, or ``None``). Users add ops the same way::

    from qir.frontend.aten import register

    @register("aten.frac.default")
    def _frac(cx, x):
        return cx.emit("sub", [x, cx.emit("floor_like_op", [x], name=cx.node.name + ".floor")])

Keys are overload names (``aten.add.Tensor``) or packet names (``aten.add``, matching every overload).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qir.dtypes import DType, boolean, f32
from qir.graph import Value
from qir.shapes import Dim, SymDim, sub

if TYPE_CHECKING:
    from qir.frontend.torch_export import ConversionContext as Cx
else:
    Cx = Any

Converter = Callable[..., Any]
ATEN_CONVERTERS: dict[str, Converter] = {}
"""Aten op name (overload ``aten.x.y`` or packet ``aten.x``) -> converter."""

_INT_MAX = 2**63 - 1


def register(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter under one or more aten op names."""
    def deco(fn: Converter) -> Converter:
        for n in names:
            ATEN_CONVERTERS[n] = fn
        return fn

    return deco


def lookup(target: Any) -> Converter | None:
    """The converter of an FX call target: by overload name, then by packet name."""
    from qir.frontend.torch_export import op_key

    key = op_key(target)
    if key in ATEN_CONVERTERS:
        return ATEN_CONVERTERS[key]
    packet = key.rsplit(".", 1)[0]
    return ATEN_CONVERTERS.get(packet) if packet.startswith("aten.") else None


def _out_dtype(cx: Cx) -> DType:
    return cx.meta_type().dtype


# -- identities ------------------------------------------------------------------------------------------------
@register("aten.dropout.default", "aten.alias.default", "aten.detach.default", "aten.clone.default",
          "aten.lift_fresh_copy.default", "aten.contiguous.default", "aten.feature_dropout.default",
          "aten.detach_.default")
def _identity(cx: Cx, x: Value, *args: Any, **kwargs: Any) -> Value:
    return x


@register("aten.to", "aten._to_copy.default", "aten.type_as.default")
def _to(cx: Cx, x: Value, *args: Any, **kwargs: Any) -> Value:
    return cx.cast(x, _out_dtype(cx))


# -- transformer-level ops -------------------------------------------------------------------------------------
@register("aten.linear.default")
def _linear(cx: Cx, x: Value, w: Value, b: Value | None = None) -> Value:
    return cx.emit("linear", [x, w] + ([b] if b is not None else []))


@register("aten.embedding.default")
def _embedding(cx: Cx, table: Value, ids: Value, *args: Any, **kwargs: Any) -> Value:
    return cx.emit("embedding", [table, ids])


@register("aten.layer_norm.default")
def _layer_norm(cx: Cx, x: Value, normalized_shape: Sequence[Any], weight: Value | None = None,
                bias: Value | None = None, eps: float = 1e-5, cudnn_enable: bool = True) -> Value:
    if len(normalized_shape) != 1:
        raise cx.fail(f"layer_norm over {len(normalized_shape)} axes; qir's layer_norm normalizes the last axis only")
    ops: list[Value] = [x]
    if weight is not None or bias is not None:
        ops.append(weight if weight is not None else cx.emit(
            "expand", [cx.scalar(1.0, x.type.dtype)], {"shape": cx.dims_attr(x.type.shape[-1:])},
            name=cx.node.name + ".ones"))
    if bias is not None:
        ops.append(bias)
    return cx.emit("layer_norm", ops, {"eps": float(eps)})


@register("aten.rms_norm.default")
def _rms_norm(cx: Cx, x: Value, normalized_shape: Sequence[Any], weight: Value | None = None,
              eps: float | None = None) -> Value:
    if len(normalized_shape) != 1:
        raise cx.fail("rms_norm over several axes is not supported")
    eps = float(eps) if eps is not None else float(np.finfo(x.type.dtype.numpy).eps)
    return cx.emit("rms_norm", [x] + ([weight] if weight is not None else []), {"eps": eps})


@register("aten.scaled_dot_product_attention.default")
def _sdpa(cx: Cx, q: Value, k: Value, v: Value, attn_mask: Value | None = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Value:
    if dropout_p:
        raise cx.fail(f"attention dropout {dropout_p} is training-only; export the model in eval mode")
    if q.type.shape[1] != k.type.shape[1] and not enable_gqa:
        raise cx.fail("query and key heads differ but enable_gqa is False")
    operands = [q, k, v]
    causal = bool(is_causal)
    sq, sk = q.type.shape[2], k.type.shape[2]
    if causal and sq != sk:
        # torch aligns is_causal to the top-left corner, qir to the bottom-right: pass torch's mask explicitly.
        if not (isinstance(sq, int) and isinstance(sk, int)):
            raise cx.fail(f"is_causal with {sq} queries and {sk} keys (symbolic and different) has no qir form")
        tri = np.tril(np.ones((sq, sk), dtype=bool))
        attn_mask = cx.tensor_constant(f"{cx.node.name}.causal_mask", tri)
        causal = False
    if attn_mask is not None:
        operands.append(attn_mask)
    attrs: dict[str, Any] = {"causal": causal}
    if scale is not None:
        attrs["scale"] = float(scale)
    return cx.emit("attention", operands, attrs)


# -- elementwise -----------------------------------------------------------------------------------------------
def _binary(opcode: str) -> Converter:
    def conv(cx: Cx, a: Any, b: Any, *, alpha: Any = 1) -> Value:
        dt = _out_dtype(cx)
        va, vb = cx.operand(a, dt), cx.operand(b, dt)
        if alpha != 1:
            vb = cx.emit("mul", [vb, cx.scalar(alpha, dt)], name=cx.node.name + ".alpha")
        return cx.emit(opcode, [va, vb])

    return conv


for _names, _op in ((("aten.add.Tensor", "aten.add.Scalar"), "add"), (("aten.sub.Tensor", "aten.sub.Scalar"), "sub"),
                    (("aten.mul.Tensor", "aten.mul.Scalar"), "mul"), (("aten.div.Tensor", "aten.div.Scalar"), "div"),
                    (("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor"), "pow"),
                    (("aten.maximum.default",), "maximum"), (("aten.minimum.default",), "minimum")):
    register(*_names)(_binary(_op))


@register("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(cx: Cx, a: Any, b: Any, alpha: Any = 1) -> Value:
    return _binary("sub")(cx, b, a, alpha=1) if alpha == 1 else _binary("sub")(cx, b, _scaled(cx, a, alpha))


def _scaled(cx: Cx, a: Any, alpha: Any) -> Value:
    dt = _out_dtype(cx)
    return cx.emit("mul", [cx.operand(a, dt), cx.scalar(alpha, dt)], name=cx.node.name + ".alpha")


@register("aten.pow.Scalar")
def _pow_scalar(cx: Cx, a: Any, b: Value) -> Value:
    dt = _out_dtype(cx)
    return cx.emit("pow", [cx.operand(a, dt), cx.operand(b, dt)])


@register("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div_mode(cx: Cx, a: Any, b: Any, *, rounding_mode: str | None = None) -> Value:
    if rounding_mode is None:
        return _binary("div")(cx, a, b)
    dt = _out_dtype(cx)
    if rounding_mode == "trunc" and dt.is_integer:
        return cx.emit("div", [cx.operand(a, dt), cx.operand(b, dt)])
    raise cx.fail(f"division with rounding_mode={rounding_mode!r} on {dt} is not supported")


def _compare(opcode: str) -> Converter:
    def conv(cx: Cx, a: Any, b: Any) -> Value:
        dt = _common_dtype(a, b)
        return cx.emit(opcode, [cx.operand(a, dt), cx.operand(b, dt)])

    return conv


def _common_dtype(a: Any, b: Any) -> DType:
    """torch's promotion for comparisons, restricted to what qir graphs meet."""
    ta = a.type.dtype if isinstance(a, Value) else None
    tb = b.type.dtype if isinstance(b, Value) else None
    if ta is not None and tb is not None:
        if ta == tb:
            return ta
        import torch

        from qir.frontend.torch_export import qir_dtype

        return qir_dtype(torch.promote_types(_torch_dtype(ta), _torch_dtype(tb)))
    t = ta or tb
    s = b if ta is not None else a
    assert t is not None
    if isinstance(s, float) and not t.is_float:
        return f32
    if isinstance(s, bool) and t == boolean:
        return t
    return t


def _torch_dtype(dt: DType) -> Any:
    import torch

    return {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
            "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
            "bool": torch.bool}[dt.name]


for _c in ("eq", "ne", "lt", "le", "gt", "ge"):
    register(f"aten.{_c}.Tensor", f"aten.{_c}.Scalar")(_compare(_c))


def _logic(opcode: str) -> Converter:
    def conv(cx: Cx, a: Any, b: Any) -> Value:
        if _out_dtype(cx) != boolean:
            raise cx.fail(f"bitwise {opcode} on {_out_dtype(cx)} tensors is not supported (only bool)")
        return cx.emit(opcode, [cx.operand(a, boolean), cx.operand(b, boolean)])

    return conv


register("aten.__and__.Tensor", "aten.bitwise_and.Tensor", "aten.logical_and.default")(_logic("and"))
register("aten.__or__.Tensor", "aten.bitwise_or.Tensor", "aten.logical_or.default")(_logic("or"))


@register("aten.logical_not.default", "aten.bitwise_not.default")
def _not(cx: Cx, a: Value) -> Value:
    return cx.emit("not", [cx.cast(a, boolean)])


def _unary(opcode: str) -> Converter:
    def conv(cx: Cx, x: Value) -> Value:
        return cx.emit(opcode, [cx.cast(x, _out_dtype(cx))])

    return conv


for _u in ("rsqrt", "neg", "cos", "sin", "tanh", "sigmoid", "exp", "log", "sqrt", "abs", "relu", "erf",
           "reciprocal"):
    register(f"aten.{_u}.default")(_unary(_u))
register("aten.silu.default")(_unary("silu"))


@register("aten.gelu.default")
def _gelu(cx: Cx, x: Value, approximate: str = "none") -> Value:
    return cx.emit("gelu", [x], {"approximate": approximate})


@register("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(cx: Cx, x: Value, min: Any = None, max: Any = None) -> Value:  # noqa: A002 - torch's names
    if cx.node.target.__name__.startswith("clamp_max"):
        min, max = None, min
    dt = _out_dtype(cx)
    y = cx.cast(x, dt)
    if min is not None:
        y = cx.emit("maximum", [y, cx.operand(min, dt)], name=cx.node.name + (".min" if max is not None else ""))
    if max is not None:
        y = cx.emit("minimum", [y, cx.operand(max, dt)])
    return y


@register("aten.where.self")
def _where(cx: Cx, cond: Value, a: Any, b: Any) -> Value:
    dt = _out_dtype(cx)
    return cx.emit("where", [cx.cast(cond, boolean), cx.operand(a, dt), cx.operand(b, dt)])


# -- reductions, softmax, matmul -------------------------------------------------------------------------------
def _axes(dims: Any, rank: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    return [int(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _reduce(opcode: str) -> Converter:
    def conv(cx: Cx, x: Value, dims: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Value:
        x = cx.cast(x, _out_dtype(cx))
        return cx.emit(opcode, [x], {"axes": _axes(dims, x.type.rank), "keepdim": bool(keepdim)})

    return conv


register("aten.mean.dim")(_reduce("mean"))
register("aten.sum.dim_IntList")(_reduce("sum"))
register("aten.amax.default")(_reduce("max"))


@register("aten.sum.default", "aten.mean.default")
def _reduce_all(cx: Cx, x: Value, *, dtype: Any = None) -> Value:
    opcode = "sum" if "sum" in str(cx.node.target) else "mean"
    x = cx.cast(x, _out_dtype(cx))
    return cx.emit(opcode, [x], {"axes": list(range(x.type.rank))})


@register("aten.softmax.int", "aten._softmax.default")
def _softmax(cx: Cx, x: Value, dim: int, dtype_or_half: Any = None) -> Value:
    return cx.emit("softmax", [cx.cast(x, _out_dtype(cx))], {"axis": int(dim)})


@register("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(cx: Cx, a: Value, b: Value) -> Value:
    return cx.emit("matmul", [a, b])


@register("aten.cumsum.default")
def _cumsum(cx: Cx, x: Value, dim: int, *, dtype: Any = None) -> Value:
    return cx.emit("cumsum", [cx.cast(x, _out_dtype(cx))], {"axis": int(dim)})


# -- shapes ----------------------------------------------------------------------------------------------------
@register("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
          "aten.view_copy.default")
def _reshape(cx: Cx, x: Value, *args: Any) -> Value:
    shape = cx.meta_type().shape
    if shape == x.type.shape:
        return x
    return cx.emit("reshape", [x], {"shape": cx.dims_attr(shape)})


@register("aten.expand.default", "aten.expand_copy.default")
def _expand(cx: Cx, x: Value, *args: Any, **kwargs: Any) -> Value:
    shape = cx.meta_type().shape
    if shape == x.type.shape:
        return x
    return cx.emit("expand", [x], {"shape": cx.dims_attr(shape)})


@register("aten.transpose.int")
def _transpose(cx: Cx, x: Value, d0: int, d1: int) -> Value:
    perm = list(range(x.type.rank))
    a, b = d0 % x.type.rank, d1 % x.type.rank
    if a == b:
        return x
    perm[a], perm[b] = perm[b], perm[a]
    return cx.emit("transpose", [x], {"perm": perm})


@register("aten.t.default")
def _t(cx: Cx, x: Value) -> Value:
    return x if x.type.rank < 2 else _transpose(cx, x, 0, 1)


@register("aten.permute.default")
def _permute(cx: Cx, x: Value, dims: Sequence[int]) -> Value:
    perm = [int(d) % x.type.rank for d in dims]
    if perm == list(range(x.type.rank)):
        return x
    return cx.emit("transpose", [x], {"perm": perm})


@register("aten.unsqueeze.default")
def _unsqueeze(cx: Cx, x: Value, dim: int) -> Value:
    return cx.emit("unsqueeze", [x], {"axis": int(dim) % (x.type.rank + 1)})


@register("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(cx: Cx, x: Value, dims: Any = None) -> Value:
    axes = _axes(dims, x.type.rank) if dims is not None else list(range(x.type.rank))
    y = x
    for a in sorted((a % x.type.rank for a in axes), reverse=True):
        if y.type.shape[a] == 1:
            y = cx.emit("squeeze", [y], {"axis": a})
    return y


@register("aten.cat.default", "aten.concat.default")
def _cat(cx: Cx, xs: Sequence[Value], dim: int = 0) -> Value:
    dt = _out_dtype(cx)
    parts = [cx.cast(x, dt) for x in xs if not (x.type.rank == 1 and x.type.shape[0] == 0)]
    if len(parts) == 1:
        return parts[0]
    return cx.emit("concat", parts, {"axis": int(dim) % parts[0].type.rank})


def _bound(cx: Cx, b: Any, size: Dim, what: str) -> int | None:
    """A slice bound as an int (negative = from the end) or None (the end), for a possibly symbolic size."""
    if b is None:
        return None
    if isinstance(b, int) and b >= _INT_MAX // 2:
        return None
    if isinstance(b, int) and isinstance(size, int):
        return None if b >= size else b
    if isinstance(b, int):
        return b
    diff = sub(b, size)
    if isinstance(diff, int) and diff >= 0:
        return None
    if isinstance(diff, int):
        return diff
    raise _SymbolicBound


class _SymbolicBound(Exception):
    """A slice bound that is symbolic and not the axis size minus a constant (sliced with a gather instead)."""


@register("aten.slice.Tensor")
def _slice(cx: Cx, x: Value, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Value:
    axis = int(dim) % x.type.rank
    size = x.type.shape[axis]
    try:
        s = _bound(cx, start, size, "start")
        e = _bound(cx, end, size, "end")
    except _SymbolicBound:
        # e.g. a position-id buffer [1, 512] sliced to [:, :seq]: take the rows arange(start, end, step).
        out = cx.meta_type().shape[axis]
        begin = 0 if start is None else start
        if not isinstance(begin, int) or begin < 0 or step < 1:
            raise cx.fail(f"slice [{start}:{end}:{step}] of an axis of size {size} is not supported") from None
        idx = cx.emit("arange", [], {"size": cx.dims_attr([out]), "start": begin, "step": int(step)},
                      name=cx.node.name + ".index")
        return cx.emit("gather", [x, idx], {"axis": axis})
    s = 0 if s is None else s
    if s == 0 and e is None and step == 1:
        return x
    return cx.emit("slice", [x], {"axis": axis, "start": s, "end": e, "step": int(step)})


@register("aten.select.int")
def _select(cx: Cx, x: Value, dim: int, index: int, *, name: str | None = None) -> Value:
    axis = int(dim) % x.type.rank
    index = int(index)
    end = index + 1 if index != -1 else None
    name = name or cx.node.name
    part = cx.emit("slice", [x], {"axis": axis, "start": index, "end": end}, name=name + ".slice")
    return cx.emit("squeeze", [part], {"axis": axis}, name=name)


@register("aten.unbind.int")
def _unbind(cx: Cx, x: Value, dim: int = 0) -> tuple[Value, ...]:
    axis = int(dim) % x.type.rank
    n = x.type.shape[axis]
    if not isinstance(n, int):
        raise cx.fail(f"unbind along the symbolic axis {axis} ({n}) has no fixed number of results")
    return tuple(_select(cx, x, axis, i, name=f"{cx.node.name}.{i}") for i in range(n))


@register("aten.gather.default")
def _gather(cx: Cx, x: Value, dim: int, index: Value, *, sparse_grad: bool = False) -> Value:
    return cx.emit("take_along_axis", [x, index], {"axis": int(dim) % x.type.rank})


@register("aten.index_select.default")
def _index_select(cx: Cx, x: Value, dim: int, index: Value) -> Value:
    return cx.emit("gather", [x, index], {"axis": int(dim) % x.type.rank})


@register("aten.index.Tensor")
def _index(cx: Cx, x: Value, indices: Sequence[Value | None]) -> Value:
    axes = [i for i, ix in enumerate(indices) if ix is not None]
    if not axes:
        return x
    ixs = [indices[a] for a in axes]
    if any(ix.type.dtype == boolean for ix in ixs):  # type: ignore[union-attr]
        raise cx.fail("boolean mask indexing has a data-dependent shape; use torch.where instead")
    return cx.emit("index", [x, *ixs], {"axes": axes})  # type: ignore[list-item]


@register("aten.index_copy.default")
def _index_copy(cx: Cx, x: Value, dim: int, index: Value, source: Value) -> Value:
    return cx.emit("index_copy", [x, index, cx.cast(source, x.type.dtype)], {"axis": int(dim) % x.type.rank})


# -- creation --------------------------------------------------------------------------------------------------
@register("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(cx: Cx, *args: Any, **kwargs: Any) -> Value:
    nums = [a for a in args if isinstance(a, (int, float, SymDim)) and not isinstance(a, bool)]
    start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2 else 1)
    out = cx.meta_type()
    if not all(isinstance(v, int) for v in (start, step)):
        raise cx.fail(f"arange with start {start} and step {step}: only integer start and step are supported")
    return cx.emit("arange", [], {"size": cx.dims_attr(out.shape), "start": start, "step": step,
                                  "dtype": out.dtype.name})


def _filled(cx: Cx, value: Any) -> Value:
    out = cx.meta_type()
    c = cx.scalar(value, out.dtype)
    if out.rank == 0:
        return c
    return cx.emit("expand", [c], {"shape": cx.dims_attr(out.shape)})


@register("aten.new_ones.default", "aten.ones.default", "aten.ones_like.default")
def _ones(cx: Cx, *args: Any, **kwargs: Any) -> Value:
    return _filled(cx, True if cx.meta_type().dtype == boolean else 1)


@register("aten.new_zeros.default", "aten.zeros.default", "aten.zeros_like.default")
def _zeros(cx: Cx, *args: Any, **kwargs: Any) -> Value:
    return _filled(cx, False if cx.meta_type().dtype == boolean else 0)


@register("aten.full.default", "aten.new_full.default")
def _full(cx: Cx, *args: Any, **kwargs: Any) -> Value:
    value = args[-1] if "new_full" not in str(cx.node.target) else args[2]
    value = kwargs.get("fill_value", value)
    if isinstance(value, float) and math.isinf(value) is False and cx.meta_type().dtype.is_integer:
        value = int(value)
    return _filled(cx, value)


@register("aten.full_like.default")
def _full_like(cx: Cx, x: Value, fill_value: Any, **kwargs: Any) -> Value:
    return _filled(cx, fill_value)


@register("aten.scalar_tensor.default")
def _scalar_tensor(cx: Cx, value: Any, **kwargs: Any) -> Value:
    return cx.scalar(value, cx.meta_type().dtype)


# -- multi-result ----------------------------------------------------------------------------------------------
@register("operator.getitem")
def _getitem(cx: Cx, seq: Any, index: int) -> Any:
    return seq[index]

