"""qir's own reader and writer of the safetensors file format, hardened against untrusted files.

File layout (the standard safetensors format)::

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  a UTF-8 JSON object: {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}, ...,
               "__metadata__": {"<key>": "<str value>", ...}}   (the metadata entry is optional)
    [rest]     the tensor bytes, little-endian, row-major; ``data_offsets`` count from the end of the header

Plain dtypes map to the standard names (``f64 F64, f32 F32, f16 F16, bf16 BF16, i64 I64, i32 I32,
i16 I16, i8 I8, u8 U8, bool BOOL``), so such files open with the official ``safetensors`` package.

Sub-byte integers (``i4``, ``u4``, ``i2``, ``u2``) have no safetensors dtype. They are stored PACKED as
``U8`` with the flat shape ``[nbytes]``, and ``__metadata__`` records the logical dtype and shape:
``qir.dtype.<name> = "i4"`` and ``qir.shape.<name> = "[1536,576]"``. The packing layout, which
backends follow too (see :func:`pack` / :func:`unpack`):

* the tensor is flattened row-major (C order);
* 4-bit: element ``2k`` goes to the low nibble (bits 0-3) of byte ``k``, element ``2k+1`` to the
  high nibble (bits 4-7);
* 2-bit: four elements per byte, element ``4k`` in bits 0-1 of byte ``k``, ``4k+1`` in bits 2-3,
  ``4k+2`` in bits 4-5 and ``4k+3`` in bits 6-7;
* signed values are two's complement within their field (``i4`` -1 is ``0xF``, ``i2`` -2 is ``0b10``);
* a short last byte is padded with zero bits, so a tensor takes ``ceil(numel * bits / 8)`` bytes.

Files written here sort the header keys (the JSON is compact and padded with spaces to a multiple of
8 bytes), place tensor data in order of decreasing element size and then name (so every tensor is
aligned to its element size), leave no gaps, and contain no timestamps: the same tensors always give
the same bytes. Files written by qir carry ``__metadata__["qir.format"] = "1"``.

Reading never trusts the file: the header length, JSON, keys, dtypes, names (``qir.graph.check_name``),
shapes and offsets are all checked, and the byte length every shape implies is compared with its
offsets before anything is allocated. Every problem is a :class:`~qir.errors.SerializationError`
that names the file. Tensor data is not read by :func:`read_header`; :class:`MappedTensor` maps it
with ``numpy.memmap`` when asked for.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qir.dtypes import DType, dtype
from qir.errors import QirError, SerializationError
from qir.graph import LazyArray, check_name

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header a file may declare; more is treated as a corrupt or hostile file."""

MAX_RANK = 64
"""Largest tensor rank accepted from a file."""

KEEP_MAPPED_BYTES = 1024 * 1024
"""A :class:`MappedTensor` of at most this many bytes keeps its map between ``numpy()`` calls; a larger one
maps afresh on each call so that its pages leave the resident set when the caller lets go of the array."""

FORMAT_KEY = "qir.format"
"""``__metadata__`` key that marks a file written by qir (value ``FORMAT_VERSION``)."""

FORMAT_VERSION = "1"

DTYPE_KEY_PREFIX = "qir.dtype."
SHAPE_KEY_PREFIX = "qir.shape."

_ST_NAMES: dict[str, str] = {
    "f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64", "i32": "I32",
    "i16": "I16", "i8": "I8", "u8": "U8", "bool": "BOOL",
}
_FROM_ST: dict[str, str] = {v: k for k, v in _ST_NAMES.items()}

# Byte-order-explicit numpy dtypes used on disk; bf16 and bool have a single byte order.
_DISK_NUMPY: dict[str, np.dtype] = {
    "f64": np.dtype("<f8"), "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i64": np.dtype("<i8"),
    "i32": np.dtype("<i4"), "i16": np.dtype("<i2"), "i8": np.dtype("i1"), "u8": np.dtype("u1"),
    "bool": np.dtype("u1"),
}


def st_dtype_name(dt: DType | str) -> str:
    """The safetensors dtype a qir dtype is stored as (``"U8"`` for packed sub-byte integers)."""
    d = dtype(dt)
    return "U8" if d.is_subbyte else _ST_NAMES[d.name]


def stored_nbytes(dt: DType | str, numel: int) -> int:
    """Bytes ``numel`` elements of ``dt`` take in a file (sub-byte elements packed)."""
    return (numel * dtype(dt).bits + 7) // 8


