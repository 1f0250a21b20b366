"""Frontend clean-ups on a freshly converted function: dead code, no-op casts, and the RMSNorm fusion.

* :func:`storage_key` identifies a tensor's memory (tied parameters share it), so the converter can map a tied
  embedding and LM head to one constant.
* :func:`drop_noop_casts` removes ``cast`` ops whose result dtype equals the operand's.
* :func:`fuse_rms_norm` rewrites the decomposed RMSNorm that transformers emits::

      %p = pow %x, @c.f32.2.0        (or mul %x, %x)
      %m = mean %p {axes=[-1], keepdim=true}
      %a = add %m, @eps
      %r = rsqrt %a
      %n = mul %x, %r                (either operand order)
      %y = mul @w, %n                (optional weight; either order)

  into ``%y = rms_norm %x, @w {eps}``, also when HF's ``to(float32)`` / ``to(input_dtype)`` casts surround it.
* :func:`dce` drops ops whose results nobody uses. :func:`cleanup` runs all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qir.graph import Constant, Function, Op, Value


def storage_key(t: Any) -> tuple[Any, ...]:
    """What identifies a tensor's elements: storage address, offset, shape, strides and dtype."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))


def dce(func: Function) -> int:
    """Remove ops none of whose results is used or returned; returns how many were removed."""
    outputs = {id(v) for v in func.outputs}
    removed = 0
    for op in reversed(list(func.ops)):
        if all(not r.uses and id(r) not in outputs for r in op.results):
            func.erase_op(op)
            removed += 1
    return removed


def drop_noop_casts(func: Function) -> int:
    """Remove casts to the dtype their operand already has."""
    n = 0
    for op in list(func.ops):
        if op.opcode == "cast" and op.operands[0].type == op.result.type:
            op.result.replace_all_uses_with(op.operands[0])
            func.erase_op(op)
            n += 1
    return n


def _single_user(v: Value, outputs: set[int]) -> Op | None:
    users = v.users()
    if len(users) != 1 or id(v) in outputs:
        return None
    return users[0]


def _other(op: Op, v: Value) -> Value | None:
    a, b = op.operands
    if a is v:
        return b
    if b is v:
        return a
    return None


def _scalar_value(v: Value) -> float | None:
    if isinstance(v, Constant) and v.has_data and v.type.rank == 0:
        arr = np.asarray(v.numpy())
        # the shortest decimal of the stored value: an f32 1e-5 reads back as 1e-05, not 9.99999974e-06
        return float(str(arr.item() if arr.dtype == np.float64 else arr.astype(np.float32)))
    return None


def _through_cast(v: Value) -> Value:
    p = v.producer
    return p.operands[0] if p is not None and p.opcode == "cast" else v


def _match_rms(func: Function, mean_op: Op, outputs: set[int]) -> tuple[Value, Value | None, float, Value, list[Op]]:
    """Match the pattern around a ``mean``; returns (x, weight, eps, result to replace, ops to erase)."""
    x_rank = mean_op.operands[0].type.rank
    if not mean_op.attrs["keepdim"] or list(mean_op.attrs["axes"]) not in ([x_rank - 1], [-1]):
        raise LookupError
    sq = mean_op.operands[0].producer
    if sq is None or _single_user(sq.result, outputs) is not mean_op:
        raise LookupError
    if sq.opcode == "pow" and _scalar_value(sq.operands[1]) == 2.0:
        x = sq.operands[0]
    elif sq.opcode == "mul" and sq.operands[0] is sq.operands[1]:
        x = sq.operands[0]
    else:
        raise LookupError
    add = _single_user(mean_op.result, outputs)
    if add is None or add.opcode != "add":
        raise LookupError
    eps_v = _other(add, mean_op.result)
    eps = _scalar_value(eps_v) if eps_v is not None else None
    if eps is None:
        raise LookupError
    rs = _single_user(add.result, outputs)
    if rs is None or rs.opcode != "rsqrt":
        raise LookupError
    norm = _single_user(rs.result, outputs)
    if norm is None or norm.opcode != "mul" or _other(norm, rs.result) is not x:
        raise LookupError
    erase = [norm, rs, add, mean_op, sq]
    out = norm.result
    src = x
    # HF: x.to(float32) ... (x * rsqrt(...)).to(input_dtype): fold the cast pair into the op.
    cast_back = _single_user(out, outputs)
    if cast_back is not None and cast_back.opcode == "cast" and _through_cast(x) is not x and \
            cast_back.result.type.dtype == _through_cast(x).type.dtype:
        src = _through_cast(x)
        out = cast_back.result
        erase.insert(0, cast_back)
    weight: Value | None = None
    wmul = _single_user(out, outputs)
    if wmul is not None and wmul.opcode == "mul":
        w = _other(wmul, out)
        if w is not None and w.type.rank == 1 and w.type.shape == (src.type.shape[-1],) and \
                w.type.dtype == src.type.dtype and wmul.result.type == src.type:
            weight = w
            out = wmul.result
            erase.insert(0, wmul)
    if out.type.dtype != src.type.dtype or out.type.shape != src.type.shape:
        raise LookupError
    return src, weight, eps, out, erase


def fuse_rms_norm(func: Function) -> int:
    """Replace each decomposed RMSNorm by one ``rms_norm`` op; returns how many were fused."""
    outputs = {id(v) for v in func.outputs}
    n = 0
    for op in list(func.ops):
        if op.opcode != "mean" or op.parent is not func:
            continue
        try:
            x, w, eps, out, erase = _match_rms(func, op, outputs)
        except LookupError:
            continue
        last = out.producer
        assert last is not None
        name = out.name
        fused = func.add_op("rms_norm", [x] + ([w] if w is not None else []), {"eps": eps}, after=last,
                            names=[name + ".rms"], loc=op.loc)
        out.replace_all_uses_with(fused.result)
        for e in erase:
            func.erase_op(e)
        func.rename(fused.result, name)
        n += 1
    return n


def cleanup(func: Function) -> dict[str, int]:
    """Run every clean-up on ``func``; returns counts by kind."""
    counts = {"noop_casts": drop_noop_casts(func), "rms_norm": fuse_rms_norm(func)}
    counts["dead_ops"] = dce(func)
    return counts
