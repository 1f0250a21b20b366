"""Target legality pre-flight: which ops and tensors of a module break which rule of a target, and how to fix it.

:func:`check_module` reads the qir module (before lowering) against the target's rules (static shapes, quantized
ops only on Cube operators, int8 symmetric weights, static per-tensor int8 activations); :func:`check_lowered`
reads the lowered ONNX graph (op list, opset). Each :class:`Violation` names the op or tensor, the rule, its
public source and the pass option that fixes it. :func:`refusal_message` turns the errors into one message.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from qir.backends.target import Target
from qir.graph import Module, Op

__all__ = ["Violation", "check_lowered", "check_module", "fallback_candidates", "refusal_message"]


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (function, op result or tensor), which rule, what is wrong, how to fix it."""

    rule: str
    where: str
    message: str
    fix: str | None
    source: str
    severity: str = "error"
    fallback: bool = False   # the --fallback option can keep this op in f16
    op: str | None = None    # result name of the offending op

    def __str__(self) -> str:
        fix = f"\n      fix: {self.fix}" if self.fix else ""
        return f"  [{self.rule}] {self.where}: {self.message}{fix}\n      rule source: {self.source}"

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule, "where": self.where, "message": self.message, "fix": self.fix,
                "source": self.source, "severity": self.severity, "fallback": self.fallback}


def _v(target: Target, rule_id: str, where: str, message: str, *, fallback: bool = False,
       op: str | None = None) -> Violation:
    r = target.rule(rule_id)
    return Violation(rule_id, where, message, r.fix, r.source, r.severity, fallback, op)


def _has(target: Target, rule_id: str) -> bool:
    return any(r.id == rule_id for r in target.rules)


def check_module(module: Module, target: Target, *, functions: list[str] | None = None,
                 bind: dict[str, int] | None = None) -> list[Violation]:
    """Violations of ``target``'s rules by ``module`` (all functions unless ``functions`` is given)."""
    out: list[Violation] = []
    bound = bind or {}
    for fname in functions or list(module.functions):
        func = module.function(fname)
        if target.static_shapes and _has(target, "static-shapes"):
            for v in func.inputs:
                free = sorted({s for d in v.type.shape if not isinstance(d, int) for s in d.symbols} - set(bound))
                if free:
                    out.append(_v(target, "static-shapes", f"@{fname} input %{v.name} {v.type}",
                                  f"symbolic size(s) {', '.join(free)} must be fixed"))
        for op in func.ops:
            out.extend(_check_op(target, fname, op))
    return out


def _check_op(target: Target, fname: str, op: Op) -> list[Violation]:
    res: list[Violation] = []
    where = f"@{fname} {op.opcode} -> %{op.results[0].name}"
    if op.opcode == "qembedding" and _has(target, "cube-only"):
        res.append(_v(target, "cube-only", where + f" (table @{op.operands[0].name})",
                      f"a quantized embedding ({op.operands[0].type}) is not a Cube operator", fallback=True,
                      op=op.results[0].name))
    if op.opcode != "qmatmul":
        return res
    x, w = op.operands[0], op.operands[1]
    wt = w.type
    spec = wt.quant
    if _has(target, "weight-int8-sym") and spec is not None:
        bad = []
        if wt.dtype.name != "i8":
            bad.append(f"dtype {wt.dtype} (needs i8)")
        if not spec.symmetric:
            bad.append("asymmetric (needs symmetric)")
        if spec.group_size is not None:
            bad.append(f"per group of {spec.group_size} (needs per channel or per tensor)")
        elif spec.axis not in (None, 0):
            bad.append(f"per axis {spec.axis} (needs axis 0)")
        if bad:
            res.append(_v(target, "weight-int8-sym", where + f" weight @{w.name} {wt}", "; ".join(bad),
                          fallback=True, op=op.results[0].name))
        elif spec.axis == 0 and _has(target, "weight-per-tensor-qat"):
            res.append(_v(target, "weight-per-tensor-qat", where + f" weight @{w.name}",
                          "per-channel weight: fine for ATC/MindIE, refused by convert_qat_model for MatMul"))
    if _has(target, "act-int8-per-tensor"):
        xt = x.type
        if xt.quant is None:
            res.append(_v(target, "act-int8-per-tensor", where + f" input %{x.name} {xt}",
                          "weight-only quantized MatMul: the activation is float (W8A16 is not an ONNX/ATC "
                          "int8 layer)", fallback=True, op=op.results[0].name))
        elif xt.quant.dynamic or xt.quant.axis is not None:
            res.append(_v(target, "act-int8-per-tensor", where + f" input %{x.name} {xt}",
                          "activation quantized " + ("dynamically" if xt.quant.dynamic else "per axis")
                          + " (needs static per tensor)", fallback=True, op=op.results[0].name))
        elif xt.dtype.name not in ("i8", "u8"):
            res.append(_v(target, "act-int8-per-tensor", where + f" input %{x.name} {xt}",
                          f"activation dtype {xt.dtype} (needs 8-bit)", fallback=True, op=op.results[0].name))
    return res


def fallback_candidates(violations: list[Violation]) -> set[str]:
    """Result names of the ops that ``--fallback`` lowers in f16."""
    return {v.op for v in violations if v.fallback and v.severity == "error" and v.op is not None}


def check_lowered(model: onnx.ModelProto, target: Target, fname: str) -> list[Violation]:
    """Violations visible only in the lowered graph: opset range and the target's op list."""
    res: list[Violation] = []
    lo, hi = target.opset_range
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi and _has(target, "opset"):
            res.append(_v(target, "opset", f"@{fname}", f"opset {imp.version} outside {lo}..{hi}"))
    if target.allowed_ops is not None and _has(target, "op-list"):
        bad: dict[str, str] = {}
        for n in model.graph.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            if (n.domain not in ("", "ai.onnx") or n.op_type not in target.allowed_ops) and key not in bad:
                bad[key] = n.output[0]
        for key, first in bad.items():
            res.append(_v(target, "op-list", f"@{fname} ONNX op {key} (first output {first})",
                          f"{key} is not in {target.name}'s op list"))
    return res


def refusal_message(target: Target, violations: list[Violation]) -> str:
    """The message ``compile`` refuses with: every error, grouped by rule."""
    errors = [v for v in violations if v.severity == "error"]
    lines = [f"the module does not satisfy target {target.name}: {len(errors)} violation(s)"]
    for v in sorted(errors, key=lambda v: (v.rule, v.where)):
        lines.append(str(v))
    if any(v.fallback for v in errors):
        lines.append("  (--fallback keeps the ops marked above in f16 instead of refusing)")
    return "\n".join(lines)