# ----------------------------------------------------------------------------------------------
# Sub-byte packing
# ----------------------------------------------------------------------------------------------

def _subbyte(dt: DType | str) -> DType:
    try:
        d = dtype(dt)
    except QirError as exc:
        raise SerializationError(str(exc)) from None
    if not d.is_subbyte or d.bits not in (2, 4):
        raise SerializationError(f"pack/unpack handle the sub-byte dtypes i4, u4, i2, u2, not {d.name}")
    return d


def pack(array: np.ndarray, dt: DType | str) -> np.ndarray:
    """Pack ``array`` (values of sub-byte dtype ``dt``) into a flat ``uint8`` array, row-major.

    ``array`` may hold ``ml_dtypes`` int4/uint4/int2/uint2 elements or any integers; values outside
    ``dt``'s range raise :class:`SerializationError`. See the module docstring for the bit layout.
    """
    d = _subbyte(dt)
    a = np.asarray(array)
    if a.dtype == d.numpy:
        vals = a.astype(np.int16).ravel()
    elif a.dtype.kind in "iub":
        vals = a.astype(np.int64).ravel()
    else:
        # Floats and the other ml_dtypes types are accepted when they hold whole numbers.
        try:
            as_float = a.astype(np.float64).ravel()
        except (TypeError, ValueError):
            raise SerializationError(f"cannot pack an array of {a.dtype} as {d.name}") from None
        if not np.all(np.isfinite(as_float)) or not np.array_equal(as_float, np.rint(as_float)):
            raise SerializationError(f"cannot pack non-integer values of {a.dtype} as {d.name}")
        vals = as_float.astype(np.int64)
    if vals.size and (int(vals.min()) < d.qmin or int(vals.max()) > d.qmax):
        raise SerializationError(f"values in [{int(vals.min())}, {int(vals.max())}] do not fit {d.name} "
                                 f"(range [{d.qmin}, {d.qmax}])")
    per = 8 // d.bits
    mask = (1 << d.bits) - 1
    fields = (vals & mask).astype(np.uint8)  # two's complement within the field
    pad = -fields.size % per
    if pad:
        fields = np.concatenate([fields, np.zeros(pad, dtype=np.uint8)])
    fields = fields.reshape(-1, per)
    out = fields[:, 0].copy()
    for j in range(1, per):  # at most 3 iterations, each over all bytes at once
        out |= fields[:, j] << np.uint8(j * d.bits)
    return out


def unpack(data: np.ndarray | bytes | memoryview, dt: DType | str, shape: Iterable[int]) -> np.ndarray:
    """Unpack bytes written by :func:`pack` into an array of ``shape`` with ``dt``'s ``ml_dtypes`` type.

    ``data`` must hold exactly ``ceil(prod(shape) * bits / 8)`` bytes; padding bits are ignored.
    """
    d = _subbyte(dt)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise SerializationError(f"cannot unpack into negative shape {list(shape)}")
    numel = math.prod(shape)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if raw.dtype != np.uint8:
        raise SerializationError(f"unpack needs uint8 bytes, got {raw.dtype}")
    need = stored_nbytes(d, numel)
    if raw.size != need:
        raise SerializationError(f"{d.name}{list(shape)} packs into {need} bytes, but {raw.size} were given")
    per = 8 // d.bits
    mask = np.uint8((1 << d.bits) - 1)
    fields = np.empty((raw.size, per), dtype=np.uint8)
    for j in range(per):
        fields[:, j] = (raw >> np.uint8(j * d.bits)) & mask
    flat = fields.reshape(-1)[:numel]
    if d.kind == "int":
        half = np.int8(1 << (d.bits - 1))
        signed = (flat.view(np.int8) ^ half) - half  # sign-extend the field
        return signed.astype(d.numpy).reshape(shape)
    return flat.astype(d.numpy).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: logical dtype and shape, and where its stored bytes lie in the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int
    """Stored bytes (packed for sub-byte dtypes)."""


