"""The ``torch.export`` frontend: an ``ExportedProgram`` (or a module plus example inputs) becomes a qir function.

::

    m = qir.trace(model, (ids,), dynamic_shapes={"input_ids": {1: torch.export.Dim("seq")}})
    qir.from_exported_program(ep, module=m, function="decode")      # add a second function to the same module

How the graph maps:

* Parameters, buffers and lifted tensor constants become module constants named by their FQN
  (``model.layers.0.self_attn.q_proj.weight``); the data is a numpy *view* of the tensor (no copy). Parameters
  that share storage (a tied embedding and LM head) become one constant. A constant that already exists in the
  target module under the same name with the same type is reused, so prefill and decode share their weights.
* User inputs become function inputs; their torch ``SymInt`` sizes become qir symbolic dims named after the
  ``torch.export.Dim`` the user gave (``Dim("seq")`` -> ``seq``), else after the torch symbol (``s0``).
  Size arithmetic in the graph (``sym_size``, ``operator.add`` on sizes...) is evaluated symbolically.
* Each aten op is converted by the function registered for it in :data:`qir.frontend.aten.ATEN_CONVERTERS`
  (users extend that table). Unknown ops are collected first and reported together by
  :class:`UnsupportedOpError`: op name, number of uses and the source lines they came from.
* Every qir op gets ``loc("file.py:LINE")`` from the node's stack trace; values are named after the FX nodes.
* After conversion :mod:`qir.frontend.fusion` drops dead code and fuses the decomposed RMSNorm into ``rms_norm``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qir.dtypes import DType
from qir.dtypes import dtype as to_dtype
from qir.errors import QirError
from qir.graph import Constant, Function, Module, Value
from qir.shapes import Dim, SymDim, format_shape
from qir.types import TensorType

if TYPE_CHECKING:
    import torch

__all__ = ["ConversionContext", "UnsupportedOpError", "from_exported_program", "op_key", "trace"]


class UnsupportedOpError(QirError):
    """The exported graph uses aten ops the frontend has no converter for; ``ops`` maps each to its uses."""

    def __init__(self, message: str, ops: Mapping[str, list[str]]) -> None:
        super().__init__(message)
        self.ops = dict(ops)


class ConversionError(QirError):
    """An aten op the frontend knows, used in a way it cannot express (says which node and why)."""


_TORCH_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
    "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def qir_dtype(torch_dtype: Any) -> DType:
    """The qir dtype of a ``torch.dtype`` (raises for ones qir lacks, e.g. complex)."""
    name = str(torch_dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise ConversionError(f"torch dtype {torch_dtype} has no qir equivalent "
                              f"(supported: {', '.join(_TORCH_DTYPES)})")
    return to_dtype(_TORCH_DTYPES[name])


def op_key(target: Any) -> str:
    """The table key of an FX call target: ``aten.linear.default``, ``operator.add``..."""
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None)
    if mod in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    text = str(target)
    if text.startswith("<"):
        return f"{mod}.{getattr(target, '__name__', text)}"
    return text


_LIBRARY_PARTS = ("/torch/nn/", "/torch/_", "/torch/fx/", "/torch/export/", "/torch/utils/")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_of(node: Any) -> tuple[str | None, str | None]:
    """``("file.py:LINE", "in fn: code")`` of the last user frame in the node's stack trace, or Nones."""
    trace = node.meta.get("stack_trace") if hasattr(node, "meta") else None
    if not trace:
        return None, None
    frames = _FRAME.findall(trace)
    if not frames:
        return None, None
    user = [f for f in frames if not any(part in f[0].replace(chr(92), "/") for part in _LIBRARY_PARTS)]
    path, line, fn, code = (user or frames)[-1]
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}", f"in {fn}: {code.strip()}"


