"""Saving and loading modules: canonical ``.qir`` text plus a ``.safetensors`` file of weights beside it.

``save(module, "model.qir")`` writes the text from :func:`qir.printer.print_module` and, when any
constant is stored as ``blob`` (anything the printer does not inline), ``model.safetensors`` with one
tensor per blob constant under the constant's name (sub-byte tensors packed, see
:mod:`qir.safetensors_io`). Both files are written to temporary names in the destination folder,
fsynced and then renamed over the destination (weights first, then text; if the text rename fails the
old weights are put back; SIGINT and SIGTERM are held back between the two renames, see :mod:`qir.atomic`),
so a failed or interrupted save leaves the old files as they were,
and saving over the files a module was lazily loaded from works: the loaded module keeps reading the
old file through the descriptor it opened, since a rename replaces the directory entry, not the file.
The same module always gives byte-identical files.

``load("model.qir")`` parses the text and opens ``model.safetensors`` without reading tensor data:
each blob constant gets a :class:`~qir.safetensors_io.MappedTensor` that memory-maps its bytes when
``numpy()`` is called. Nothing is ever unpickled.

A ``.safetensors`` file at the destination that qir did not write (no ``qir.format`` metadata, e.g. a
Hugging Face checkpoint) is never overwritten: choose another name for the ``.qir`` file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qir import safetensors_io as sio
from qir.atomic import deferred_signals
from qir.dtypes import DType
from qir.errors import QirError, SerializationError
from qir.graph import Constant, Module
from qir.limits import MAX_TEXT_BYTES, text_size_problem
from qir.safetensors_io import MappedTensor

__all__ = ["MappedTensor", "blob_path", "load", "save", "stored_bytes"]

BLOB_SUFFIX = ".safetensors"


def blob_path(path: str | os.PathLike[str]) -> Path:
    """The ``.safetensors`` file that goes with the ``.qir`` file at ``path`` (same folder and stem)."""
    return Path(path).with_suffix(BLOB_SUFFIX)


def stored_bytes(module: Module) -> int:
    """Bytes all constants of ``module`` take as stored (sub-byte elements packed), inline ones included."""
    total = 0
    for c in module.constants.values():
        try:
            total += c.type.nbytes()
        except QirError as exc:
            raise SerializationError(f"constant @{c.name}: {exc}") from None
    return total


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def _check_destination(p: Path) -> None:
    if p.suffix == BLOB_SUFFIX:
        raise SerializationError(f"{p}: the text file cannot end in {BLOB_SUFFIX}; that name is for the "
                                 f"weights beside it (use e.g. {p.with_suffix('.qir').name})")
    if not p.name or p.is_dir():
        raise SerializationError(f"{p}: is a folder; give a file name such as {p / 'model.qir'}")
    if not p.parent.is_dir():
        raise SerializationError(f"{p}: the folder {p.parent} does not exist")


class _BlobData:
    """A blob constant's data as :func:`qir.safetensors_io.write` takes it: read only when written."""

    def __init__(self, p: Path, const: Constant) -> None:
        if not const.has_data:
            raise SerializationError(f"{p}: cannot save constant @{const.name}: it is stored as a blob but has no "
                                     "data (load the module with qir.serialize.load, or give the constant an array)")
        if not const.type.is_static:
            raise SerializationError(f"{p}: cannot save constant @{const.name}: its type {const.type} has a "
                                     "symbolic size")
        self.path = p
        self.const = const
        self.shape: tuple[int, ...] = tuple(int(d) for d in const.type.shape)

    def numpy(self) -> np.ndarray:
        """The data, checked against the declared type."""
        p, const, t = self.path, self.const, self.const.type
        try:
            arr = np.asarray(const.numpy())
        except QirError as exc:
            raise SerializationError(f"{p}: cannot read the data of constant @{const.name}: {exc}") from None
        if tuple(arr.shape) != self.shape:
            raise SerializationError(f"{p}: constant @{const.name} is declared {t} but its data has shape "
                                     f"{list(arr.shape)}")
        # Sub-byte codes may come as any integer array; sio.pack checks that they fit.
        if arr.dtype != t.dtype.numpy and not (t.dtype.is_subbyte and arr.dtype.kind in "iu"):
            raise SerializationError(f"{p}: constant @{const.name} is declared {t} but its data is {arr.dtype}, "
                                     f"not {t.dtype.numpy}")
        return arr


def _write_blobs(p: Path, f: BinaryIO, tensors: dict[str, tuple[DType, _BlobData]]) -> None:
    try:
        sio.write(f, tensors)
    except SerializationError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise SerializationError(f"{p}: {exc}") from None


