"""The ``merge-siblings`` pass: matmuls that read the same input become one matmul on stacked weights, then slices.

``merge-siblings{min_count=2, single_token=true}``

A transformer layer multiplies one normalized activation by three weights (q, k, v) and another by two (gate, up).
Each is a separate kernel launch, and the small ones (SmolLM2's k and v: 192 x 576) are too short to keep two
threads busy. This pass stacks sibling weights along their output rows, ``W = [Wq; Wk; Wv]``, runs one ``linear`` or
``qmatmul`` and slices its result back into the old values (which keep their names)::

    Before                                          After
    %q = qmatmul %x.q, @q_proj.weight               %qkv = qmatmul %x.q, @q_proj_k_proj_v_proj.weight
    %k = qmatmul %x.q, @k_proj.weight               %q = slice %qkv {axis=-1, end=576}
    %v = qmatmul %x.q, @v_proj.weight               %k = slice %qkv {axis=-1, start=576, end=768}
                                                    %v = slice %qkv {axis=-1, start=768}

The result is exactly the old one: every output row of a ``linear``/``qmatmul`` depends only on its own weight row
and that row's quantization parameters, and ``x`` (with its run-time per-token parameters, for ``qmatmul``) is the
same value for all siblings. So the pass merges only weights whose parameters are *per row* -- per output channel
(``axis=0``) or per group along the input (``axis=1, group=g``), at any depth (compress-scales' 8-bit scales with
their fp16 per-row scale and base stack the same way) -- or per tensor with equal literals. Anything else (a
per-input-channel scale, different dtypes, group sizes or result types, a weight that something else also reads, a
bias on some siblings only) keeps its own op.

Weights are shared across functions (a causal LM's ``prefill`` and ``decode``): a group merges only when every use
of each of its weights is one of the siblings, grouped the same way in every function, so no weight is stored twice.

``single_token=true`` (default) merges only siblings that some function runs on a single token (a decode step):
there each projection is a short GEMV whose launch and idle threads cost as much as its work, and the slices are a
few hundred floats. With many rows each projection is a full GEMM already and the stacked result is copied into
its slices: all-MiniLM-L6-v2 w8a8 on ``tvm-llvm`` (batch 8 x 128, q/k/v read by the attention kernel through their
head transposes) went from 48.2 to 52.9 ms merged, while SmolLM2's prefill (1 x 512) did not change (918 vs 910 ms)
and its w4a8 decode gained 6%. ``single_token=false`` merges every group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["MergeSiblings", "StackedRows", "merged_name", "stacked_sources"]

_MERGEABLE = ("linear", "qmatmul")


def merged_name(names: list[str]) -> str:
    """``a.q_proj.weight`` + ``a.k_proj.weight`` -> ``a.q_proj_k_proj.weight``: common dotted prefix and suffix kept."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    middle = "_".join(".".join(p[head:len(p) - tail]) for p in parts)
    return ".".join(parts[0][:head] + [middle] + (parts[0][len(parts[0]) - tail:] if tail else []))


@dataclass(frozen=True)
class StackedRows:
    """Where a weight of the module before ``merge-siblings`` lives after it: rows ``[start, end)`` of ``@stacked``."""

    stacked: str
    start: int
    end: int


def stacked_sources(before: Module, after: Module) -> dict[str, StackedRows]:
    """For each weight of ``before`` that ``after`` stores stacked, where its rows are (reports, debuggers).

    Found through the values, which the pass keeps by name: a ``linear``/``qmatmul`` result ``%y`` on ``@w`` in
    ``before`` is, in ``after``, ``%y = slice %merged {start, end}`` of an op on the stacked weight. ``before`` may be
    the float module (quantize keeps the names of weights and results).
    """
    out: dict[str, StackedRows] = {}
    for fname, func in before.functions.items():
        if fname not in after.functions:
            continue
        later = after.function(fname)
        names = {v.name: v for v in later.values()}
        for op in func.ops:
            if op.opcode not in _MERGEABLE or len(op.operands) < 2 or not op.operands[1].is_constant:
                continue
            w = op.operands[1].name
            if w in after.constants or w in out:
                continue
            v = names.get(op.result.name)
            sl = v.producer if v is not None else None
            if sl is None or sl.opcode != "slice":
                continue
            src = sl.operands[0].producer
            if src is None or src.opcode not in _MERGEABLE or not src.operands[1].is_constant:
                continue
            rows = int(op.operands[1].type.shape[0])  # type: ignore[arg-type]
            start = int(sl.attrs["start"])
            out[w] = StackedRows(src.operands[1].name, start, start + rows)
    return out


