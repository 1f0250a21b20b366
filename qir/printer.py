"""The canonical text printer of qir modules (the ``.qir`` format).

The text is the contract between every part of qir: ``parse(print_module(m))``
rebuilds ``m`` and ``print_module(parse(text)) == text`` byte for byte for
canonical text. Layout rules (see ``docs/text-format.md``):

* ``module @NAME``, then a blank line and one ``const`` line per constant
  (module order), then for each function a blank line, its ``func`` header, one
  op per line indented two spaces, ``  return ...`` and ``}``; a final newline.
* Attributes print in the op definition's declaration order; attributes equal
  to their declared default are left out so canonical text stays short.
* Floats print as the shortest text that parses back to the same value in the
  element's dtype; big constants print as ``blob`` (their data lives in the
  ``.safetensors`` file beside the text), small ones inline as ``dense(...)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from qir.dtypes import DType
from qir.graph import Constant, Function, Module, Op
from qir.ops.registry import OpDef, get_op, has_op
from qir.quantspec import format_float
from qir.types import format_type

__all__ = [
    "INLINE_LIMIT", "format_attr_value", "format_attrs", "format_constant", "format_dense", "format_element",
    "format_function", "format_op", "is_inline", "print_module",
]

INLINE_LIMIT = 16
"""Constants with at most this many elements (and data, and a static shape) print inline as ``dense(...)``."""


# -- attributes -----------------------------------------------------------------------------------------------------
def format_attr_value(value: Any) -> str:
    """Text of one attribute value: ``-3``, ``1e-05``, ``true``, ``none``, ``"str"``, ``[1, 2, "seq"]``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr_value(v) for v in value) + "]"
    if isinstance(value, np.generic):
        return format_attr_value(value.item())
    # Op attrs are frozen by the graph to the kinds above; anything else still prints as readable text.
    return json.dumps(str(value))


def _same_attr(a: Any, b: Any) -> bool:
    """Strict equality for default elision: ``True`` is not ``1``, ``-0.0`` is not ``0.0``, nan equals nan."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return fa == fb and math.copysign(1.0, fa) == math.copysign(1.0, fb)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
            return False
        return all(_same_attr(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def format_attrs(opdef: OpDef | None, attrs: Mapping[str, Any]) -> str:
    """``{k=v, k2=v2}`` in the op's declaration order, defaults left out; ``""`` when nothing is left.

    Without an ``OpDef`` (an unregistered op) every attribute prints, sorted by name.
    Attributes the definition does not declare print after the declared ones, so a
    broken op still shows everything it carries.
    """
    items: list[tuple[str, Any]] = []
    if opdef is None:
        items = sorted(attrs.items())
    else:
        declared = set()
        for a in opdef.attrs:
            declared.add(a.name)
            if a.name not in attrs:
                continue
            value = attrs[a.name]
            if not a.required and _same_attr(value, a.default):
                continue
            items.append((a.name, value))
        items += [(k, v) for k, v in attrs.items() if k not in declared]
    if not items:
        return ""
    return "{" + ", ".join(f"{k}={format_attr_value(v)}" for k, v in items) + "}"


# -- ops and functions ----------------------------------------------------------------------------------------------
def format_op(op: Op) -> str:
    """One op line without indentation: ``%y = softmax %x {axis=-1} : f32[1,seq,4] loc("model.py:12")``."""
    opdef = get_op(op.opcode) if has_op(op.opcode) else None
    text = op.opcode
    if op.results:
        text = ", ".join(r.ref for r in op.results) + " = " + text
    if op.operands:
        text += " " + ", ".join(v.ref for v in op.operands)
    attrs = format_attrs(opdef, op.attrs)
    if attrs:
        text += " " + attrs
    text += " :"
    if op.results:
        text += " " + ", ".join(format_type(r.type) for r in op.results)
    if op.loc is not None:
        text += f" loc({json.dumps(op.loc)})"
    return text


def format_function(func: Function) -> str:
    """The function's lines (header, ops, ``return``, ``}``) joined by newlines, without a final newline."""
    params = ", ".join(f"{v.ref}: {format_type(v.type)}" for v in func.inputs)
    results = ", ".join(format_type(v.type) for v in func.outputs)
    lines = [f"func @{func.name}({params}) -> ({results}) {{"]
    lines += ["  " + format_op(op) for op in func.ops]
    ret = ", ".join(v.ref for v in func.outputs)
    lines.append(f"  return {ret}" if ret else "  return")
    lines.append("}")
    return "\n".join(lines)