def _existing_is_ours(st: Path) -> bool:
    try:
        return sio.read_header(st).written_by_qir
    except SerializationError:
        return False


def _write_temp(folder: Path, final_name: str, write: Callable[[BinaryIO], object], mode: int) -> str:
    """Write a temporary file in ``folder`` with ``write(fileobj)``, fsync it, and return its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _mode_for(dest: Path) -> int:
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        return 0o644


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(module: Module, path: str | os.PathLike[str]) -> None:
    """Write ``module`` to ``path`` (canonical text) and its blob constants to ``path``'s ``.safetensors``.

    Atomic per file and deterministic; see the module docstring. Raises :class:`SerializationError`
    naming the file and constant when a blob constant has no data or data that disagrees with its
    type, or when the destination cannot be written; the files at the destination are then unchanged.
    """
    from qir.printer import is_inline, print_module

    p = Path(path)
    _check_destination(p)
    st = blob_path(p)
    text = print_module(module).encode("utf-8")
    tensors = {c.name: (c.type.dtype, _BlobData(p, c)) for c in module.constants.values() if not is_inline(c)}
    st_exists = st.exists()
    st_ours = st_exists and _existing_is_ours(st)
    if tensors and st_exists and not st_ours:
        raise SerializationError(f"{st}: refusing to overwrite a .safetensors file that qir did not write; "
                                 f"save the module under another name or move that file away")

    folder = p.parent
    temps: list[str] = []
    backup: str | None = None
    st_replaced = False
    try:
        tmp_st = None
        if tensors:
            tmp_st = _write_temp(folder, st.name, lambda f: _write_blobs(p, f, tensors), _mode_for(st))
            temps.append(tmp_st)
        tmp_txt = _write_temp(folder, p.name, lambda f: f.write(text), _mode_for(p))
        temps.append(tmp_txt)
        # The commit is two renames; SIGINT/SIGTERM wait until both are done (see qir.atomic).
        with deferred_signals():
            if tmp_st is not None:
                if st_exists:
                    # A hard link to the old weights lets a failed text rename put them back.
                    backup = str(folder / f".{st.name}.{secrets.token_hex(8)}.bak")
                    try:
                        os.link(st, backup)
                    except OSError:
                        backup = None
                os.replace(tmp_st, st)
                st_replaced = True
            os.replace(tmp_txt, p)
            if not tensors and st_ours:
                # Weights of an earlier save of this file that nothing refers to any more; if they cannot
                # be removed they are merely stale, so the save still succeeded.
                with contextlib.suppress(OSError):
                    os.unlink(st)
            _fsync_dir(folder)
    except OSError as exc:
        if st_replaced:
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, st)
                    backup = None
                elif not st_exists:
                    os.unlink(st)
        raise SerializationError(f"{p}: cannot save: {exc.strerror or exc}") from None
    finally:
        for tmp in temps + ([backup] if backup else []):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------

def load(path: str | os.PathLike[str]) -> Module:
    """Read the module saved at ``path``; blob constants are mapped lazily from the ``.safetensors`` beside it.

    Raises :class:`SerializationError` (naming the file and constant) for an unreadable file, a blob
    constant whose tensor is missing or has another dtype or shape than declared, or a missing
    ``.safetensors`` file while blobs are referenced; :class:`~qir.errors.ParseError` for bad text.
    """
    from qir.parser import parse

    p = Path(path)
    try:
        with open(p, "rb") as f:
            problem = text_size_problem(os.fstat(f.fileno()).st_size)
            if problem:
                raise SerializationError(f"{p}: {problem}")
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise SerializationError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_TEXT_BYTES:  # it grew after the size check
        raise SerializationError(f"{p}: {text_size_problem(len(raw))}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SerializationError(f"{p}: not UTF-8 text (byte {exc.start}); is it a .qir file?") from None
    st = blob_path(p)
    blobs: dict[str, MappedTensor] | None = None
    if st.exists():
        _, blobs = sio.open_tensors(st)
    module = parse(text, filename=str(p), blobs=blobs)
    for c in module.constants.values():
        if c.data is None:
            if blobs is None:
                raise SerializationError(f"{p}: constant @{c.name} is stored as a blob, but {st} does not exist")
            raise SerializationError(f"{st}: has no tensor {c.name!r} for the blob constant @{c.name} of {p}")
        if isinstance(c.data, MappedTensor):
            info = c.data.info
            if info.dtype != c.type.dtype or info.shape != c.type.shape:
                raise SerializationError(
                    f"{st}: tensor {c.name!r} is {info.dtype.name}{list(info.shape)}, but {p} declares "
                    f"@{c.name} : {c.type}")
    return module
