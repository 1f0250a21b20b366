"""Import an ONNX model (a ``.onnx`` file or an ``onnx.ModelProto``) into a qir module.

``import_onnx(path_or_model, name=None)`` maps each ONNX node of the main graph to qir ops:

* Initializers become named module constants (``onnx.numpy_helper.to_array``); a ``MatMul`` by a constant 2-D
  weight becomes ``linear`` with the weight stored transposed once (``[out, in]``), and a following ``Add`` of a
  1-D constant becomes its bias. ``Gather`` of a constant 2-D table along axis 0 becomes ``embedding``.
* Graph inputs keep their symbolic ``dim_param`` sizes (``batch``, ``seq``) as qir symbolic dimensions.
* Shape computations (``Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape`` and friends) are evaluated at
  import time on the known, possibly symbolic, sizes: values that depend only on shapes and constants are folded
  (numpy arrays, of Python ints and :class:`~qir.shapes.SymDim` where a size is symbolic) and never become ops.
* Value names become qir names (sanitized); each op's ``loc`` is the ONNX node's name.

Both ``torch.onnx.export`` exporters are supported for the standard ops they produce; the default dynamo
exporter (``dynamo=True``, torch >= 2.9) gives the cleaner graphs (``Gelu``, ``LayerNormalization`` kept whole,
fewer ``Constant`` nodes) and is the one the tests use for real models.

An ONNX op the importer does not know raises one :class:`ONNXImportError` that lists every unsupported op type
with its count and the first node names, before anything is built.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Function, Module, Value
from qir.limits import MAX_FOLD_ELEMENTS, shape_problem
from qir.shapes import Dim, SymDim, add, broadcast, dim, mul, sub
from qir.types import TensorType


class ONNXImportError(QirError):
    """An ONNX model qir cannot import (unsupported ops, unreadable file, a shape qir cannot follow)."""


Static = np.ndarray  # a value known at import time (object dtype when it holds symbolic sizes)
Entry = Value | np.ndarray

_ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 5: "i16", 6: "i32", 7: "i64", 9: "bool", 10: "f16", 11: "f64",
                16: "bf16"}
_GENERATED = re.compile(r"val_\d+|onnx__\w+|const\..*")  # names the exporters make up for weights
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")


def _sanitize(name: str, fallback: str = "v") -> str:
    text = _NAME_BAD.sub("_", name).lstrip(".-")
    return text or fallback


def _sym_name(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return cleaned if re.match(r"[A-Za-z_]", cleaned) else "d_" + cleaned


def _qdtype(onnx_type: int, where: str) -> str:
    try:
        return _ONNX_DTYPES[onnx_type]
    except KeyError:
        raise ONNXImportError(f"{where}: ONNX element type {onnx_type} is not supported (supported: "
                              f"{', '.join(_ONNX_DTYPES.values())})") from None


# -- folding on possibly symbolic sizes ------------------------------------------------------------------------
def _is_sym(a: np.ndarray) -> bool:
    return a.dtype == object


def _compact(a: Any) -> np.ndarray:
    """Object arrays whose entries are all ints become int64 arrays."""
    a = np.asarray(a, dtype=object) if isinstance(a, SymDim) else np.asarray(a)
    if _is_sym(a) and all(isinstance(v, (int, np.integer)) for v in a.flat):
        return a.astype(np.int64)
    return a


def _as_dim(v: Any) -> Dim:
    return v if isinstance(v, SymDim) else int(v)


def _dim_div(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return int(a / b) if b else 0
    if isinstance(a, SymDim) and isinstance(b, int) and b and all(c % b == 0 for _, c in a.terms) and a.const % b == 0:
        return dim(SymDim(tuple((n, c // b) for n, c in a.terms), a.const // b))
    raise ONNXImportError(f"cannot divide the size {a} by {b} at import time")


def _dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(b, int):
        return mul(a, b)
    if isinstance(a, int):
        return mul(b, a)
    raise ONNXImportError(f"the product of two symbolic sizes {a} * {b} is not a linear size")


_DIM_OPS: dict[str, Callable[[Dim, Dim], Any]] = {
    "Add": add, "Sub": sub, "Mul": _dim_mul, "Div": _dim_div,
    "Equal": lambda a, b: a == b,
    "Max": lambda a, b: a if a == b else (max(a, b) if isinstance(a, int) and isinstance(b, int) else _no(a, b)),
    "Min": lambda a, b: a if a == b else (min(a, b) if isinstance(a, int) and isinstance(b, int) else _no(a, b)),
}


def _no(a: Dim, b: Dim) -> Dim:
    raise ONNXImportError(f"cannot compare the sizes {a} and {b} at import time")


def _sym_binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fn = _DIM_OPS.get(op)
    if fn is None:
        raise ONNXImportError(f"{op} on symbolic sizes cannot be folded")
    ufunc = np.frompyfunc(lambda x, y: fn(_as_dim(x), _as_dim(y)), 2, 1)
    out = np.asarray(ufunc(a.astype(object), b.astype(object)), dtype=object)
    if op == "Equal":
        return out.astype(bool)
    return _compact(out)


_NP_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Equal": np.equal, "Less": np.less,
    "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal, "And": np.logical_and,
    "Or": np.logical_or, "Max": np.maximum, "Min": np.minimum,
}
_NP_UNARY: dict[str, Callable[[Any], Any]] = {
    "Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Exp": np.exp, "Log": np.log, "Abs": np.abs,
    "Not": np.logical_not, "Cos": np.cos, "Sin": np.sin, "Tanh": np.tanh, "IsNaN": np.isnan,
}

# ONNX op -> qir op, for ops that map one to one.
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "eq", "Less": "lt",
           "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge", "And": "and", "Or": "or", "Max": "maximum",
           "Min": "minimum"}
_UNARY = {"Neg": "neg", "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Exp": "exp", "Log": "log", "Abs": "abs",
          "Not": "not", "Cos": "cos", "Sin": "sin", "Tanh": "tanh", "Erf": "erf", "Sigmoid": "sigmoid",
          "Relu": "relu"}
_OTHER = {"Constant", "Identity", "Shape", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Slice",
          "Gather", "Split", "Where", "Expand", "ConstantOfShape", "Range", "MatMul", "Gemm", "Softmax",
          "LayerNormalization", "Gelu", "ReduceMean", "ReduceSum", "ReduceMax", "Trilu", "GatherElements",
          "GatherND", "Size", "Dropout", "IsNaN", "CumSum"}
SUPPORTED_OPS: frozenset[str] = frozenset(_BINARY) | frozenset(_UNARY) | frozenset(_OTHER)


def _attr_dims_text(values: Sequence[Any]) -> list[int | str]:
    return [int(v) if not isinstance(v, SymDim) else str(v) for v in values]


class _Importer:
    def __init__(self, model: Any, name: str) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.graph = model.graph
        self.module = Module(name)
        self.func: Function = self.module.add_function("main")
        self.env: dict[str, Entry] = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.consumers: Counter[str] = Counter(i for n in self.graph.node for i in n.input if i)
        for o in self.graph.output:
            self.consumers[o.name] += 1
        self._materialized: dict[int, Value] = {}
        self._keep: list[np.ndarray] = []  # arrays whose id keys _materialized stay alive
        self.node: Any = None
        self._names_of: dict[int, str] = {}
        self._transposed: dict[int, np.ndarray] = {}
        self._scalars: dict[int, np.ndarray] = {}  # id(qir value) -> the ONNX name it was first stored under

    # -- helpers ----------------------------------------------------------------------------------------------
    def fail(self, message: str) -> ONNXImportError:
        n = self.node
        where = f"node {n.name or '?'} ({n.op_type})" if n is not None else "graph"
        return ONNXImportError(f"{where}: {message}")

    def get(self, i: int) -> Entry | None:
        inputs = self.node.input
        if i >= len(inputs) or not inputs[i]:
            return None
        try:
            return self.env[inputs[i]]
        except KeyError:
            raise self.fail(f"input {inputs[i]!r} is not defined") from None

    def static(self, i: int, what: str) -> np.ndarray | None:
        v = self.get(i)
        if v is None:
            return None
        if not isinstance(v, np.ndarray):
            raise self.fail(f"{what} (input {i}) must be known at import time (a constant or a shape computation), "
                            "but it is computed at run time")
        return v

    def ints(self, i: int, what: str) -> list[Dim] | None:
        a = self.static(i, what)
        return None if a is None else [_as_dim(v) for v in np.asarray(a).reshape(-1)]

    def attrs(self) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    def value(self, e: Entry, like: Value | None = None) -> Value:
        """A qir value for ``e`` (static arrays become constants, made once per array)."""
        if isinstance(e, Value):
            return e
        if _is_sym(e):
            raise self.fail(f"a value holding symbolic sizes {list(e.reshape(-1))} is used as run-time data; "
                            "qir cannot compute it")
        key = id(e)
        if key in self._materialized:
            return self._materialized[key]
        arr = e if e.flags.c_contiguous else np.ascontiguousarray(e)  # (ascontiguousarray makes 0-d arrays 1-d)
        if arr.dtype == np.float64 and like is not None and like.type.dtype.name == "f32":
            arr = arr.astype(np.float32)
        base = self._const_name.get(key) or (f"const.{self.node.name or self.node.op_type}" if self.node else "const")
        name = _sanitize(base, "const")
        i, cand = 1, name
        while cand in self.module.constants:
            cand = f"{name}.{i}"
            i += 1
        c = self.module.add_constant(cand, arr)
        self._materialized[key] = c
        self._keep.append(e)
        return c

    _const_name: dict[int, str]

    def emit(self, opcode: str, operands: Sequence[Entry], attrs: dict[str, Any] | None = None, *,
             result_types: Sequence[TensorType] | None = None, out: int | None = 0, name: str | None = None
             ) -> Value:
        vals = [self.value(o) for o in operands]
        if name is None:
            name = self.node.output[out] if out is not None and out < len(self.node.output) else opcode
        try:
            op = self.func.add_op(opcode, vals, attrs, result_types=result_types, names=[_sanitize(name, opcode)],
                                  loc=self.node.name or self.node.op_type)
        except QirError as exc:
            raise self.fail(f"cannot build qir {opcode}: {exc}") from None
        return op.result

    def shape_of(self, e: Entry) -> tuple[Dim, ...]:
        return tuple(e.type.shape) if isinstance(e, Value) else tuple(e.shape)

    def rank_of(self, e: Entry) -> int:
        return len(self.shape_of(e))

    # -- main loop ----------------------------------------------------------------------------------------------
    def run(self) -> Module:
        from onnx import numpy_helper

        self._const_name = {}
        self.check_supported()
        for init in self.graph.initializer:
            arr = numpy_helper.to_array(init)
            self.env[init.name] = arr
            self._const_name[id(arr)] = init.name
        sym_count = 0
        for inp in self.graph.input:
            if inp.name in self.env:
                continue
            tt = inp.type.tensor_type
            shape: list[Dim] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.dim_param:
                    shape.append(dim(_sym_name(d.dim_param)))
                else:
                    shape.append(dim(f"d{sym_count}"))
                    sym_count += 1
            t = TensorType.of(_qdtype(tt.elem_type, f"input {inp.name}"), shape)
            self.env[inp.name] = self.func.add_input(_sanitize(inp.name, "input"), t)
        for node in self.graph.node:
            self.node = node
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is not None:
                results = handler()
            elif node.op_type in _BINARY:
                results = self.binary()
            else:
                results = self.unary()
            if not isinstance(results, (list, tuple)):
                results = [results]
            for oname, r in zip(node.output, results):
                if oname:
                    if isinstance(r, Value):
                        self._names_of.setdefault(id(r), oname)
                    self.env[oname] = r if isinstance(r, Value) or (isinstance(r, np.ndarray) and r.dtype != object) \
                        else _compact(r)
        self.node = None
        outs = []
        for o in self.graph.output:
            e = self.env[o.name]
            outs.append(self.value(e))
        self.func.set_outputs(outs)
        from qir.frontend.fusion import cleanup

        fuse_attention(self.func)
        cleanup(self.func)  # RMSNorm fusion, no-op casts, dead ops
        return self.module

    def check_supported(self) -> None:
        bad: dict[str, list[str]] = {}
        for n in self.graph.node:
            if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
                key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                bad.setdefault(key, []).append(n.name or "?")
        if bad:
            lines = [f"  {op}: {len(names)} node{'s' if len(names) != 1 else ''} (first: {', '.join(names[:3])})"
                     for op, names in sorted(bad.items())]
            raise ONNXImportError(f"{self.graph.name or 'the model'}: {len(bad)} unsupported ONNX op type"
                                  f"{'s' if len(bad) != 1 else ''}:\n" + "\n".join(lines)
                                  + f"\nsupported ops: {', '.join(sorted(SUPPORTED_OPS))}")

    # -- elementwise --------------------------------------------------------------------------------------------
    def binary(self) -> Entry:
        op = self.node.op_type
        a, b = self.get(0), self.get(1)
        if op in ("Max", "Min") and len(self.node.input) != 2:
            return self.variadic(op)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            if _is_sym(a) or _is_sym(b):
                return _sym_binary(op, a, b)
            if op == "Div":
                return (a // b).astype(a.dtype) if a.dtype.kind in "iu" else np.asarray(a / b, dtype=a.dtype)
            return np.asarray(_NP_BINARY[op](a, b))
        like = a if isinstance(a, Value) else b
        assert isinstance(like, Value)
        a, b = self._scalar(a, like), self._scalar(b, like)
        return self.emit(_BINARY[op], [self.value(a, like), self.value(b, like)])

    def _scalar(self, e: Entry, like: Value) -> Entry:
        """A one-element constant against a tensor of at least its rank broadcasts like a scalar: make it one
        (``f32[]``), so patterns (RMSNorm's eps and exponent) and printing see a scalar."""
        if not isinstance(e, np.ndarray) or e.size != 1 or e.ndim == 0 or e.ndim > like.type.rank or _is_sym(e):
            return e
        s = self._scalars.get(id(e))
        if s is None:
            s = e.reshape(())
            self._scalars[id(e)] = s
            if id(e) in self._const_name:
                self._const_name[id(s)] = self._const_name[id(e)]
        return s

    def op_Mul(self) -> Entry:
        a, b = self.get(0), self.get(1)
        for x, sg in ((a, b), (b, a)):
            p = sg.producer if isinstance(sg, Value) else None
            if (p is not None and p.opcode == "sigmoid" and p.operands[0] is x and not sg.uses
                    and self.consumers[self._onnx_name(sg)] == 1 and sg not in self.func.outputs):
                self.func.erase_op(p)
                return self.emit("silu", [x])
        return self.binary()

    def variadic(self, op: str) -> Entry:
        acc = self.get(0)
        for i in range(1, len(self.node.input)):
            b = self.get(i)
            acc = self.emit(_BINARY[op], [self.value(acc), self.value(b, acc if isinstance(acc, Value) else None)],
                            out=0 if i == len(self.node.input) - 1 else None, name=None)
        return acc

    def unary(self) -> Entry:
        op = self.node.op_type
        x = self.get(0)
        if isinstance(x, np.ndarray) and op in _NP_UNARY and not _is_sym(x):
            return np.asarray(_NP_UNARY[op](x)).astype(x.dtype if op != "IsNaN" else bool)
        return self.emit(_UNARY[op], [x])

    def op_Reciprocal(self) -> Entry:
        x = self.get(0)
        p = x.producer if isinstance(x, Value) else None
        if p is not None and p.opcode == "sqrt" and self.consumers[self._onnx_name(x)] == 1 and not x.uses \
                and x not in self.func.outputs:
            src = p.operands[0]
            self.func.erase_op(p)
            return self.emit("rsqrt", [src])
        return self.unary()

    def op_IsNaN(self) -> Entry:
        x = self.get(0)
        if isinstance(x, np.ndarray):
            return np.isnan(x)
        return self.emit("ne", [x, x])

    def op_Gelu(self) -> Entry:
        approx = self.attrs().get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        return self.emit("gelu", [self.get(0)], {"approximate": approx})

    def op_Identity(self) -> Entry:
        return self.get(0)

    def op_Dropout(self) -> list[Entry]:
        return [self.get(0)]

    def op_Constant(self) -> Entry:
        from onnx import numpy_helper

        a = self.attrs()
        if "value" in a:
            arr = numpy_helper.to_array(a["value"])
        elif "value_float" in a:
            arr = np.array(a["value_float"], np.float32)
        elif "value_floats" in a:
            arr = np.array(a["value_floats"], np.float32)
        elif "value_int" in a:
            arr = np.array(a["value_int"], np.int64)
        elif "value_ints" in a:
            arr = np.array(a["value_ints"], np.int64)
        else:
            raise self.fail(f"Constant with attributes {sorted(a)} is not supported")
        self._const_name[id(arr)] = self.node.output[0]
        return arr

    def op_Cast(self) -> Entry:
        to = _qdtype(self.attrs()["to"], self.node.name)
        x = self.get(0)
        from qir.dtypes import dtype

        if isinstance(x, np.ndarray):
            if _is_sym(x):
                if to in ("i64", "i32"):
                    return x
                raise self.fail(f"cannot cast the symbolic sizes {list(x.reshape(-1))} to {to}")
            return x.astype(dtype(to).numpy)
        if x.type.dtype.name == to:
            return x
        return self.emit("cast", [x], result_types=[x.type.with_dtype(to)])

    def op_Where(self) -> Entry:
        c, a, b = self.get(0), self.get(1), self.get(2)
        if all(isinstance(v, np.ndarray) for v in (c, a, b)):
            return np.where(c, a, b)
        like = a if isinstance(a, Value) else (b if isinstance(b, Value) else None)
        if like is not None:
            a, b = self._scalar(a, like), self._scalar(b, like)
        return self.emit("where", [self.value(c), self.value(a, like), self.value(b, like)])

    # -- shapes --------------------------------------------------------------------------------------------------
    def op_Shape(self) -> Entry:
        shape = list(self.shape_of(self.get(0)))
        a = self.attrs()
        r = len(shape)
        start = a.get("start", 0)
        end = a.get("end", r)
        start = max(0, min(r, start + r if start < 0 else start))
        end = max(0, min(r, end + r if end < 0 else end))
        part = shape[start:end]
        return _compact(np.array(part, dtype=object)) if part else np.zeros((0,), np.int64)

    def op_Size(self) -> Entry:
        n: Dim = 1
        for d in self.shape_of(self.get(0)):
            n = _dim_mul(n, d)
        return _compact(np.array(n, dtype=object))

    def _dims_text(self, x: Entry, target: list[Dim], allowzero: bool) -> list[int | str]:
        xs = self.shape_of(x)
        out: list[Dim] = []
        for i, d in enumerate(target):
            if d == 0 and not allowzero:
                out.append(xs[i])
            else:
                out.append(d)
        return _attr_dims_text(out)

    def op_Reshape(self) -> Entry:
        x = self.get(0)
        target = self.ints(1, "the shape")
        assert target is not None
        allowzero = bool(self.attrs().get("allowzero", 0))
        dims = self._dims_text(x, target, allowzero)
        if isinstance(x, np.ndarray):
            if all(isinstance(d, int) for d in dims):
                return x.reshape([int(d) for d in dims])
        return self.emit("reshape", [x], {"shape": dims})

    def op_Transpose(self) -> Entry:
        x = self.get(0)
        perm = self.attrs().get("perm") or list(range(self.rank_of(x)))[::-1]
        if isinstance(x, np.ndarray):
            return np.transpose(x, perm)
        return self.emit("transpose", [x], {"perm": list(perm)})

    def _axes(self, name: str, input_index: int) -> list[int] | None:
        a = self.attrs()
        if name in a:
            return [int(v) for v in a[name]]
        v = self.ints(input_index, name)
        return None if v is None else [int(d) for d in v]

    def op_Unsqueeze(self) -> Entry:
        x = self.get(0)
        axes = self._axes("axes", 1) or []
        r = self.rank_of(x) + len(axes)
        axes = sorted(a + r if a < 0 else a for a in axes)
        if isinstance(x, np.ndarray):
            return np.expand_dims(x, tuple(axes)) if axes else x
        for j, a in enumerate(axes):
            x = self.emit("unsqueeze", [x], {"axis": a}, out=0 if j == len(axes) - 1 else None)
        return x

    def op_Squeeze(self) -> Entry:
        x = self.get(0)
        shape = self.shape_of(x)
        axes = self._axes("axes", 1)
        if axes is None:
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = sorted((a + len(shape) if a < 0 else a for a in axes), reverse=True)
        if isinstance(x, np.ndarray):
            return np.squeeze(x, tuple(axes)) if axes else x
        for j, a in enumerate(axes):
            x = self.emit("squeeze", [x], {"axis": a}, out=0 if j == len(axes) - 1 else None)
        return x

    def op_Concat(self) -> Entry:
        axis = self.attrs()["axis"]
        xs = [self.get(i) for i in range(len(self.node.input))]
        xs = [x for x in xs if x is not None and not (isinstance(x, np.ndarray) and x.ndim == 1 and x.size == 0)]
        if all(isinstance(x, np.ndarray) for x in xs):
            if any(_is_sym(x) for x in xs):
                return _compact(np.concatenate([x.astype(object) for x in xs], axis=axis))
            return np.concatenate(xs, axis=axis)
        like = next(x for x in xs if isinstance(x, Value))
        if len(xs) == 1:
            return xs[0]
        return self.emit("concat", [self.value(x, like) for x in xs], {"axis": axis})

    def op_Slice(self) -> Entry:
        x = self.get(0)
        if self.opset < 10:
            a = self.attrs()
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = self.ints(1, "starts")
            ends = self.ints(2, "ends")
            axes = self.ints(3, "axes")
            steps = self.ints(4, "steps")
            assert starts is not None and ends is not None
            axes = list(range(len(starts))) if axes is None else axes
            steps = [1] * len(starts) if steps is None else steps
        shape = self.shape_of(x)
        r = len(shape)
        if isinstance(x, np.ndarray):
            key: list[slice] = [slice(None)] * r
            ok = True
            for s, e, ax, st in zip(starts, ends, axes, steps):
                if isinstance(s, SymDim) or isinstance(e, SymDim):
                    ok = False
                    break
                key[int(ax) % r] = slice(int(s), int(e), int(st))
            if ok:
                return x[tuple(key)]
        out = x
        for j, (s, e, ax, st) in enumerate(zip(starts, ends, axes, steps)):
            ax = int(ax) % r
            size = shape[ax]
            end: Dim | None = e
            if isinstance(e, int) and (e >= 2**62 or (isinstance(size, int) and e >= size)):
                end = None
            elif isinstance(e, SymDim) and e == size:
                end = None
            last = j == len(starts) - 1
            if isinstance(s, SymDim) or isinstance(end, SymDim):
                if st != 1 or isinstance(s, SymDim) and s != 0:
                    raise self.fail(f"slice bounds {s}:{e}:{st} on axis {ax} of {format(shape)} are not supported")
                # x[..., 0:end] with a symbolic end: take the rows arange(end)
                n = end if isinstance(end, SymDim) else size
                idx = self.emit("arange", [], {"size": [str(n)], "start": int(s) if isinstance(s, int) else 0},
                                name=f"{self.node.output[0]}.idx")
                out = self.emit("gather", [out, idx], {"axis": ax}, out=0 if last else None)
            else:
                if int(s) == 0 and end is None and int(st) == 1:
                    continue
                out = self.emit("slice", [out], {"axis": ax, "start": int(s), "end": None if end is None else int(end),
                                                 "step": int(st)}, out=0 if last else None)
        return out

    def op_Split(self) -> list[Entry]:
        x = self.get(0)
        a = self.attrs()
        shape = self.shape_of(x)
        axis = a.get("axis", 0) % len(shape)
        sizes = a.get("split") or (self.ints(1, "split") if len(self.node.input) > 1 else None)
        n = len(self.node.output)
        if sizes is None:
            total = shape[axis]
            if not isinstance(total, int):
                raise self.fail(f"cannot split the symbolic size {total} into {n} parts")
            per = -(-total // n)
            sizes = [per] * (n - 1) + [total - per * (n - 1)]
        outs: list[Entry] = []
        start = 0
        for i, s in enumerate(sizes):
            s = int(s)
            if isinstance(x, np.ndarray):
                outs.append(np.take(x, range(start, start + s), axis=axis))
            else:
                outs.append(self.emit("slice", [x], {"axis": axis, "start": start, "end": start + s}, out=i))
            start += s
        return outs

    def op_Expand(self) -> Entry:
        x = self.get(0)
        target = self.ints(1, "the shape")
        assert target is not None
        try:
            full = broadcast(self.shape_of(x), tuple(target))
        except QirError as exc:
            raise self.fail(str(exc)) from None
        if isinstance(x, np.ndarray) and all(isinstance(d, int) for d in full) and not _is_sym(x):
            # A view now, but the next folded op materializes it: refuse what no real model folds.
            problem = shape_problem([int(d) for d in full], max_elements=MAX_FOLD_ELEMENTS)
            if problem:
                raise self.fail(f"Expand would build a constant at import time: {problem}")
            return np.broadcast_to(x, [int(d) for d in full])
        if tuple(full) == self.shape_of(x) and isinstance(x, Value):
            return x
        return self.emit("expand", [x], {"shape": _attr_dims_text(full)})

    def op_ConstantOfShape(self) -> Entry:
        from onnx import numpy_helper

        target = self.ints(0, "the shape") or []
        v = self.attrs().get("value")
        fill = numpy_helper.to_array(v).reshape(()) if v is not None else np.array(0.0, np.float32)
        if all(isinstance(d, int) for d in target):
            problem = shape_problem([int(d) for d in target], max_elements=MAX_FOLD_ELEMENTS)
            if problem:
                raise self.fail(f"ConstantOfShape would build a constant at import time: {problem}")
            return np.full([int(d) for d in target], fill, dtype=fill.dtype)
        return self.emit("expand", [np.asarray(fill)], {"shape": _attr_dims_text(target)})

    def op_Range(self) -> Entry:
        start, limit, delta = (self.static(i, n) for i, n in enumerate(("start", "limit", "delta")))
        assert start is not None and limit is not None and delta is not None
        if not any(_is_sym(v) for v in (start, limit, delta)):
            lo, hi, step = start.item(), limit.item(), delta.item()
            if step == 0 or not all(math.isfinite(float(x)) for x in (lo, hi, step)):
                raise self.fail(f"Range({lo}, {hi}, {step}) needs a finite, nonzero step")
            if max(0, math.ceil((hi - lo) / step)) > MAX_FOLD_ELEMENTS:
                raise self.fail(f"Range({lo}, {hi}, {step}) would build more than {MAX_FOLD_ELEMENTS:,} elements at "
                                "import time")
            return np.arange(lo, hi, step, dtype=start.dtype)
        s, e, d = (_as_dim(np.asarray(v).item()) for v in (start, limit, delta))
        if not (isinstance(s, int) and isinstance(d, int) and d == 1):
            raise self.fail(f"Range({s}, {e}, {d}) over a symbolic size is supported only with an integer start and "
                            "step 1")
        dt = _qdtype(self.onnx.helper.np_dtype_to_tensor_dtype(start.dtype) if not _is_sym(start) else 7,
                     self.node.name)
        return self.emit("arange", [], {"size": [str(sub(e, s))], "start": s, "dtype": dt})

    # -- linear algebra ------------------------------------------------------------------------------------------
    def op_MatMul(self) -> Entry:
        a, b = self.get(0), self.get(1)
        if isinstance(a, Value) and isinstance(b, np.ndarray) and b.ndim == 2 and not _is_sym(b):
            w = self._transposed.get(id(b))
            if w is None:  # transpose each weight once, even when several MatMuls use it
                w = np.ascontiguousarray(b.T)
                self._transposed[id(b)] = w
                tied = self._tied_table(w)
                if tied is not None:
                    self._materialized[id(w)] = tied
                    self._keep.append(w)
                else:
                    self._const_name[id(w)] = self._weight_name(b)
            return self.emit("linear", [a, w])
        return self.emit("matmul", [a, b])

    def op_Add(self) -> Entry:
        a, b = self.get(0), self.get(1)
        if isinstance(b, Value) and isinstance(a, np.ndarray):
            a, b = b, a
        if (isinstance(a, Value) and isinstance(b, np.ndarray) and b.ndim == 1 and not _is_sym(b)
                and a.producer is not None and a.producer.opcode == "linear" and len(a.producer.operands) == 2
                and self.consumers[self._onnx_name(a)] == 1 and a.type.shape[-1] == b.shape[0]
                and a not in self.func.outputs):
            lin = a.producer
            x, w = lin.operands
            self.func.erase_op(lin)
            bias = self.value(b, a)
            wname = self._const_name.get(id(b), "")
            if wname.endswith(".bias") and _GENERATED.fullmatch(w.name) \
                    and _sanitize(wname[:-5] + ".weight") not in self.module.constants:
                self.module.rename_constant(w.name, _sanitize(wname[:-5] + ".weight"))
            return self.emit("linear", [x, w, bias])
        return self.binary()

    def _weight_name(self, b: np.ndarray) -> str:
        """The ONNX initializer's name, or, for the exporter's generated ``val_N`` names, the torch module path
        from the node's ``pkg.torch.onnx.name_scopes`` metadata (``layers.0.q_proj.weight``)."""
        given = self._const_name.get(id(b), "")
        if given and not _GENERATED.fullmatch(given):
            return given
        for prop in self.node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = [str(x) for x in ast.literal_eval(prop.value)]
                except (ValueError, SyntaxError):
                    break
                path = scopes[-2] if len(scopes) >= 2 else ""  # scopes are cumulative module paths
                if path and _sanitize(path + ".weight") not in self.module.constants:
                    return path + ".weight"
        return given or self.node.output[0] + ".weight"

    def _onnx_name(self, v: Value) -> str:
        return self._names_of.get(id(v), "")

    def _tied_table(self, w: np.ndarray) -> Value | None:
        """An embedding table equal to the linear weight ``w`` (a tied LM head), to share instead of a copy."""
        for op in self.func.find_ops("embedding"):
            table = op.operands[0]
            if (table.is_constant and tuple(table.type.shape) == w.shape and table.numpy().dtype == w.dtype
                    and np.array_equal(table.numpy(), w)):
                return table
        return None

    def op_Gemm(self) -> Entry:
        a_ = self.attrs()
        alpha, beta = a_.get("alpha", 1.0), a_.get("beta", 1.0)
        x, w, c = self.get(0), self.get(1), self.get(2)
        if a_.get("transA", 0):
            x = self.emit("transpose", [x], {"perm": [1, 0]}, out=None)
        if isinstance(w, np.ndarray):
            w = w if a_.get("transB", 0) else np.ascontiguousarray(w.T)
            if alpha != 1.0:
                w = (w * alpha).astype(w.dtype)
            if isinstance(c, np.ndarray) and c.ndim <= 1 and beta == 1.0:
                return self.emit("linear", [x, w, np.broadcast_to(c, (w.shape[0],)).copy()])
            y = self.emit("linear", [x, w], out=None if c is not None else 0)
        else:
            if not a_.get("transB", 0):
                w = self.emit("transpose", [w], {"perm": [1, 0]}, out=None)
            y = self.emit("matmul", [x, w], out=None if c is not None or alpha != 1.0 else 0)
            if alpha != 1.0:
                y = self.emit("mul", [y, np.array(alpha, np.float32)], out=None if c is not None else 0)
        if c is None:
            return y
        if beta != 1.0:
            c = self.emit("mul", [c, np.array(beta, np.float32)], out=None) if isinstance(c, Value) \
                else (c * beta).astype(c.dtype)
        return self.emit("add", [y, self.value(c, y)])

    def op_Gather(self) -> Entry:
        x, idx = self.get(0), self.get(1)
        axis = self.attrs().get("axis", 0)
        if isinstance(x, np.ndarray) and isinstance(idx, np.ndarray):
            return _compact(np.asarray(np.take(x, idx.astype(np.int64), axis=axis), dtype=x.dtype))
        if isinstance(x, np.ndarray) and x.ndim == 2 and axis == 0 and isinstance(idx, Value):
            return self.emit("embedding", [x, idx])
        return self.emit("gather", [x, idx], {"axis": axis})

    def op_GatherElements(self) -> Entry:
        x, idx = self.get(0), self.get(1)
        axis = self.attrs().get("axis", 0) % self.rank_of(x)
        if isinstance(x, np.ndarray) and x.size and not _is_sym(x) and np.all(x == x.reshape(-1)[0]) \
                and isinstance(idx, Value):
            # every element is the same (BERT's all-zero token types): the result is that value, shaped like idx
            return self.emit("expand", [x.reshape(-1)[:1].reshape(())], {"shape": _attr_dims_text(idx.type.shape)})
        return self.emit("take_along_axis", [x, idx], {"axis": axis})

    def op_GatherND(self) -> Entry:
        x, idx = self.get(0), self.get(1)
        if self.attrs().get("batch_dims", 0):
            raise self.fail("GatherND with batch_dims > 0 is not supported")
        k = self.shape_of(idx)[-1]
        if not isinstance(k, int):
            raise self.fail("GatherND needs a static index depth")
        parts = []
        for j in range(k):
            p = self.emit("slice", [idx], {"axis": -1, "start": j, "end": j + 1}, out=None,
                          name=f"{self.node.output[0]}.i{j}")
            parts.append(self.emit("squeeze", [p], {"axis": -1}, out=None, name=f"{self.node.output[0]}.i{j}"))
        return self.emit("index", [x, *parts], {"axes": list(range(k))})

    def op_CumSum(self) -> Entry:
        a = self.attrs()
        if a.get("exclusive", 0) or a.get("reverse", 0):
            raise self.fail("CumSum with exclusive=1 or reverse=1 is not supported")
        axis = self.ints(1, "axis")
        assert axis is not None
        x = self.get(0)
        if isinstance(x, np.ndarray) and not _is_sym(x):
            return np.cumsum(x, axis=int(axis[0])).astype(x.dtype)
        return self.emit("cumsum", [x], {"axis": int(axis[0])})

    # -- nn ------------------------------------------------------------------------------------------------------
    def op_Softmax(self) -> Entry:
        x = self.get(0)
        axis = self.attrs().get("axis", -1 if self.opset >= 13 else 1)
        r = self.rank_of(x)
        if self.opset < 13 and axis % r != r - 1:
            raise self.fail(f"Softmax (opset {self.opset}) over axis {axis} that is not the last is not supported")
        return self.emit("softmax", [x], {"axis": axis})

    def op_LayerNormalization(self) -> list[Entry]:
        a = self.attrs()
        x = self.get(0)
        r = self.rank_of(x)
        if a.get("axis", -1) % r != r - 1:
            raise self.fail(f"LayerNormalization over axis {a.get('axis')} (not only the last) is not supported")
        operands = [x, self.get(1)] + ([self.get(2)] if self.get(2) is not None else [])
        return [self.emit("layer_norm", [self.value(o, x if isinstance(x, Value) else None) for o in operands],
                          {"eps": float(str(np.float32(a.get("epsilon", 1e-5))))})]

    def _reduce(self, opcode: str) -> Entry:
        x = self.get(0)
        a = self.attrs()
        axes = a.get("axes")
        if axes is None and len(self.node.input) > 1:
            axes = [int(v) for v in self.ints(1, "axes") or []]
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(self.rank_of(x)))
        return self.emit(opcode, [x], {"axes": [int(v) for v in axes], "keepdim": bool(a.get("keepdims", 1))})

    def op_ReduceMean(self) -> Entry:
        return self._reduce("mean")

    def op_ReduceSum(self) -> Entry:
        return self._reduce("sum")

    def op_ReduceMax(self) -> Entry:
        return self._reduce("max")

    def op_Trilu(self) -> Entry:
        x = self.get(0)
        k = int(self.ints(1, "k")[0]) if self.get(1) is not None else 0  # type: ignore[index]
        upper = bool(self.attrs().get("upper", 1))
        shape = self.shape_of(x)
        m, n = shape[-2], shape[-1]
        if isinstance(m, int) and isinstance(n, int):
            problem = shape_problem([m, n], max_elements=MAX_FOLD_ELEMENTS)
            if problem:
                raise self.fail(f"Trilu would build a mask at import time: {problem}")
            keep: Entry = np.triu(np.ones((m, n), bool), k) if upper else np.tril(np.ones((m, n), bool), k)
        else:
            base = self.node.output[0]
            rows = self.emit("arange", [], {"size": [str(m)], "start": k}, name=f"{base}.rows")
            rows = self.emit("unsqueeze", [rows], {"axis": 1}, name=f"{base}.rows")
            cols = self.emit("arange", [], {"size": [str(n)]}, name=f"{base}.cols")
            keep = self.emit("ge" if upper else "le", [cols, rows], name=f"{base}.keep")
        if isinstance(x, np.ndarray) and isinstance(keep, np.ndarray):
            return np.where(keep, x, np.zeros((), x.dtype))
        xv = self.value(x)
        return self.emit("where", [keep, xv, np.zeros((), xv.type.dtype.numpy)])


# -- attention fusion ---------------------------------------------------------------------------------------------
def _only_user(v: Value) -> Any:
    users = v.users()
    if len(users) != 1 or any(o is v for o in (v.producer.parent.outputs if v.producer and v.producer.parent else [])):
        return None
    return users[0]


def _scalar_of(v: Value) -> float | None:
    if v.is_constant and getattr(v, "has_data", False) and v.type.rank == 0 and v.type.dtype.is_float:
        return float(np.asarray(v.numpy()))  # type: ignore[attr-defined]
    return None


def _scaled(v: Value) -> tuple[Value, float]:
    """``v = x * c`` with a scalar constant ``c`` -> (x, c); else (v, 1)."""
    p = v.producer
    if p is not None and p.opcode == "mul":
        a, b = p.operands
        for x, c in ((a, b), (b, a)):
            f = _scalar_of(c)
            if f is not None and not x.is_constant:
                return x, f
    return v, 1.0


def _untransposed(kt: Value) -> Value | None:
    """``k`` when ``kt`` is ``k`` with its last two axes swapped: a transpose, or the exporter's
    reshape [-1, S, D] -> transpose [0, 2, 1] -> reshape [..., D, S] chain."""
    p = kt.producer
    if p is None:
        return None
    if p.opcode == "transpose":
        r = kt.type.rank
        perm = list(p.attrs["perm"])
        if perm == list(range(r - 2)) + [r - 1, r - 2]:
            return p.operands[0]
        # kt = transpose(y, perm): k is transpose(y, perm with its last two entries swapped)
        func = p.parent
        assert func is not None
        swapped = perm[:-2] + [perm[-1], perm[-2]]
        return func.add_op("transpose", [p.operands[0]], {"perm": swapped}, after=p, names=[kt.name + ".k"],
                           loc=p.loc).result
    if p.opcode != "reshape":
        return None
    t = p.operands[0].producer
    if t is None or t.opcode != "transpose" or list(t.attrs["perm"]) != [0, 2, 1]:
        return None
    r0 = t.operands[0].producer
    if r0 is None or r0.opcode != "reshape":
        return None
    k = r0.operands[0]
    ks, kts = k.type.shape, kt.type.shape
    if k.type.rank != kt.type.rank or ks[:-2] != kts[:-2] or (ks[-2], ks[-1]) != (kts[-1], kts[-2]):
        return None
    return k


def _ungrouped(k: Value, heads: Dim) -> Value:
    """The ``[B, Hkv, S, D]`` tensor behind the exporter's GQA repeat (unsqueeze 2 -> expand -> reshape)."""
    p = k.producer
    if p is None or p.opcode != "reshape":
        return k
    e = p.operands[0].producer
    if e is None or e.opcode != "expand":
        return k
    u = e.operands[0].producer
    if u is None or u.opcode != "unsqueeze" or u.attrs["axis"] != 2:
        return k
    k0 = u.operands[0]
    s0, sk, se = k0.type.shape, k.type.shape, e.result.type.shape
    if k0.type.rank != 4 or len(se) != 5 or se[:2] != s0[:2] or se[3:] != s0[2:] or sk[2:] != s0[2:]:
        return k
    if not (isinstance(s0[1], int) and isinstance(heads, int) and isinstance(se[2], int) and s0[1] * se[2] == heads):
        return k
    return k0


def _arange_from_zero(v: Value) -> Dim | None:
    p = v.producer
    if p is None or p.opcode != "arange" or p.attrs["start"] != 0 or p.attrs["step"] != 1:
        return None
    return v.type.shape[0]


def _is_causal_mask(mask: Value, sq: Dim, sk: Dim) -> bool:
    """True for the exporters' causal mask ``where(tril(ones[S, S]) == 0, -inf, 0)`` over ``S = sq = sk``."""
    if sq != sk:
        return False
    w = mask.producer
    neg = _scalar_of(w.operands[1]) if w is not None and w.opcode == "where" else None
    # -inf, or the lowest f32 the dynamo exporter writes instead (every causal row keeps its diagonal either way)
    if neg is None or neg > float(np.finfo(np.float32).min) or _scalar_of(w.operands[2]) != 0:
        return False
    eq = w.operands[0].producer
    if eq is None or eq.opcode != "eq" or _scalar_of(eq.operands[1]) != 0:
        return False
    tri = eq.operands[0].producer
    if tri is None or tri.opcode != "where" or _scalar_of(tri.operands[2]) != 0:
        return False
    ones = tri.operands[1]
    fill = _scalar_of(ones.producer.operands[0]) if ones.producer is not None and ones.producer.opcode == "expand" \
        else _scalar_of(ones)
    if not fill:  # None or 0
        return False
    keep = tri.operands[0].producer
    if keep is None or keep.opcode != "le":
        return False
    cols, rows = keep.operands
    r = rows.producer
    if r is None or r.opcode != "unsqueeze" or r.attrs["axis"] != 1:
        return False
    n, m = _arange_from_zero(cols), _arange_from_zero(r.operands[0])
    return n is not None and n == m == sq and tuple(mask.type.shape[-2:]) == (sq, sk)


def fuse_attention(func: Function) -> int:
    """Replace the exporters' decomposed scaled dot-product attention by ``attention`` ops; returns the count.

    Matched: ``matmul(q*c1, kT*c2) [+ mask] -> softmax(-1) [-> where(p != p, 0, p)] -> matmul(., v)`` with ``kT``
    the transpose of ``k`` (possibly through the reshape/transpose/reshape chain), and ``k``/``v`` possibly the
    grouped-query repeat of fewer key/value heads. The NaN guard is what ``attention`` does for fully masked rows.
    """
    n = 0
    for sm in list(func.ops):
        if sm.parent is not func or sm.opcode != "softmax" or sm.result.type.rank != 4 \
                or sm.attrs["axis"] not in (-1, 3):
            continue
        p = sm.result
        users = p.users()
        if len(users) == 2 and {u.opcode for u in users} == {"ne", "where"}:  # the NaN guard: where(p != p, 0, p)
            ne = next(u for u in users if u.opcode == "ne")
            guard = next(u for u in users if u.opcode == "where")
            if ne.operands != (p, p) or guard.operands[0] is not ne.result or guard.operands[2] is not p \
                    or _scalar_of(guard.operands[1]) != 0 or len(ne.result.users()) != 1:
                continue
            p = guard.result
        user = _only_user(p)
        if user is None or user.opcode != "matmul" or user.operands[0] is not p:
            continue
        v = user.operands[1]
        scores = sm.operands[0]
        mask: Value | None = None
        sp = scores.producer
        if sp is not None and sp.opcode == "add" and _only_user(scores) is sm:
            a, b = sp.operands
            for mm, mk in ((a, b), (b, a)):
                if mm.producer is not None and mm.producer.opcode == "matmul":
                    scores, mask = mm, mk
                    break
            else:
                continue
        mmop = scores.producer
        if mmop is None or mmop.opcode != "matmul" or scores.type.rank != 4:
            continue
        q, c1 = _scaled(mmop.operands[0])
        kt, c2 = _scaled(mmop.operands[1])
        k = _untransposed(kt)
        if k is None or q.type.rank != 4 or v.type.rank != 4:
            continue
        heads = q.type.shape[1]
        k, v = _ungrouped(k, heads), _ungrouped(v, heads)
        causal = mask is not None and _is_causal_mask(mask, q.type.shape[2], k.type.shape[2])
        if causal:
            mask = None
        operands = [q, k, v] + ([mask] if mask is not None else [])
        try:
            op = func.add_op("attention", operands, {"scale": c1 * c2, "causal": causal}, after=user,
                             names=[user.result.name + ".attn"], loc=user.loc)
        except QirError:
            continue
        if op.result.type != user.result.type:
            func.erase_op(op)
            continue
        name = user.result.name
        user.result.replace_all_uses_with(op.result)
        func.erase_op(user)
        func.rename(op.result, name)
        n += 1
    return n


def import_onnx(path_or_model: str | os.PathLike[str] | Any, *, name: str | None = None) -> Module:
    """Import an ONNX model (a path to a ``.onnx`` file or an ``onnx.ModelProto``) as a qir module with one
    function ``@main``; raises :class:`ONNXImportError` for unsupported ops or unreadable files."""
    try:
        import onnx
    except ImportError:
        raise ONNXImportError("importing ONNX files needs the onnx package: pip install onnx") from None
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if not path.is_file():
            raise ONNXImportError(f"{path}: no such file")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any protobuf/IO failure becomes one actionable error
            raise ONNXImportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        default = path.stem
    else:
        model = path_or_model
        default = model.graph.name or "model"
    if not hasattr(model, "graph"):
        raise ONNXImportError(f"expected a path or an onnx.ModelProto, got {type(path_or_model).__name__}")
    where = str(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else f"model {default!r}"
    if not model.graph.output:
        raise ONNXImportError(f"{where}: the model has no graph outputs (an empty or truncated file?)")
    _check_tensor_headers(model, where)
    importer = _Importer(model, _sanitize(name or default, "model"))
    try:
        return importer.run()
    except QirError as exc:
        if str(exc).startswith(where):
            raise
        raise ONNXImportError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed graph must end in one actionable error, not a traceback
        node = importer.node
        at = f" at node {node.name or '?'} ({node.op_type})" if node is not None else ""
        raise ONNXImportError(f"{where}: malformed model{at}: {type(exc).__name__}: {exc}") from None


def _check_tensor_headers(model: Any, where: str) -> None:
    """Refuse initializers and Constant values whose declared shape is beyond :mod:`qir.limits` or whose bytes
    disagree with it, before ``numpy_helper.to_array`` allocates from them."""
    from onnx import TensorProto, helper

    def check(t: Any, what: str) -> None:
        problem = shape_problem(list(t.dims))
        if problem:
            raise ONNXImportError(f"{where}: {what} {t.name!r}: {problem}")
        if t.data_type == TensorProto.UNDEFINED:
            raise ONNXImportError(f"{where}: {what} {t.name!r} has no data type")
        if t.HasField("raw_data") and t.data_location != TensorProto.EXTERNAL:
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                raise ONNXImportError(f"{where}: {what} {t.name!r} has unknown data type {t.data_type}") from None
            need = math.prod(t.dims) * itemsize
            if t.data_type not in (TensorProto.INT4, TensorProto.UINT4, TensorProto.STRING) \
                    and len(t.raw_data) != need:
                raise ONNXImportError(f"{where}: {what} {t.name!r} declares {list(t.dims)} ({need:,} bytes) but "
                                      f"holds {len(t.raw_data):,} bytes")

    for t in model.graph.initializer:
        check(t, "initializer")
    for n in model.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                check(a.t, f"node {n.name or n.op_type} attribute {a.name}")