# -- constants ------------------------------------------------------------------------------------------------------
def _float_marked(text: str) -> str:
    # A float element must look like a float so that nobody mistakes it for an int.
    return text if any(c in text for c in ".en") else text + ".0"


def _round_trips(text: str, value: np.generic, npdtype: np.dtype) -> bool:
    back = np.array([float(text)], dtype=np.float64).astype(npdtype)[0]
    if np.isnan(value):
        return bool(np.isnan(back))
    return bool(back == value) and math.copysign(1.0, float(back)) == math.copysign(1.0, float(value))


def _shortest_float(value: np.generic, npdtype: np.dtype, first_try: str | None) -> str:
    """Shortest text that parses (as the parser does: via f64, then cast) back to ``value`` in ``npdtype``.

    ``first_try`` is numpy's own shortest text where it has one (f32, f16); it is checked, never trusted.
    """
    f = float(value)
    if math.isnan(f) or math.isinf(f):
        return format_float(f)
    if first_try is not None and _round_trips(first_try, value, npdtype):
        return _float_marked(first_try)
    for digits in range(1, 18):
        text = f"{f:.{digits}g}"
        if _round_trips(text, value, npdtype):
            return _float_marked(text)
    return repr(f)  # pragma: no cover - 17 significant digits always round-trip an f64


def _element_formatter(dt: DType) -> Callable[[Any], str]:
    name = dt.name
    if name == "f64":
        return lambda v: format_float(float(v))
    if name == "f32":
        npdt = np.dtype(np.float32)
        return lambda v: _shortest_float(v, npdt, format_float(float(v), f32=True))
    if name == "f16":
        npdt = np.dtype(np.float16)
        return lambda v: _shortest_float(v, npdt, str(np.float16(v)))
    if name == "bf16":
        npdt = np.dtype(ml_dtypes.bfloat16)
        # ml_dtypes prints bf16 with 6 significant digits, which is not the shortest text; search instead.
        return lambda v: _shortest_float(v, npdt, None)
    if name == "bool":
        return lambda v: "true" if bool(v) else "false"
    return lambda v: str(int(v))


def format_element(dt: DType, value: Any) -> str:
    """Text of one ``dense`` element of dtype ``dt`` (shortest round-tripping text for floats)."""
    arr = np.asarray([value]).astype(dt.numpy)
    return _element_formatter(dt)(arr[0])


def format_dense(dt: DType, data: Any) -> str:
    """``dense(v1, v2, ...)``: the elements of ``data`` in row-major order, formatted for dtype ``dt``."""
    arr = np.asarray(data)
    if arr.dtype != dt.numpy:
        with np.errstate(all="ignore"):
            arr = arr.astype(dt.numpy)
    fmt = _element_formatter(dt)
    # NaN and overflow in the dtype casts are the values being printed, not mistakes worth a warning.
    with np.errstate(all="ignore"):
        return "dense(" + ", ".join(fmt(v) for v in arr.reshape(-1)) + ")"


def _data_size(data: Any) -> int | None:
    shape = getattr(data, "shape", None)
    if shape is None:
        return None
    try:
        return int(np.prod([int(s) for s in shape], dtype=np.int64))
    except (TypeError, ValueError):
        return None


def is_inline(const: Constant) -> bool:
    """True when ``const`` prints as ``dense(...)``: it has data, a static shape and <= INLINE_LIMIT elements.

    The serializer writes every other constant to the ``.safetensors`` file.
    """
    if const.data is None or not const.type.is_static:
        return False
    n = const.type.numel()
    return n <= INLINE_LIMIT and _data_size(const.data) == n


def format_constant(const: Constant) -> str:
    """``const @w : i4[4,64] q(axis=1, group=32, scale=@w.scale) = blob`` (or ``= dense(...)`` when inline)."""
    init = format_dense(const.type.dtype, const.numpy()) if is_inline(const) else "blob"
    return f"const {const.ref} : {format_type(const.type)} = {init}"


# -- modules --------------------------------------------------------------------------------------------------------
def print_module(module: Module) -> str:
    """The canonical text of ``module`` (ends with a single newline)."""
    lines = [f"module @{module.name}"]
    if module.constants:
        lines.append("")
        lines += [format_constant(c) for c in module.constants.values()]
    for func in module.functions.values():
        lines.append("")
        lines.append(format_function(func))
    return "\n".join(lines) + "\n"
