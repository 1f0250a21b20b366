"""llama.cpp GGUF block formats as qir quantized types, decoded from the file's bytes with no loss.

:func:`decode_blocks` turns the raw bytes of one GGUF tensor (``uint8 [rows, bytes_per_row]``) into integer
codes plus the constants of a :class:`~qir.quantspec.QuantSpec` that dequantizes them exactly as
``gguf.quants.dequantize`` does (same f32 products and sums, bit for bit). Nothing is re-quantized: every code,
scale and minimum is read from the blocks. Weights are ``[rows, cols]`` with blocks along ``cols`` (GGUF's
``ne0``), so every spec is ``axis=1, group=<block>``.

==========  =====================================  ==================================================================
GGUF type   qir codes                              parameters (``w`` = the weight's constant name)
==========  =====================================  ==================================================================
Q8_0        ``i8`` (``x = d*q``)                   ``@w.scale : f16[r, c/32]``
Q4_0        ``i4`` = nibble - 8 (``x = d*(q-8)``)  ``@w.scale : f16[r, c/32]``
Q4_1        ``u4`` (``x = d*q + m``)               ``@w.scale``, ``offset=@w.min : f16[r, c/32]``
Q5_0        ``i8`` holding q - 16 in [-16, 15]     ``@w.scale : f16[r, c/32]``
Q5_1        ``u8`` holding q in [0, 31]            ``@w.scale``, ``offset=@w.min : f16[r, c/32]``
Q4_K        ``u4``; 8 sub-blocks of 32 per 256     two-level: ``@w.scale : u8[r, c/32] q(axis=1, group=8,
                                                   scale=@w.scale.d)`` (6-bit ``sc``), ``@w.scale.d : f16[r, c/256]``;
                                                   ``offset=@w.min : u8[r, c/32] q(axis=1, group=8,
                                                   scale=@w.min.d)`` (6-bit ``mn``), ``@w.min.d = -dmin : f16``
Q5_K        ``u8`` holding q in [0, 31]            as Q4_K
Q6_K        ``i8`` holding q - 32 in [-32, 31];    ``@w.scale : i8[r, c/16] q(axis=1, group=16, scale=@w.scale.d)``,
            16 sub-blocks of 16 per 256            ``@w.scale.d : f16[r, c/256]``
==========  =====================================  ==================================================================

Why these choices: Q4_0's offset 8 makes its codes exactly ``i4`` (no zero-point constant needed); K-quant
minimums are stored with the fp16 ``-dmin`` as their scale so that ``x = d*sc*q + (-dmin)*mn`` equals GGUF's
``d*sc*q - dmin*mn`` exactly (negation is exact). qir has no 5- or 6-bit dtypes yet, so Q5_x/Q5_K/Q6_K codes and
the K-quants' 6-bit sub-scales are stored one per byte: lossless, but 3-4 bits per element more than the file.
GGUF scales may be negative or zero (Q4_0's ``d = max/-8``), which qir allows on constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qir.dtypes import dtype
from qir.errors import QirError
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["SUPPORTED", "BlockWeight", "GGUFFormatError", "decode_blocks"]

QK_K = 256

#: GGUF type name -> (elements per block, bytes per block)
SUPPORTED: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


class GGUFFormatError(QirError):
    """A GGUF tensor qir cannot keep quantized (unknown type, a shape that does not fit its blocks)."""


@dataclass(frozen=True)
class BlockWeight:
    """A decoded GGUF tensor: codes of ``type`` plus the parameter constants its spec names (name -> data, type)."""

    codes: np.ndarray
    type: TensorType
    constants: dict[str, tuple[np.ndarray, TensorType]]

    def take_rows(self, rows: np.ndarray) -> BlockWeight:
        """The same weight with its rows reordered (llama.cpp's Q/K head permutation moves whole rows)."""
        consts = {}
        for name, (arr, t) in self.constants.items():
            consts[name] = (arr[rows], t)
        return BlockWeight(self.codes[rows], self.type, consts)


def _f16(raw: np.ndarray) -> np.ndarray:
    """``[n, 2]`` bytes -> ``[n]`` float16 (little-endian, as GGUF stores them)."""
    return np.ascontiguousarray(raw).view("<f2").reshape(raw.shape[:-1]).astype(np.float16)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """``[n, chunks*width]`` bytes -> ``[n, chunks*2*width]``: per chunk, the low nibbles then the high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0/Q5_1: ``[n, 4]`` bytes (a little-endian u32) -> ``[n, count]`` bit i of the word for element i."""
    word = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((word >> np.arange(count, dtype=np.uint32).reshape(1, count)) & np.uint32(1)).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes per super-block -> 8 six-bit scales and 8 six-bit minimums (``get_scale_min``)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def decode_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int], name: str) -> BlockWeight:
    """Decode the bytes of a GGUF tensor of ``type_name`` and logical ``shape = (rows, cols)``.

    ``raw`` holds ``rows * cols / block * bytes_per_block`` bytes (any shape). ``name`` is the weight constant's
    name; the parameter constants are named ``name.scale``, ``name.min``, ``name.scale.d``, ``name.min.d``.
    Raises :class:`GGUFFormatError` for a type qir cannot keep (naming it) or a size that does not fit.
    """
    if type_name not in SUPPORTED:
        raise GGUFFormatError(f"GGUF tensor type {type_name} cannot be kept quantized (qir keeps "
                              f"{', '.join(SUPPORTED)}; F32/F16/BF16 stay float); import without --keep-quantized "
                              f"to dequantize it")
    bs, nbytes = SUPPORTED[type_name]
    rows, cols = int(shape[0]), int(shape[1])
    if cols % bs:
        raise GGUFFormatError(f"{name}: a {type_name} row of {cols} elements is not a whole number of {bs}-blocks")
    nb = cols // bs
    blocks = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8)).reshape(-1)
    if blocks.size != rows * nb * nbytes:
        raise GGUFFormatError(f"{name}: {type_name}[{rows},{cols}] needs {rows * nb * nbytes} bytes, got {blocks.size}")
    blocks = blocks.reshape(rows * nb, nbytes)
    decoder = _DECODERS[type_name]
    return decoder(blocks, rows, cols, name)