def _sanitize(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return name if name and not name.startswith((".", "-")) else "v" + name


class ConversionContext:
    """What converters see: the function being built, the node being converted and helpers to emit ops."""

    def __init__(self, module: Module, func: Function, dim_names: Mapping[str, str]) -> None:
        self.module = module
        self.func = func
        self.dim_names = dict(dim_names)
        self.node: Any = None
        self._loc: str | None = None

    # -- sizes and types -----------------------------------------------------------------------------------
    def to_dim(self, value: Any) -> Dim:
        """A qir dim from an int, a torch ``SymInt``, a sympy expression or a :class:`SymDim`."""
        if isinstance(value, (int, SymDim)) and not isinstance(value, bool):
            return value
        expr = value.node.expr if hasattr(value, "node") else value
        try:
            import sympy
        except ImportError as exc:  # pragma: no cover - torch depends on sympy
            raise ConversionError("sympy is needed to convert symbolic sizes") from exc
        expr = sympy.expand(expr)
        if expr.is_Integer:
            return int(expr)
        coefs: dict[str, int] = {}
        const = 0
        for term, coef in expr.as_coefficients_dict().items():
            if not coef.is_Integer:
                raise ConversionError(f"symbolic size {expr} has a non-integer coefficient; qir sizes are "
                                      "integer linear expressions")
            if term == 1:
                const += int(coef)
            elif term.is_Symbol:
                name = self.dim_names.get(str(term), str(term))
                coefs[name] = coefs.get(name, 0) + int(coef)
            else:
                raise ConversionError(f"symbolic size {expr} is not linear in the sizes ({term}); qir sizes are "
                                      "integer linear expressions such as 'seq' or 'past+1'")
        terms = tuple(sorted((n, c) for n, c in coefs.items() if c))
        return SymDim(terms, const) if terms else const

    def shape_of(self, sizes: Sequence[Any]) -> tuple[Dim, ...]:
        return tuple(self.to_dim(s) for s in sizes)

    def type_of(self, fake: Any) -> TensorType:
        """The qir type of a (fake) tensor from a node's ``meta["val"]``."""
        return TensorType(qir_dtype(fake.dtype), self.shape_of(fake.shape))

    def meta_type(self, node: Any = None) -> TensorType:
        """The type torch computed for ``node`` (default: the current node)."""
        node = self.node if node is None else node
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise ConversionError(f"node {node.name} has no tensor metadata (meta['val'])")
        return self.type_of(val)

    @staticmethod
    def dims_attr(shape: Sequence[Dim]) -> list[int | str]:
        """A shape as a ``dims`` attribute (symbolic sizes as strings)."""
        return [d if isinstance(d, int) else str(d) for d in shape]

    # -- emitting ------------------------------------------------------------------------------------------
    def emit(self, opcode: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None, *,
             result_types: Sequence[TensorType] | None = None, name: str | None = None) -> Value:
        """Add one single-result op for the current node (named after it, with its source location)."""
        base = _sanitize(name or (self.node.name if self.node is not None else opcode))
        op = self.func.add_op(opcode, list(operands), dict(attrs or {}), result_types=result_types,
                              names=[base], loc=self._loc)
        return op.result

    def scalar(self, value: float | int | bool, dt: DType | str) -> Constant:
        """A rank-0 constant holding ``value`` in ``dt``, one per (value, dtype) in the module."""
        dt = to_dtype(dt)
        arr = np.asarray(value, dtype=dt.numpy)
        text = "nan" if isinstance(value, float) and math.isnan(value) else repr(arr.item())
        text = text.replace("+", "").replace("-", "m").replace("True", "true").replace("False", "false")
        name = _sanitize(f"c.{dt.name}.{text}")
        existing = self.module.constants.get(name)
        if existing is not None and existing.type == TensorType(dt, ()) and existing.has_data and \
                np.array_equal(existing.numpy(), arr, equal_nan=True):
            return existing
        i = 1
        unique = name
        while unique in self.module.constants:
            unique = f"{name}.{i}"
            i += 1
        return self.module.add_constant(unique, arr)

    def tensor_constant(self, name: str, data: np.ndarray) -> Constant:
        """A new module constant (name made unique)."""
        unique = _sanitize(name)
        i = 1
        while unique in self.module.constants:
            unique = f"{_sanitize(name)}.{i}"
            i += 1
        return self.module.add_constant(unique, data)

    def cast(self, v: Value, dt: DType | str) -> Value:
        """``v`` converted to ``dt`` (``v`` itself when it already has that dtype)."""
        dt = to_dtype(dt)
        if v.type.dtype == dt:
            return v
        if v.is_constant and v.type.rank == 0 and isinstance(v, Constant) and v.has_data:
            return self.scalar(v.numpy().item(), dt)
        return self.emit("cast", [v], result_types=[v.type.with_dtype(dt)], name=f"{self.node.name}.cast")

    def operand(self, x: Any, dt: DType | str) -> Value:
        """A Value for ``x`` in dtype ``dt``: python scalars become scalar constants, tensors are cast."""
        if isinstance(x, Value):
            return self.cast(x, dt)
        if isinstance(x, SymDim):
            raise ConversionError(f"{self.describe()}: a symbolic size ({x}) used as a tensor value is not "
                                  "supported")
        return self.scalar(x, dt)

    def describe(self) -> str:
        """The current node, for error messages: ``aten.foo.default (node foo_3) at model.py:12``."""
        if self.node is None:
            return "conversion"
        text = f"{op_key(self.node.target)} (node {self.node.name})"
        return text + (f" at {self._loc}" if self._loc else "")

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.describe()}: {message}")