def _row_layout(module: Module, c: Constant, rows: int, refs: dict[str, list[str]]) -> tuple[Any, ...] | None:
    """A key that equal-layout constants share, or None when ``c``'s rows cannot be stacked with another's.

    ``c`` has ``rows`` as its first dimension. Its quantization parameters must be indexed by that row too (per axis
    0, or per group along another axis) or be per-tensor literals (which then must be equal: they are in the key).
    ``refs``: :meth:`Module.spec_references`, so a parameter constant that another tensor shares is refused.
    """
    t = c.type
    if t.rank < 1 or t.shape[0] != rows or not all(isinstance(d, int) for d in t.shape) or not c.has_data:
        return None
    spec = t.quant
    if spec is None:
        return (t.dtype, t.shape[1:], None)
    if spec.dynamic:
        return None
    if spec.axis is None:
        parts: tuple[Any, ...] = (spec.scale, spec.zero_point)
        if isinstance(spec.scale, str) or isinstance(spec.zero_point, str) or spec.offset is not None:
            return None  # a per-tensor parameter held in a constant: stacking would need it to be equal
    elif spec.axis == 0 and spec.group_size is None or spec.axis != 0 and spec.group_size is not None:
        parts = ()
        for ref in spec.constant_refs:
            sub = _row_layout(module, module.constant(ref), rows, refs)
            if sub is None or module.constant(ref).uses or len(refs.get(ref, [])) != 1:
                return None  # not row-indexed, or shared with another tensor
            parts += (sub,)
    else:
        return None
    return (t.dtype, t.shape[1:], replace(spec, scale=None if isinstance(spec.scale, str) else spec.scale,
                                          zero_point=None if isinstance(spec.zero_point, str) else spec.zero_point,
                                          offset=None), parts)


def _one_token(t: TensorType) -> bool:
    """Whether ``t`` (a matmul input ``[..., K]``) holds one row: every leading dim a static 1."""
    return all(d == 1 for d in t.shape[:-1])


def _stack(module: Module, consts: list[Constant], name: str, after: str) -> Constant:
    """Add ``@name`` = the row-wise stack of ``consts`` after ``@after``, then its stacked parameter constants."""
    planned: list[tuple[str, list[Constant]]] = []  # (new name, constants stacked), the weight's parameters
    mapping: dict[str, str] = {}
    taken = set(module.constants) | {name}

    def plan(group: list[Constant], new: str) -> None:
        sp = group[0].type.quant
        for role in ("scale", "zero_point", "offset"):
            ref = getattr(sp, role) if sp is not None else None
            if isinstance(ref, str):
                first = group[0].name
                sub = new + ref[len(first):] if ref.startswith(first) else f"{new}.{role}"
                while sub in taken:
                    sub += ".1"
                taken.add(sub)
                mapping[ref] = sub
                subgroup = [module.constant(getattr(c.type.quant, role)) for c in group]
                planned.append((sub, subgroup))
                plan(subgroup, sub)

    plan(consts, name)
    cursor = after
    added: list[Constant] = []
    for new, group in [(name, consts), *planned]:
        data = np.concatenate([np.asarray(c.numpy()) for c in group], axis=0)
        sp = group[0].type.quant
        quant: QuantSpec | None = sp.rename_refs(mapping) if sp is not None else None
        t = TensorType(group[0].type.dtype, (data.shape[0], *group[0].type.shape[1:]), quant)
        added.append(module.add_constant(new, data, type=t, after=cursor))
        cursor = new
    return added[0]


def _remove_tree(module: Module, c: Constant) -> None:
    refs = c.type.quant.constant_refs if c.type.quant is not None else ()
    module.remove_constant(c.name)
    for ref in refs:
        _remove_tree(module, module.constant(ref))


