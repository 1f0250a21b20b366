"""``qir dump --format dot``: a module as Graphviz, one cluster per function.

Each op is a box labelled with its opcode and result type(s); function inputs are ellipses; constants a
quantized op reads appear as small notes with their type (so ``i4[...] q(group=32)`` is visible on the edge into
``qmatmul``); outputs are double octagons. Edges carry values. Render with ``dot -Tsvg model.dot -o model.svg``.
"""

from __future__ import annotations

from qir.graph import Function, Module, Value

__all__ = ["function_to_dot", "module_to_dot"]


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def function_to_dot(func: Function, prefix: str) -> list[str]:
    """The lines of one ``subgraph cluster`` for ``func`` (node ids start with ``prefix``)."""
    ids: dict[int, str] = {}
    lines = [f"  subgraph {_q('cluster_' + func.name)} {{", f"    label={_q('@' + func.name)};"]

    def node_of(v: Value) -> str:
        key = id(v)
        if key not in ids:
            ids[key] = f"{prefix}c{len(ids)}"
            lines.append(f"    {ids[key]} [shape=note, fontsize=9, label={_q(v.ref + ' : ' + str(v.type))}];")
        return ids[key]

    for v in func.inputs:
        ids[id(v)] = f"{prefix}i{len(ids)}"
        lines.append(f"    {ids[id(v)]} [shape=ellipse, label={_q('%' + v.name + ' : ' + str(v.type))}];")
    for n, op in enumerate(func.ops):
        me = f"{prefix}o{n}"
        results = "\n".join(str(r.type) for r in op.results)
        lines.append(f"    {me} [shape=box, label={_q(op.opcode + chr(10) + results)}];")
        for operand in op.operands:
            src = ids.get(id(operand)) or node_of(operand)
            lines.append(f"    {src} -> {me} [label={_q(operand.ref)}, fontsize=8];")
        for r in op.results:
            ids[id(r)] = me
    for k, v in enumerate(func.outputs):
        out = f"{prefix}r{k}"
        lines.append(f"    {out} [shape=doubleoctagon, label={_q('return ' + str(k))}];")
        lines.append(f"    {ids.get(id(v)) or node_of(v)} -> {out};")
    lines.append("  }")
    return lines


def module_to_dot(module: Module) -> str:
    """The whole module as one ``digraph`` (see the module docstring)."""
    lines = [f"digraph {_q(module.name)} {{", "  rankdir=TB;", "  node [fontname=monospace];"]
    for n, func in enumerate(module.functions.values()):
        lines += function_to_dot(func, f"f{n}_")
    lines.append("}")
    return "\n".join(lines) + "\n"