def _simple(codes: np.ndarray, dt: str, d: np.ndarray, m: np.ndarray | None, rows: int, cols: int,
            name: str) -> BlockWeight:
    """Blocks of 32 with an fp16 scale (and an fp16 minimum added after scaling)."""
    nb = cols // 32
    sname, mname = f"{name}.scale", f"{name}.min"
    spec = QuantSpec(axis=1, group_size=32, scale=sname, offset=mname if m is not None else None)
    consts = {sname: (d.reshape(rows, nb), TensorType.of("f16", [rows, nb]))}
    if m is not None:
        consts[mname] = (m.reshape(rows, nb), TensorType.of("f16", [rows, nb]))
    q = codes.reshape(rows, cols).astype(dtype(dt).numpy)
    return BlockWeight(q, TensorType.of(dt, [rows, cols], spec), consts)


def _q8_0(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    return _simple(blocks[:, 2:].view(np.int8), "i8", _f16(blocks[:, :2]), None, rows, cols, name)


def _q4_0(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    q = _nibbles(blocks[:, 2:], 16).astype(np.int8) - np.int8(8)
    return _simple(q, "i4", _f16(blocks[:, :2]), None, rows, cols, name)


def _q4_1(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    q = _nibbles(blocks[:, 4:], 16)
    return _simple(q, "u4", _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), rows, cols, name)


def _q5_0(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    q = (_nibbles(blocks[:, 6:], 16) | (_high_bits(blocks[:, 2:6], 32) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return _simple(q, "i8", _f16(blocks[:, :2]), None, rows, cols, name)


def _q5_1(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    q = _nibbles(blocks[:, 8:], 16) | (_high_bits(blocks[:, 4:8], 32) << np.uint8(4))
    return _simple(q, "u8", _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), rows, cols, name)


def _two_level(codes: np.ndarray, dt: str, d: np.ndarray, sc: np.ndarray, sc_dt: str, sub: int,
               dmin: np.ndarray | None, mn: np.ndarray | None, rows: int, cols: int, name: str) -> BlockWeight:
    """K-quants: codes in sub-blocks of ``sub``; integer sub-scales (and minimums) against fp16 per 256."""
    nsub, nsup = cols // sub, cols // QK_K
    per = QK_K // sub
    sname, mname = f"{name}.scale", f"{name}.min"
    spec = QuantSpec(axis=1, group_size=sub, scale=sname, offset=mname if mn is not None else None)
    consts: dict[str, tuple[np.ndarray, TensorType]] = {}
    sspec = QuantSpec(axis=1, group_size=per, scale=f"{sname}.d")
    consts[sname] = (sc.reshape(rows, nsub).astype(dtype(sc_dt).numpy), TensorType.of(sc_dt, [rows, nsub], sspec))
    consts[f"{sname}.d"] = (d.reshape(rows, nsup), TensorType.of("f16", [rows, nsup]))
    if mn is not None and dmin is not None:
        mspec = QuantSpec(axis=1, group_size=per, scale=f"{mname}.d")
        consts[mname] = (mn.reshape(rows, nsub).astype(np.uint8), TensorType.of("u8", [rows, nsub], mspec))
        consts[f"{mname}.d"] = ((-dmin).reshape(rows, nsup).astype(np.float16), TensorType.of("f16", [rows, nsup]))
    q = codes.reshape(rows, cols).astype(dtype(dt).numpy)
    return BlockWeight(q, TensorType.of(dt, [rows, cols], spec), consts)


def _q4_k(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:], 32)
    return _two_level(q, "u4", d, sc, "u8", 32, dmin, mn, rows, cols, name)


def _q5_k(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qh = (qh & np.uint8(1)).reshape(n, QK_K)
    q = _nibbles(blocks[:, 48:], 32) | (qh << np.uint8(4))
    return _two_level(q, "u8", d, sc, "u8", 32, dmin, mn, rows, cols, name)


def _q6_k(blocks: np.ndarray, rows: int, cols: int, name: str) -> BlockWeight:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128], 64).reshape(n, -1, 32)
    qh = blocks[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, -1, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    sc = blocks[:, 192:208].view(np.int8)
    d = _f16(blocks[:, 208:210])
    return _two_level(q.reshape(n, QK_K), "i8", d, sc, "i8", 16, None, None, rows, cols, name)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
