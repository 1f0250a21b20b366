"""Clean-up passes: dead code, common subexpressions, constant folding, quantize∘dequantize pairs.

dce
    Before: ``%a = exp %x : f32[4]`` with ``%a`` unused → After: the op is gone
    (and, with ``constants=true``, constants nothing uses or refers to — except calibration
    statistics, ``@calib.*``, which stay until the pass that consumes them removes them).
cse
    Before: ``%a = add %x, %y``; ``%b = add %x, %y`` → After: uses of ``%b`` use ``%a``.
fold-constants
    Before: ``%s = rsqrt @c`` with ``@c`` a constant → After: ``%s`` replaced by a new
    constant ``@s`` (only results of at most ``max_elements`` elements, so weights are never expanded).
fold-qdq
    Before: ``%d = dequantize %q``; ``%r = quantize %d : i8[..] q(A)`` → After: ``%r`` is ``%q``
    when ``q(A)`` is ``%q``'s own type, else ``%r = requantize %q : i8[..] q(A)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.graph import Module, Op
from qir.passes.base import Pass
from qir.passes.registry import register_pass
from qir.passes.rewrite import RewritePattern, Rewriter, apply_patterns

CALIBRATION_PREFIX = "calib."
"""Constants named ``calib.*`` hold calibration statistics: dce keeps them even though no op uses them."""


@register_pass
@dataclass
class DeadCodeElimination(Pass):
    """Remove ops whose results nobody uses (and unused constants with constants=true)."""

    name = "dce"
    constants: bool = True

    def run(self, module: Module) -> None:
        for func in module.functions.values():
            live_outputs = {id(v) for v in func.outputs}
            for op in reversed(list(func.ops)):
                if all(not r.uses and id(r) not in live_outputs for r in op.results):
                    func.erase_op(op)
        if self.constants:
            referenced = module.spec_references()
            for name in list(module.constants):
                c = module.constants[name]
                if name.startswith(CALIBRATION_PREFIX):
                    continue
                if not c.uses and name not in referenced and not any(
                        c is v for f in module.functions.values() for v in f.outputs):
                    del module.constants[name]


@register_pass
@dataclass
class CommonSubexpressionElimination(Pass):
    """Replace an op by an earlier identical one (same opcode, operands, attributes and result types)."""

    name = "cse"

    def run(self, module: Module) -> None:
        for func in module.functions.values():
            seen: dict[tuple[object, ...], Op] = {}
            for op in list(func.ops):
                key = (op.opcode, tuple(id(v) for v in op.operands), tuple(sorted(op.attrs.items())),
                       tuple(r.type for r in op.results))
                first = seen.get(key)
                if first is None:
                    seen[key] = op
                    continue
                for old, new in zip(op.results, first.results):
                    old.replace_all_uses_with(new)
                func.erase_op(op)


@register_pass
@dataclass
class FoldConstants(Pass):
    """Evaluate ops whose operands are all constants, when the result is small, into new constants."""

    name = "fold-constants"
    max_elements: int = 65536

    def run(self, module: Module) -> None:
        from qir.interpreter import RunContext
        from qir.ops import get_op

        ctx = RunContext(module, {})
        for func in module.functions.values():
            for op in list(func.ops):
                if not op.operands or not all(v.is_constant and v.has_data for v in op.operands):  # type: ignore
                    continue
                if any(r.type.is_quantized or not r.type.is_static or r.type.numel() > self.max_elements
                       for r in op.results):
                    continue
                args = [ctx.constant(v.name) for v in op.operands]
                outs = get_op(op.opcode).compute(ctx, args, op.attrs, [r.type for r in op.results])
                for r, value in zip(op.results, outs):
                    data = np.asarray(value, dtype=r.type.dtype.numpy)
                    c = module.add_constant(module.fresh_constant_name(r.name), data, type=r.type)
                    r.replace_all_uses_with(c)
                func.erase_op(op)


class _QuantizeOfDequantize(RewritePattern):
    opcode = "quantize"

    def match_and_rewrite(self, op: Op, rewriter: Rewriter) -> bool:
        src = op.operands[0].producer
        if src is None or src.opcode != "dequantize":
            return False
        q = src.operands[0]
        want = op.result.type
        if want.quant is not None and want.quant.dynamic:
            return False  # a dynamic re-quantization picks new parameters from the data: not a plain requantize
        if want == q.type:
            rewriter.replace_op(op, [q])
        else:
            new = rewriter.create("requantize", [q], before=op, result_types=[want], names=[op.result.name + ".rq"])
            rewriter.replace_op(op, [new.result])
        if not src.result.uses:
            rewriter.erase_op(src)
        return True


@register_pass
@dataclass
class FoldQuantizeDequantize(Pass):
    """Turn quantize(dequantize(q)) into q (same type) or requantize(q) (a different static spec)."""

    name = "fold-qdq"

    def run(self, module: Module) -> None:
        apply_patterns(module, [_QuantizeOfDequantize()])