@dataclass(frozen=True)
class Header:
    """The parsed, validated header of a safetensors file."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @property
    def written_by_qir(self) -> bool:
        return self.metadata.get(FORMAT_KEY) is not None


def _fail(path: str, message: str) -> SerializationError:
    return SerializationError(f"{path}: {message}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: str, head: bytes, file_size: int) -> Header:
    """Validate the header bytes ``head`` of a file of ``file_size`` bytes (``path`` only names it)."""
    try:
        obj = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "the safetensors header must be a JSON object")
    data_start = 8 + len(head)
    data_size = file_size - data_start
    meta_raw = obj.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if meta_raw is not None:
        if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
            raise _fail(path, "__metadata__ must map strings to strings")
        metadata = dict(meta_raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            check_name(name, "tensor name")
        except QirError as exc:
            raise _fail(path, str(exc)) from None
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: entry must be an object with dtype, shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise _fail(path, f"tensor {name!r}: missing key(s) {', '.join(missing)}")
        extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
        if extra:
            raise _fail(path, f"tensor {name!r}: unknown key(s) {', '.join(extra)}")
        st_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(st_name, str) or st_name not in _FROM_ST:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {st_name!r} "
                              f"(supported: {', '.join(sorted(_FROM_ST))})")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_int(s) and s >= 0 for s in shape)):
            raise _fail(path, f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative ints, "
                              f"got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"got {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise _fail(path, f"tensor {name!r}: data_offsets {offsets} run past the end of the data "
                              f"({data_size} bytes; the file may be truncated)")
        d = dtype(_FROM_ST[st_name])
        numel = math.prod(shape)  # Python ints: no overflow, nothing allocated
        if end - begin != numel * d.numpy.itemsize:
            raise _fail(path, f"tensor {name!r}: {st_name}{shape} needs {numel * d.numpy.itemsize} bytes "
                              f"but data_offsets {offsets} give {end - begin}")
        tensors[name] = TensorInfo(name, d, tuple(shape), data_start + begin, end - begin)
    _check_overlaps(path, tensors)
    return Header(path, _apply_subbyte_metadata(path, tensors, metadata), metadata, data_start, file_size)


def _check_overlaps(path: str, tensors: Mapping[str, TensorInfo]) -> None:
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _fail(path, f"tensors {prev!r} and {name!r} have overlapping data_offsets")


def _apply_subbyte_metadata(path: str, tensors: dict[str, TensorInfo],
                            metadata: Mapping[str, str]) -> dict[str, TensorInfo]:
    out = dict(tensors)
    for key, value in metadata.items():
        if not key.startswith(DTYPE_KEY_PREFIX):
            continue
        name = key[len(DTYPE_KEY_PREFIX):]
        info = tensors.get(name)
        if info is None:
            raise _fail(path, f"__metadata__ {key!r} describes a tensor that is not in the file")
        try:
            d = dtype(value)
        except QirError:
            d = None
        if d is None or not d.is_subbyte:
            raise _fail(path, f"__metadata__ {key!r}: {value!r} is not a sub-byte dtype (i4, u4, i2, u2)")
        shape_text = metadata.get(SHAPE_KEY_PREFIX + name)
        if shape_text is None:
            raise _fail(path, f"__metadata__ has {key!r} but no {SHAPE_KEY_PREFIX + name!r}")
        try:
            shape = json.loads(shape_text)
        except ValueError:
            shape = None
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_int(s) and s >= 0 for s in shape)):
            raise _fail(path, f"__metadata__ {SHAPE_KEY_PREFIX + name!r}: {shape_text!r} is not a list of "
                              f"non-negative ints")
        need = stored_nbytes(d, math.prod(shape))
        if info.dtype.name != "u8" or len(info.shape) != 1 or info.nbytes != need:
            raise _fail(path, f"tensor {name!r}: {d.name}{shape} is stored packed as U8[{need}], "
                              f"but the file has {info.dtype.name}{list(info.shape)}")
        out[name] = TensorInfo(name, d, tuple(shape), info.offset, info.nbytes)
    for key in metadata:
        if key.startswith(SHAPE_KEY_PREFIX) and DTYPE_KEY_PREFIX + key[len(SHAPE_KEY_PREFIX):] not in metadata:
            raise _fail(path, f"__metadata__ has {key!r} but no matching {DTYPE_KEY_PREFIX}... entry")
    return out


def read_header(path: str | os.PathLike[str], fp: BinaryIO | None = None) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (reads no tensor data).

    ``fp``, when given, is an open binary file of ``path`` to read from instead of opening it.
    """
    spath = str(path)
    try:
        if fp is None:
            with open(spath, "rb") as f:
                return _read_header(spath, f)
        return _read_header(spath, fp)
    except OSError as exc:
        raise _fail(spath, f"cannot read: {exc.strerror or exc}") from None


