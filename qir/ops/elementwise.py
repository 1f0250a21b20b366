"""Elementwise ops: arithmetic, comparisons, bool logic, unary math, ``cast`` and ``where``.

Binary ops broadcast the numpy way (symbolic sizes broadcast only with 1 or
themselves) and need operands of one dtype. Floats follow the compute rule of
:mod:`qir.ops.common` (f16/bf16 computed in f32, cast to the result dtype).
Integer arithmetic is exact: ``div`` truncates toward zero (as C and ONNX
do), division by zero and results that do not fit the dtype raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.special

from qir.dtypes import boolean
from qir.errors import QirError
from qir.ops.common import (
    as_float,
    as_int,
    declared_one,
    define,
    fail,
    float_domain,
    kind_of,
    need_bool,
    need_float,
    need_numeric,
    plain,
    same_dtype,
    to_result,
)
from qir.ops.registry import Attr
from qir.shapes import Shape, broadcast
from qir.types import TensorType

Array = np.ndarray


def broadcast_all(op: str, types: Sequence[TensorType]) -> Shape:
    """The broadcast shape of several operand types (raises naming ``op``)."""
    shape: Shape = types[0].shape
    try:
        for t in types[1:]:
            shape = broadcast(shape, t.shape)
    except QirError as exc:
        fail(op, f"operands {', '.join(str(t) for t in types)} do not broadcast ({exc})")
    return shape


# -- binary arithmetic ---------------------------------------------------------------------------------------
def _int_div(a: Array, b: Array) -> Array:
    if np.any(b == 0):
        raise QirError("integer division by zero")
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def _int_pow(a: Array, b: Array) -> Array:
    if np.any(b < 0):
        raise QirError("an integer raised to a negative power is not an integer; cast to a float first")
    return np.power(a, b)


_ARITH: dict[str, tuple[Callable[[Array, Array], Array], Callable[[Array, Array], Array], str]] = {
    "add": (np.add, np.add, "a + b"),
    "sub": (np.subtract, np.subtract, "a - b"),
    "mul": (np.multiply, np.multiply, "a * b"),
    "div": (np.divide, _int_div, "a / b (integers: truncated toward zero)"),
    "pow": (np.power, _int_pow, "a ** b"),
    "maximum": (np.maximum, np.maximum, "elementwise max (NaN wins)"),
    "minimum": (np.minimum, np.minimum, "elementwise min (NaN wins)"),
}


def _make_arith(name: str, ffn: Callable[[Array, Array], Array], ifn: Callable[[Array, Array], Array]
                ) -> tuple[Callable[..., list[TensorType]], Callable[..., list[Array]]]:
    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        need_numeric(name, "a", types[0])
        need_numeric(name, "b", types[1])
        dt = same_dtype(name, types, ("a", "b"))
        return [TensorType(dt, broadcast_all(name, types))]

    def compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
        a, b = args
        if rt[0].dtype.is_float:
            cdt = float_domain(a, b)
            with np.errstate(all="ignore"):  # inf and NaN are results here, as in torch
                y = ffn(as_float(a, cdt), as_float(b, cdt))
        else:
            y = ifn(as_int(a), as_int(b))
        return [to_result(name, np.asarray(y), rt[0])]

    return infer, compute


for _name, (_f, _i, _doc) in _ARITH.items():
    _inf, _comp = _make_arith(_name, _f, _i)
    define(_name, ("a", "b"), (), _inf, _comp, f"{_doc}, numpy broadcasting; operands share a dtype", "elementwise")


# -- comparisons and logic -------------------------------------------------------------------------------------
_COMPARE: dict[str, tuple[Callable[[Array, Array], Array], str]] = {
    "eq": (np.equal, "=="), "ne": (np.not_equal, "!="), "lt": (np.less, "<"),
    "le": (np.less_equal, "<="), "gt": (np.greater, ">"), "ge": (np.greater_equal, ">="),
}


def _make_compare(name: str, fn: Callable[[Array, Array], Array]
                  ) -> tuple[Callable[..., list[TensorType]], Callable[..., list[Array]]]:
    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        plain(name, "a", types[0])
        plain(name, "b", types[1])
        same_dtype(name, types, ("a", "b"))
        return [TensorType(boolean, broadcast_all(name, types))]

    def compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
        a, b = (np.asarray(x) for x in args)
        kind = kind_of(a)
        if kind == "bool":
            return [fn(a, b)]
        if kind in ("int", "uint"):
            return [fn(as_int(a), as_int(b))]
        cdt = float_domain(a, b)
        return [fn(as_float(a, cdt), as_float(b, cdt))]

    return infer, compute


for _name, (_fn, _sym) in _COMPARE.items():
    _inf, _comp = _make_compare(_name, _fn)
    define(_name, ("a", "b"), (), _inf, _comp, f"a {_sym} b -> bool, numpy broadcasting", "elementwise")


def _make_logic(name: str, fn: Callable[..., Array], arity: int
                ) -> tuple[Callable[..., list[TensorType]], Callable[..., list[Array]]]:
    roles = ("a", "b")[:arity]

    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        for t, role in zip(types, roles):
            need_bool(name, role, t)
        return [TensorType(boolean, broadcast_all(name, types))]

    def compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
        return [np.asarray(fn(*(np.asarray(a) for a in args)))]

    return infer, compute


for _name, _fn, _arity in (("and", np.logical_and, 2), ("or", np.logical_or, 2), ("not", np.logical_not, 1)):
    _inf, _comp = _make_logic(_name, _fn, _arity)
    define(_name, ("a", "b")[:_arity], (), _inf, _comp, f"bool logical {_name}", "elementwise")


# -- unary math ------------------------------------------------------------------------------------------------
_SQRT2 = math.sqrt(2.0)
_TANH_C = math.sqrt(2.0 / math.pi)


def _gelu(x: Array, attrs: Mapping[str, Any]) -> Array:
    one = x.dtype.type(1.0)
    half = x.dtype.type(0.5)
    if attrs["approximate"] == "tanh":
        return half * x * (one + np.tanh(x.dtype.type(_TANH_C) * (x + x.dtype.type(0.044715) * x * x * x)))
    return half * x * (one + scipy.special.erf(x / x.dtype.type(_SQRT2)))


_UNARY: dict[str, tuple[Callable[[Array, Mapping[str, Any]], Array], bool, str]] = {
    # name: (function on a float (or, where allowed, int64) array, integers allowed, doc)
    "neg": (lambda x, a: -x, True, "-x"),
    "abs": (lambda x, a: np.abs(x), True, "|x|"),
    "relu": (lambda x, a: np.maximum(x, x.dtype.type(0)), True, "max(x, 0)"),
    "sqrt": (lambda x, a: np.sqrt(x), False, "square root"),
    "rsqrt": (lambda x, a: x.dtype.type(1) / np.sqrt(x), False, "1 / sqrt(x)"),
    "exp": (lambda x, a: np.exp(x), False, "e ** x"),
    "log": (lambda x, a: np.log(x), False, "natural logarithm"),
    "tanh": (lambda x, a: np.tanh(x), False, "hyperbolic tangent"),
    "erf": (lambda x, a: scipy.special.erf(x), False, "error function (scipy.special.erf)"),
    "gelu": (_gelu, False, "GELU: x * Phi(x), or its tanh approximation (approximate='tanh')"),
    "silu": (lambda x, a: x * scipy.special.expit(x), False, "x * sigmoid(x)"),
    "sigmoid": (lambda x, a: scipy.special.expit(x), False, "1 / (1 + exp(-x))"),
    "sin": (lambda x, a: np.sin(x), False, "sine"),
    "cos": (lambda x, a: np.cos(x), False, "cosine"),
    "reciprocal": (lambda x, a: x.dtype.type(1) / x, False, "1 / x"),
}


def _make_unary(name: str, fn: Callable[[Array, Mapping[str, Any]], Array], ints: bool
                ) -> tuple[Callable[..., list[TensorType]], Callable[..., list[Array]]]:
    def infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
        (x,) = types
        if ints:
            need_numeric(name, "x", x)
        else:
            need_float(name, "x", x)
        if name == "gelu" and attrs["approximate"] not in ("none", "tanh"):
            fail(name, f"approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")
        return [x]

    def compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
        (x,) = args
        if rt[0].dtype.is_float:
            with np.errstate(all="ignore"):  # inf and NaN are results here, as in torch
                y = fn(as_float(x, float_domain(x)), attrs)
        else:
            y = fn(as_int(x), attrs)
        return [to_result(name, np.asarray(y), rt[0])]

    return infer, compute


for _name, (_fn, _ints, _doc) in _UNARY.items():
    _inf, _comp = _make_unary(_name, _fn, _ints)
    _attrs = (Attr("approximate", "str", "none", "'none' (exact, erf) or 'tanh'"),) if _name == "gelu" else ()
    define(_name, ("x",), _attrs, _inf, _comp, _doc + (" (float or integer)" if _ints else " (float)"), "elementwise")


# -- cast and where --------------------------------------------------------------------------------------------
def _cast_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    (x,) = types
    plain("cast", "x", x)
    d = declared_one("cast", declared)
    if d is None:
        fail("cast", "the result dtype is a choice: give result_types, e.g. [TensorType.of('f16', shape)]")
    if d.is_quantized:
        fail("cast", f"cannot cast to the quantized type {d}; use quantize")
    if d.shape != x.shape:
        fail("cast", f"a cast keeps the shape {x}, but {d} is declared")
    return [d]


def _cast_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
    x = np.asarray(args[0])
    t = rt[0]
    if t.dtype.kind == "bool":
        # f64 keeps every int64 nonzero nonzero; NaN counts as true, as in torch
        return [x.astype(np.float64) != 0] if kind_of(x) != "bool" else [x]
    if t.dtype.is_integer and kind_of(x) == "float":
        xf = x.astype(np.float64)
        if not np.all(np.isfinite(xf)):
            raise QirError(f"cannot cast NaN or Inf to {t.dtype}")
        return [to_result("cast", np.trunc(xf).astype(np.int64), t)]
    if t.dtype.is_integer:
        return [to_result("cast", as_int(x), t)]
    if kind_of(x) == "bool":
        x = x.astype(np.int64)
    return [x.astype(t.dtype.numpy)]


define("cast", ("x",), (), _cast_infer, _cast_compute,
       "convert to the declared dtype (float->int truncates toward zero; out of range raises)", "elementwise")


def _where_infer(types: Sequence[TensorType], attrs: Mapping[str, Any], declared: Any) -> list[TensorType]:
    cond, a, b = types
    need_bool("where", "cond", cond)
    plain("where", "a", a)
    plain("where", "b", b)
    dt = same_dtype("where", (a, b), ("a", "b"))
    return [TensorType(dt, broadcast_all("where", types))]


def _where_compute(ctx: Any, args: Sequence[Any], attrs: Mapping[str, Any], rt: Sequence[TensorType]) -> list[Array]:
    cond, a, b = (np.asarray(x) for x in args)
    return [np.where(cond, a, b).astype(rt[0].dtype.numpy, copy=False)]


define("where", ("cond", "a", "b"), (), _where_infer, _where_compute, "cond ? a : b, numpy broadcasting",
       "elementwise")