# -- the driver ------------------------------------------------------------------------------------------------
def _debug_dim_names(ep: Any) -> dict[str, str]:
    """torch symbol -> the ``Dim`` name the user gave, read from the shape environment of the placeholders."""
    names: dict[str, str] = {}
    env = None
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        for s in getattr(val, "shape", ()):
            if hasattr(s, "node") and getattr(s.node, "shape_env", None) is not None:
                env = s.node.shape_env
                break
        if env is not None:
            break
    if env is None:
        return names
    debug = getattr(env, "source_name_to_debug_name", {}) or {}
    for sym, sources in getattr(env, "var_to_sources", {}).items():
        for src in sources:
            try:
                label = debug.get(src.name() if callable(src.name) else src.name)
            except Exception:  # noqa: BLE001 - a source kind without a name
                label = None
            if label and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", label):
                names[str(sym)] = label
                break
    return names


def _live_nodes(graph: Any) -> set[Any]:
    """Nodes the output depends on (dead code such as BERT's unused pooler is skipped without touching ``ep``)."""
    out = next(n for n in graph.nodes if n.op == "output")
    live: set[Any] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def _is_size_node(node: Any) -> bool:
    val = node.meta.get("val")
    if val is None or hasattr(val, "shape"):
        return False
    cls = type(val).__name__
    return cls in ("SymInt", "SymBool", "SymFloat") or (isinstance(val, (int, float, bool)) and (
        op_key(node.target).startswith("operator.") or "sym_" in op_key(node.target)))


_IGNORED = ("aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
            "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg", "aten.sym_constrain_range.default")


def _collect_unsupported(nodes: Sequence[Any]) -> None:
    from qir.frontend.aten import lookup

    missing: dict[str, list[str]] = {}
    for node in nodes:
        if node.op != "call_function" or _is_size_node(node) or op_key(node.target) in _IGNORED:
            continue
        if lookup(node.target) is None:
            loc, code = source_of(node)
            where = f"{loc} ({code})" if loc else f"node {node.name} (no source location)"
            missing.setdefault(op_key(node.target), []).append(where)
    if not missing:
        return
    parts = []
    for key, wheres in missing.items():
        uses = f"{len(wheres)} use{'s' if len(wheres) != 1 else ''}"
        shown = "; ".join(dict.fromkeys(wheres[:3]))
        more = f"; and {len(wheres) - 3} more" if len(wheres) > 3 else ""
        parts.append(f"unsupported aten op {key} ({uses}) at {shown}{more}")
    raise UnsupportedOpError(
        "\n".join(parts) + "\nregister a converter in qir.frontend.aten.ATEN_CONVERTERS "
        "(see qir/frontend/aten.py) or rewrite the model code at the lines above", missing)