def _read_header(spath: str, f: BinaryIO) -> Header:
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    first = f.read(8)
    if len(first) < 8:
        raise _fail(spath, f"file is {size} bytes, too short for a safetensors header (needs 8+)")
    n = int.from_bytes(first, "little")
    if n > MAX_HEADER_BYTES:
        raise _fail(spath, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)")
    if 8 + n > size:
        raise _fail(spath, f"header length {n} is larger than the file ({size} bytes; truncated?)")
    head = f.read(n)
    if len(head) != n:
        raise _fail(spath, "file shrank while its header was read")
    return parse_header(spath, head, size)


class _OpenFile:
    """A read-only file descriptor shared by the lazy tensors of one file; closed when they all go.

    Mapping through a descriptor opened at load time keeps reading the loaded file even after a
    later save renames a new file over its path.
    """

    def __init__(self, path: str, fp: BinaryIO) -> None:
        self.path = path
        self.fd = os.dup(fp.fileno())
        weakref.finalize(self, os.close, self.fd)


class MappedTensor:
    """A tensor in a safetensors file, read only when :meth:`numpy` is called.

    ``shape`` and ``dtype`` (the numpy dtype of the logical elements, e.g. ``ml_dtypes.int4``)
    describe the tensor; ``nbytes`` is the number of bytes it takes in the file (packed for sub-byte
    dtypes). ``numpy()`` maps the region read-only with ``numpy.memmap``; plain dtypes come back as
    that read-only map, sub-byte ones unpacked into a new array.
    """

    __slots__ = ("info", "_file", "_mapped")

    def __init__(self, info: TensorInfo, file: _OpenFile) -> None:
        self.info = info
        self._file = file
        self._mapped: np.ndarray | None = None  # the read-only map of a plain tensor, made once

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def qir_dtype(self) -> DType:
        return self.info.dtype

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype.numpy

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def numpy(self) -> np.ndarray:
        if self._mapped is not None:
            return self._mapped
        info = self.info
        d = info.dtype
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=d.numpy)
        size = os.fstat(self._file.fd).st_size
        if info.offset + info.nbytes > size:
            raise _fail(self.path, f"tensor {info.name!r} lies past the end of the file, which was truncated "
                                   "after it was opened")
        disk = np.dtype(np.uint8) if d.is_subbyte else _DISK_NUMPY.get(d.name, d.numpy)
        count = info.nbytes // disk.itemsize
        with open(self._file.fd, "rb", closefd=False) as f:
            raw = np.memmap(f, dtype=disk, mode="r", offset=info.offset, shape=(count,))
        if d.is_subbyte:
            return unpack(raw, d, info.shape)
        if d.name == "bool":
            return (raw != 0).reshape(info.shape)
        arr = np.asarray(raw).reshape(info.shape)  # a plain read-only ndarray view of the map
        if arr.dtype != d.numpy:  # only on big-endian hosts: '<f4' is float32 elsewhere
            return arr.astype(d.numpy)
        # Unpacked sub-byte copies are never kept, as they would double a model's resident size. A map
        # costs nothing until touched, but touched pages stay resident while it lives: small maps are kept
        # (reused by every interpreter run), large ones are dropped with the caller's last reference, so a
        # pass that reads a 7B model's weights one at a time holds one weight's pages, not all of them
        # (with a 64 MB threshold a 7B model's 128 attention projections of 32 MB alone held 4.3 GB).
        # Mapping afresh costs a system call and minor page faults, ~1 ms per 32 MB.
        if info.nbytes <= KEEP_MAPPED_BYTES:
            self._mapped = arr
        return arr

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        arr = self.numpy()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return np.array(arr) if copy else arr

    def __repr__(self) -> str:
        return f"<MappedTensor {self.name!r} {self.info.dtype.name}{list(self.shape)} in {self.path}>"