@register_pass
@dataclass
class MergeSiblings(Pass):
    """Stack the weights of linears/qmatmuls that read the same input (q/k/v, gate/up) into one op and slice."""

    name = "merge-siblings"
    min_count: int = 2
    single_token: bool = True

    def run(self, module: Module) -> None:
        if self.min_count < 2:
            raise QirError(f"merge-siblings: min_count must be at least 2, got {self.min_count}")
        self.merged: list[tuple[str, ...]] = []
        groups: dict[tuple[str, ...], list[tuple[Function, list[Op]]]] = {}
        refs = module.spec_references()
        for func in module.functions.values():
            for ops in self._sibling_groups(module, func, refs):
                groups.setdefault(tuple(op.operands[1].name for op in ops), []).append((func, ops))
        for weights, uses in groups.items():
            if self.single_token and not any(_one_token(ops[0].operands[0].type) for _, ops in uses):
                continue
            consts = [module.constant(w) for w in weights]
            n_uses = sum(len(ops) for _, ops in uses)
            if sum(len(c.uses) for c in consts) != n_uses:
                continue  # some weight is also read elsewhere (or grouped differently in another function)
            if uses[0][1][0].operands[2:]:
                biases = [module.constant(op.operands[2].name) for op in uses[0][1]]
                if any(op.operands[2:] != uses[0][1][i].operands[2:] for _, ops in uses for i, op in enumerate(ops)):
                    continue
            else:
                biases = []
            self._merge(module, consts, biases, uses)

    def _sibling_groups(self, module: Module, func: Function, refs: dict[str, list[str]]) -> list[list[Op]]:
        """Per input value and layout key, the mergeable ops reading it, in program order."""
        by_key: dict[tuple[Any, ...], list[Op]] = {}
        for op in func.ops:
            if op.opcode not in _MERGEABLE or len(op.results) != 1:
                continue
            x, w = op.operands[0], op.operands[1]
            if not w.is_constant or w.type.rank != 2 or op.result.type.quant is not None:
                continue
            if any(u.opcode not in _MERGEABLE or i != 1 for u, i in w.uses):
                continue  # also read as something else (a tied embedding table): stacking would store it twice
            bias = op.operands[2:]
            if bias and (not bias[0].is_constant or bias[0].type.quant is not None or bias[0].type.rank != 1
                         or not bias[0].has_data):  # type: ignore[attr-defined]
                continue
            layout = _row_layout(module, w, int(w.type.shape[0]), refs)  # type: ignore[arg-type]
            if layout is None:
                continue
            key = (id(x), op.opcode, layout, op.result.type.dtype, bool(bias),
                   bias[0].type.dtype if bias else None, tuple(sorted(op.attrs.items())))
            by_key.setdefault(key, []).append(op)
        out = []
        for ops in by_key.values():
            names = [op.operands[1].name for op in ops]
            if len(ops) >= self.min_count and len(set(names)) == len(names):
                out.append(ops)
        return out

    def _merge(self, module: Module, consts: list[Constant], biases: list[Constant],
               uses: list[tuple[Function, list[Op]]]) -> None:
        name = module.fresh_constant_name(merged_name([c.name for c in consts]))
        w = _stack(module, consts, name, after=consts[-1].name)
        b = _stack(module, biases, module.fresh_constant_name(merged_name([c.name for c in biases])),
                   after=biases[-1].name) if biases else None
        rows = [int(c.type.shape[0]) for c in consts]  # type: ignore[arg-type]
        for func, ops in uses:
            first = min(ops, key=func.ops.index)
            y_names = [op.result.name for op in ops]
            merged = func.add_op(ops[0].opcode, [ops[0].operands[0], w, *([b] if b is not None else [])],
                                 dict(ops[0].attrs), names=[func.fresh_name(merged_name(y_names))], before=first,
                                 loc=first.loc)
            start = 0
            pieces = []
            for op, n in zip(ops, rows):
                end = start + n
                attrs = {"axis": -1, "start": start, **({"end": end} if end < sum(rows) else {})}
                piece = func.add_op("slice", [merged.result], attrs, names=[func.fresh_name(op.result.name)],
                                    before=first, loc=op.loc)
                pieces.append(piece)
                start = end
            for op, piece in zip(ops, pieces):
                op.result.replace_all_uses_with(piece.result)
                func.erase_op(op)
                func.rename(piece.result, op.result.name)
        for c in [*consts, *biases]:
            _remove_tree(module, c)
        self.merged.append(tuple(c.name for c in consts))