def _storage_key(t: Any) -> tuple[Any, ...]:
    from qir.frontend.fusion import storage_key

    return storage_key(t)


def from_exported_program(ep: Any, *, module: Module | None = None, function: str = "main",
                          input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                          name: str | None = None, dim_names: Mapping[str, str] | None = None,
                          strip_prefix: str | None = None, fuse: bool = True) -> Module:
    """Convert a ``torch.export.ExportedProgram`` into function ``function`` of ``module`` (a new one if None).

    ``dim_names`` maps torch symbols (``"s0"``) to qir size names; by default they are read from the exported
    program's shape environment (the ``torch.export.Dim`` names). ``strip_prefix`` is removed from the front of
    parameter names (``"hf."`` for a wrapper that keeps the real model as ``self.hf``). ``fuse=False`` skips the
    clean-ups of :mod:`qir.frontend.fusion`. Returns the module.
    """
    from qir.frontend import aten, fusion

    if module is None:
        module = Module(_sanitize(name or "module"))
    names = _debug_dim_names(ep)
    names.update(dim_names or {})
    graph = ep.graph
    live = _live_nodes(graph)
    nodes = [n for n in graph.nodes if n in live]
    _collect_unsupported(nodes)

    sig = ep.graph_signature
    specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    for s in sig.output_specs:
        if s.kind.name not in ("USER_OUTPUT",):
            raise ConversionError(f"the exported program mutates {s.target} in place ({s.kind.name}); qir functions "
                                  "are pure: return the new value instead of mutating a buffer or input")
    func = module.add_function(_sanitize(function))
    cx = ConversionContext(module, func, names)
    env: dict[Any, Any] = {}
    state = ep.state_dict
    consts = ep.constants
    by_storage: dict[tuple[Any, ...], Constant] = {}
    user_index = 0
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs.get(node.name)
        kind = spec.kind.name if spec is not None else "USER_INPUT"
        if kind == "USER_INPUT":
            val = node.meta.get("val")
            if not hasattr(val, "shape"):
                if node in live and node.users:
                    raise ConversionError(f"input {node.name} is not a tensor ({val!r}); qir inputs are tensors")
                user_index += 1
                continue
            in_name = input_names[user_index] if input_names and user_index < len(input_names) else node.name
            env[node] = func.add_input(_sanitize(in_name), cx.type_of(val))
            user_index += 1
            continue
        target = spec.target
        tensor = state[target] if target in state else consts.get(target)
        if tensor is None:
            raise ConversionError(f"{kind.lower()} {target} of the exported program has no tensor")
        if node not in live:
            continue
        if strip_prefix and target.startswith(strip_prefix):
            target = target[len(strip_prefix):]
        env[node] = _weight_constant(module, target, tensor, by_storage)
    if input_names and len(input_names) != user_index:
        raise ConversionError(f"input_names has {len(input_names)} names but the program has {user_index} user inputs")

    for node in nodes:
        if node.op != "call_function":
            continue
        cx.node = node
        cx._loc = source_of(node)[0]
        if _is_size_node(node):
            val = node.meta["val"]
            env[node] = cx.to_dim(val) if type(val).__name__ == "SymInt" or isinstance(val, int) else val
            continue
        key = op_key(node.target)
        if key in _IGNORED:
            env[node] = None
            continue
        conv = aten.lookup(node.target)
        assert conv is not None  # checked by _collect_unsupported
        args = _resolve(node.args, env)
        kwargs = _resolve(node.kwargs, env)
        try:
            result = conv(cx, *args, **kwargs)
        except ConversionError:
            raise
        except QirError as exc:
            raise ConversionError(f"{cx.describe()}: {exc}") from exc
        if isinstance(result, Value):
            _check_type(cx, node, result)
        env[node] = result
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = _resolve(out_node.args[0], env)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    values: list[Value] = []
    for i, v in enumerate(outs):
        if not isinstance(v, Value):
            raise ConversionError(f"output {i} of the program is {v!r}, not a tensor; qir functions return tensors")
        values.append(v)
    if output_names is not None and len(output_names) != len(values):
        raise ConversionError(f"output_names has {len(output_names)} names but the program returns {len(values)} "
                              "values")
    func.set_outputs(values)
    if fuse:
        fusion.cleanup(func)
    if output_names is not None:
        _rename_outputs(func, output_names)
    return module


