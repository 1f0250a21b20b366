"""Validate a ``.gguf`` file's header before any GGUF reader (``gguf``, transformers) trusts it.

The GGUF layout (versions 2 and 3, little-endian)::

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x   (string key, u32 value_type, value)       string = u64 length + UTF-8 bytes
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then the tensor data; offsets count from there

:func:`check_gguf` walks that header with reads whose sizes it checks against the bytes left in the file
and against :mod:`qir.limits` before reading, so a hostile count or length fails at once. It checks the magic,
the version, counts, key and name lengths and encodings, value types, array lengths, tensor ranks and
element counts, known ggml types, offsets and sizes (each tensor inside the file, none overlapping) and the
alignment. Every problem is a :class:`GGUFError` naming the file and, where there is one, the key or tensor.
Nothing is executed or unpickled: GGUF holds no code.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from qir.errors import QirError
from qir.limits import MAX_ARRAY_ITEMS, MAX_STRING_BYTES, MAX_TENSORS, shape_problem

__all__ = ["GGUFError", "GGUFHeader", "GGUFTensor", "check_gguf"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_KV = 1 << 20
MAX_DIMS = 8  # ggml has 4; a little slack for future formats

# value_type -> struct format of a scalar (strings and arrays are handled apart)
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(QirError):
    """A ``.gguf`` file that is malformed or declares more than qir accepts (names the file and what)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's header entry."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    """Absolute byte offset in the file."""
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """The validated header: version, metadata keys and tensors."""

    version: int
    keys: tuple[str, ...]
    tensors: tuple[GGUFTensor, ...]
    data_start: int


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (elements per block, bytes per block), from the ``gguf`` package when installed."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # the common types, enough to check the files qir itself is given
        return {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
                24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


class _Reader:
    def __init__(self, path: str, f: BinaryIO, size: int) -> None:
        self.path = path
        self.f = f
        self.size = size
        self.pos = 0

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n:,} bytes but only {self.size - self.pos:,} are "
                            "left (truncated or corrupt file)")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"file shrank while {what} was read")
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING_BYTES:
            raise self.fail(f"{what} claims {n:,} bytes, more than the limit of {MAX_STRING_BYTES:,}")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> int | float | bool | str | None:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 2:
                raise self.fail(f"{what}: arrays nested more than 2 deep")
            itype = self.u32(f"the item type of {what}")
            count = self.u64(f"the length of {what}")
            if count > MAX_ARRAY_ITEMS:
                raise self.fail(f"{what} claims {count:,} items, more than the limit of {MAX_ARRAY_ITEMS:,}")
            if itype in _SCALARS:
                # Fixed-size items: one bounded read instead of a Python loop over millions of numbers.
                self.read(count * struct.calcsize(_SCALARS[itype]), what)
                return None
            if itype not in (_STRING, _ARRAY):
                raise self.fail(f"{what}: unknown array item type {itype}")
            for i in range(count):
                self.skip_value(itype, f"{what}[{i}]", depth + 1)
            return None
        raise self.fail(f"{what}: unknown value type {vtype}")


def check_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Validate the header of the GGUF file at ``path`` (reads no tensor data); raise :class:`GGUFError`."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            return _check(_Reader(p, f, os.fstat(f.fileno()).st_size))
    except OSError as exc:
        raise GGUFError(f"{p}: cannot read: {exc.strerror or exc}") from None


def _check(r: _Reader) -> GGUFHeader:
    if r.size < 24:
        raise r.fail(f"file is {r.size} bytes, too short for a GGUF header (24+)")
    magic = r.read(4, "the magic")
    if magic != MAGIC:
        raise r.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    version = r.u32("the version")
    if version not in VERSIONS:
        raise r.fail(f"GGUF version {version} is not supported (supported: {', '.join(map(str, VERSIONS))}; a "
                     "big-endian file reads as a huge version)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    if n_tensors > MAX_TENSORS:
        raise r.fail(f"header claims {n_tensors:,} tensors, more than the limit of {MAX_TENSORS:,}")
    if n_kv > MAX_KV:
        raise r.fail(f"header claims {n_kv:,} metadata entries, more than the limit of {MAX_KV:,}")
    keys: list[str] = []
    alignment = 32
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if key in keys:
            raise r.fail(f"metadata key {key!r} appears twice")
        vtype = r.u32(f"the value type of {key!r}")
        value = r.skip_value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4 or not isinstance(value, int) or value == 0 or value & (value - 1):
                raise r.fail(f"general.alignment must be a u32 power of two, got {value!r}")
            alignment = value
        keys.append(key)
    sizes = _quant_sizes()
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"the name of tensor #{i}")
        if name in names:
            raise r.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"the rank of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise r.fail(f"tensor {name!r} claims {n_dims} dimensions, more than the limit of {MAX_DIMS}")
        shape = tuple(r.u64(f"a size of tensor {name!r}") for _ in range(n_dims))
        problem = shape_problem(shape)
        if problem:
            raise r.fail(f"tensor {name!r}: {problem}")
        ggml_type = r.u32(f"the type of tensor {name!r}")
        if ggml_type not in sizes:
            raise r.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        offset = r.u64(f"the offset of tensor {name!r}")
        raw.append((name, shape, ggml_type, offset))
    data_start = -(-r.pos // alignment) * alignment
    tensors: list[GGUFTensor] = []
    for name, shape, ggml_type, offset in raw:
        block, block_bytes = sizes[ggml_type]
        numel = 1
        for d in shape:
            numel *= d
        if shape and shape[0] % block:
            raise r.fail(f"tensor {name!r}: its first size {shape[0]} is not a multiple of the block size {block} "
                         f"of its ggml type {ggml_type}")
        nbytes = numel // block * block_bytes
        if offset % alignment:
            raise r.fail(f"tensor {name!r}: offset {offset} is not aligned to {alignment}")
        end = data_start + offset + nbytes
        if end > r.size:
            raise r.fail(f"tensor {name!r} ({list(shape)}, {nbytes:,} bytes at offset {offset:,}) runs past the end "
                         f"of the file ({r.size:,} bytes; truncated or corrupt)")
        tensors.append(GGUFTensor(name, shape, ggml_type, data_start + offset, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise r.fail(f"tensors {prev!r} and {name!r} overlap")
    return GGUFHeader(version, tuple(keys), tuple(tensors), data_start)