def open_tensors(path: str | os.PathLike[str]) -> tuple[Header, dict[str, MappedTensor]]:
    """Validate the file at ``path`` and return its header and one lazy :class:`MappedTensor` per tensor."""
    spath = str(path)
    try:
        with open(spath, "rb") as f:
            header = _read_header(spath, f)
            shared = _OpenFile(spath, f)
    except OSError as exc:
        raise _fail(spath, f"cannot read: {exc.strerror or exc}") from None
    return header, {name: MappedTensor(info, shared) for name, info in header.tensors.items()}


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of the file at ``path`` into memory (a convenience for tests and tools)."""
    _, mapped = open_tensors(path)
    return {name: np.array(t.numpy()) for name, t in mapped.items()}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

TensorData = np.ndarray | LazyArray
"""Data given to :func:`write`: an array, or a lazy object whose ``numpy()`` is called only while writing."""


def _shape_of(name: str, data: TensorData) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in data.shape)
    except (AttributeError, TypeError, ValueError):
        raise SerializationError(f"tensor {name!r}: data has no static shape ({data!r})") from None


def _stored_bytes(name: str, dt: DType, data: TensorData) -> np.ndarray:
    """The flat little-endian bytes (as uint8) of one tensor, read from ``data`` now."""
    shape = _shape_of(name, data)
    a = data if isinstance(data, np.ndarray) else np.asarray(data.numpy())
    if tuple(a.shape) != shape:
        raise SerializationError(f"tensor {name!r}: data has shape {list(a.shape)}, expected {list(shape)}")
    if dt.is_subbyte:
        try:
            return pack(a, dt)
        except SerializationError as exc:
            raise SerializationError(f"tensor {name!r}: {exc}") from None
    if a.dtype != dt.numpy:
        raise SerializationError(f"tensor {name!r}: data has numpy dtype {a.dtype}, expected {dt.numpy} for {dt.name}")
    disk = _DISK_NUMPY.get(dt.name)
    if disk is not None:
        a = a.astype(disk, copy=False)
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def write(fp: BinaryIO, tensors: Mapping[str, tuple[DType | str, TensorData]],
          metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (name -> (qir dtype, data of that dtype)) to the open binary file ``fp``.

    The header is built from shapes alone; each tensor's data is read (``numpy()`` for lazy data),
    checked, packed and written one at a time, so saving needs memory for one tensor, not all.
    Sub-byte tensors are packed and described in ``__metadata__``; ``metadata`` adds other string
    entries (keys starting with ``qir.`` are reserved). Output is deterministic (see the module
    docstring). Returns the number of bytes written.
    """
    meta: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SerializationError(f"metadata must map str to str, got {k!r}: {v!r}")
        if k.startswith("qir."):
            raise SerializationError(f"metadata key {k!r}: keys starting with 'qir.' are reserved")
        meta[k] = v
    meta[FORMAT_KEY] = FORMAT_VERSION
    planned: list[tuple[int, str, DType, TensorData, int]] = []
    for name, (dt_, data) in tensors.items():
        try:
            check_name(name, "tensor name")
            d = dtype(dt_)
        except QirError as exc:
            raise SerializationError(str(exc)) from None
        shape = _shape_of(name, data)
        if d.is_subbyte:
            meta[DTYPE_KEY_PREFIX + name] = d.name
            meta[SHAPE_KEY_PREFIX + name] = "[" + ",".join(str(s) for s in shape) + "]"
        itemsize = 1 if d.is_subbyte else d.numpy.itemsize
        planned.append((itemsize, name, d, data, stored_nbytes(d, math.prod(shape))))
    # Larger elements first keeps every tensor aligned to its element size (the header is 8-aligned).
    planned.sort(key=lambda p: (-p[0], p[1]))
    header: dict[str, object] = {"__metadata__": meta}
    pos = 0
    for _, name, d, data, nbytes in planned:
        stored_shape = [nbytes] if d.is_subbyte else list(_shape_of(name, data))
        header[name] = {"dtype": st_dtype_name(d), "shape": stored_shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    head += b" " * (-len(head) % 8)
    fp.write(len(head).to_bytes(8, "little"))
    fp.write(head)
    for _, name, d, data, nbytes in planned:
        raw = _stored_bytes(name, d, data)
        if raw.size != nbytes:  # pragma: no cover - guarded by the shape check in _stored_bytes
            raise SerializationError(f"tensor {name!r}: {raw.size} bytes of data, {nbytes} planned")
        if nbytes:
            fp.write(memoryview(raw))
    return 8 + len(head) + pos


def save_file(path: str | os.PathLike[str], tensors: Mapping[str, tuple[DType | str, TensorData]],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to a new file at ``path`` (not atomic; :func:`qir.serialize.save` is)."""
    p = Path(path)
    try:
        with open(p, "wb") as f:
            write(f, tensors, metadata)
    except OSError as exc:
        raise _fail(str(p), f"cannot write: {exc.strerror or exc}") from None