def _weight_constant(module: Module, target: str, tensor: Any, by_storage: dict[tuple[Any, ...], Constant]
                     ) -> Constant:
    """The constant for a parameter/buffer: reused by tie (same storage) or by name, else added as a view."""
    key = _storage_key(tensor)
    if key in by_storage:
        return by_storage[key]
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    data = t.numpy() if str(t.dtype) != "torch.bfloat16" else _bf16_view(t)
    ttype = TensorType(qir_dtype(tensor.dtype), tuple(int(s) for s in t.shape))
    name = _sanitize(target)
    existing = module.constants.get(name)
    if existing is not None and existing.type == ttype:
        c = existing
    else:
        for other in module.constants.values():  # a tie across two conversions into one module
            if other.type == ttype and isinstance(other.data, np.ndarray) and _same_buffer(other.data, data):
                by_storage[key] = other
                return other
        unique, i = name, 1
        while unique in module.constants:
            unique = f"{name}.{i}"
            i += 1
        c = module.add_constant(unique, data, type=ttype)
    by_storage[key] = c
    return c


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.size > 0 and \
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _bf16_view(t: Any) -> np.ndarray:
    import ml_dtypes
    import torch

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _resolve(x: Any, env: Mapping[Any, Any]) -> Any:
    if hasattr(x, "op") and hasattr(x, "meta") and hasattr(x, "target"):
        if x not in env:
            raise ConversionError(f"node {x.name} was used before it was converted")
        return env[x]
    if isinstance(x, (list, tuple)):
        return type(x)(_resolve(v, env) for v in x)
    if isinstance(x, dict):
        return {k: _resolve(v, env) for k, v in x.items()}
    return x


def _check_type(cx: ConversionContext, node: Any, v: Value) -> None:
    val = node.meta.get("val")
    if not hasattr(val, "shape"):
        return
    want = cx.type_of(val)
    if v.type.dtype != want.dtype or v.type.shape != want.shape:
        raise ConversionError(f"{cx.describe()}: converted to {v.type} but torch computed "
                              f"{want.dtype}{format_shape(want.shape)} (converter bug)")


def _rename_outputs(func: Function, names: Sequence[str]) -> None:
    renamed: set[int] = set()
    for v, new in zip(func.outputs, names):
        new = _sanitize(new)
        if id(v) in renamed or v.is_constant or v.name == new:
            continue
        if new in func._names:
            other = func.value(new)
            func.rename(other, func.fresh_name(new + ".orig"))
        func.rename(v, new)
        renamed.add(id(v))


def trace(module: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes: Any = None, *,
          name: str | None = None, function: str = "main", input_names: Sequence[str] | None = None,
          output_names: Sequence[str] | None = None) -> Module:
    """``torch.export.export`` ``module`` under ``torch.no_grad()`` and convert the program into a new qir module."""
    import torch

    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        if isinstance(exc, QirError):
            raise
        raise QirError(f"torch.export failed for {type(module).__name__}: {type(exc).__name__}: {exc}") from exc
    finally:
        module.train(was_training)
    return from_exported_program(ep, function=function, input_names=input_names, output_names=output_names,
                                 name=name or type(module).__name__)

