"""Keep a GGUF model's own quantization: swap the traced float weights for the file's blocks, losslessly.

The importer traces the transformers model that ``gguf`` dequantized (:mod:`qir.models.zoo`), so every weight
constant ``@hf.<name>`` holds exactly ``gguf.quants.dequantize`` of one GGUF tensor. :func:`keep_gguf_quantization`
reads the same file again and, for each quantized tensor:

1. finds its constant: GGUF name -> Hugging Face name through ``gguf``'s own tensor-name map (the map transformers
   uses), ``output.weight`` falling back to ``token_embd.weight`` for a tied head;
2. decodes its blocks with :func:`qir.gguf_blocks.decode_blocks` (codes, scales, minimums from the bytes);
3. undoes llama.cpp's Q/K head permutation for ``attn_q``/``attn_k`` (whole rows move, so blocks stay intact);
4. checks that the decoded weight dequantizes to the traced float constant **bit for bit** -- a wrong name, a
   wrong permutation or a decoder bug stops the import instead of giving a subtly different model;
5. replaces the constant (same name) and rewrites its users: ``linear`` -> ``qmatmul`` (weight-only),
   ``embedding`` -> ``qembedding``. A tied table becomes one quantized constant read by both.

F32/F16/BF16 tensors (norms) stay float; a quantized GGUF type qir has no decoder for is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.gguf_blocks import SUPPORTED, BlockWeight, GGUFFormatError, decode_blocks
from qir.graph import Function, Module, Op
from qir.quant import QTensor

__all__ = ["FLOAT_TYPES", "KeepReport", "dequantize_block_weight", "keep_gguf_quantization"]

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class KeepReport:
    """What :func:`keep_gguf_quantization` did: constant name -> GGUF type, and what it left float and why."""

    kept: dict[str, str] = field(default_factory=dict)
    float_tensors: list[str] = field(default_factory=list)
    left_float: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.kept.values():
            counts[t] = counts.get(t, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        return f"kept {len(self.kept)} GGUF-quantized weights ({kinds}); {len(self.float_tensors)} float tensors"


def dequantize_block_weight(bw: BlockWeight) -> np.ndarray:
    """The f32 values a decoded weight stands for, with the interpreter's arithmetic (two-level parameters too)."""

    def real(name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        arr, t = bw.constants[name]
        if t.quant is None:
            return np.asarray(arr, dtype=np.float32)
        assert isinstance(t.quant.scale, str)
        return QTensor(arr, real(t.quant.scale), None, t.quant, real(t.quant.offset)).dequantize()

    spec = bw.type.quant
    assert spec is not None and isinstance(spec.scale, str)
    return QTensor(bw.codes, real(spec.scale), None, spec, real(spec.offset)).dequantize()


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode()


def _field_int(reader: Any, key: str) -> int | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return int(f.parts[f.data[0]][0])


def _hf_to_gguf_names(module: Module, reader: Any) -> dict[str, str]:
    """Constant name -> GGUF tensor name for every 2-D float constant that has a GGUF tensor."""
    import gguf

    arch_name = _field_str(reader, "general.architecture") or "llama"
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise GGUFFormatError(f"GGUF architecture {arch_name!r} is unknown to the installed gguf package")
    blocks = _field_int(reader, f"{arch_name}.block_count") or 0
    name_map = gguf.get_tensor_name_map(arch, blocks)
    in_file = {t.name for t in reader.tensors}
    out: dict[str, str] = {}
    for cname, c in module.constants.items():
        if c.type.quant is not None or c.type.rank != 2 or not c.type.dtype.is_float:
            continue
        hf = cname[3:] if cname.startswith("hf.") else cname
        base, dot, suffix = hf.rpartition(".")
        if not dot:
            continue
        g = name_map.get_name(base)
        if g is None:
            continue
        gname = f"{g}.{suffix}"
        if gname not in in_file and g == "output" and f"token_embd.{suffix}" in in_file:
            gname = f"token_embd.{suffix}"  # tied head: the file holds only the embedding table
        if gname in in_file:
            out[cname] = gname
    return out


def _head_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order transformers gives attn_q/attn_k (``_reverse_permute_weights``) as an index array."""
    dim = rows // n_head // 2
    return np.arange(rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)


def _candidates(gname: str, rows: int, reader: Any) -> list[np.ndarray | None]:
    """Row orders to try: as stored, and for Q/K projections the llama head permutation undone."""
    arch = _field_str(reader, "general.architecture") or "llama"
    heads = _field_int(reader, f"{arch}.attention.head_count")
    kv = _field_int(reader, f"{arch}.attention.head_count_kv") or heads
    out: list[np.ndarray | None] = [None]
    if heads and ".attn_q." in gname and rows % (2 * heads) == 0:
        out.insert(0, _head_permutation(rows, heads))
    elif kv and ".attn_k." in gname and rows % (2 * kv) == 0:
        out.insert(0, _head_permutation(rows, kv))
    return out


def keep_gguf_quantization(module: Module, gguf_path: str | Path) -> KeepReport:
    """Replace ``module``'s weights traced from ``gguf_path`` by the file's quantized blocks (see the docstring).

    Raises :class:`~qir.gguf_blocks.GGUFFormatError` for a quantized type qir cannot keep (naming the tensor and the
    type) and :class:`QirError` when a decoded weight does not reproduce the traced one bit for bit.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise QirError("keeping GGUF quantization needs the gguf package: python -m pip install gguf") from None
    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    report = KeepReport()
    for t in reader.tensors:
        tname = t.tensor_type.name
        if tname in FLOAT_TYPES:
            report.float_tensors.append(t.name)
        elif tname not in SUPPORTED:
            raise GGUFFormatError(f"{gguf_path}: tensor {t.name} has GGUF type {tname}, which qir cannot keep "
                                  f"quantized (it keeps {', '.join(SUPPORTED)}; F32/F16/BF16 stay float); import "
                                  f"without --keep-quantized to dequantize it")
    for cname, gname in _hf_to_gguf_names(module, reader).items():
        t = tensors[gname]
        tname = t.tensor_type.name
        if tname in FLOAT_TYPES:
            continue
        c = module.constant(cname)
        users = [(op, i) for op, i in c.uses]
        other = [op.opcode for op, i in users if not ((op.opcode == "linear" and i == 1)
                                                       or (op.opcode == "embedding" and i == 0))]
        if other:
            report.left_float[cname] = f"also read by {', '.join(sorted(set(other)))}"
            continue
        rows, cols = (int(d) for d in c.type.shape)
        bw = decode_blocks(t.data, tname, (rows, cols), cname)
        want = np.asarray(c.numpy(), dtype=np.float32)
        chosen = _match(bw, want, _candidates(gname, rows, reader))
        if chosen is None:
            raise QirError(f"GGUF tensor {gname} ({tname}) decoded into {cname} does not reproduce the traced float "
                           f"weight bit for bit; refusing to keep it quantized")
        _swap(module, cname, chosen)
        report.kept[cname] = tname
    return report


def _match(bw: BlockWeight, want: np.ndarray, orders: list[np.ndarray | None]) -> BlockWeight | None:
    for rows in orders:
        cand = bw if rows is None else bw.take_rows(rows)
        got = dequantize_block_weight(cand)
        if got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            return cand
    return None


def _swap(module: Module, cname: str, bw: BlockWeight) -> None:
    """Replace float ``@cname`` by the quantized weight (same name) and rewrite its linear/embedding users."""
    old = module.constant(cname)
    tmp = module.fresh_constant_name(f"{cname}.gguf")
    for pname, (arr, t) in bw.constants.items():
        module.add_constant(pname, arr, type=t, after=cname)
    module.add_constant(tmp, bw.codes, type=bw.type, after=cname)
    new = module.constant(tmp)
    for op, _ in list(old.uses):
        func = op.parent or _owner(module, op)
        if op.opcode == "linear":
            func.replace_op(op, "qmatmul", [op.operands[0], new, *op.operands[2:]])
        else:
            func.replace_op(op, "qembedding", [new, op.operands[1]])
    module.remove_constant(cname)
    module.rename_constant(tmp, cname)


def _owner(module: Module, op: Op) -> Function:
    for func in module.functions.values():
        if any(o is op for o in func.ops):
            return func
    raise QirError(f"op {op.opcode} belongs to no function of @{module.name}")  # a bug


