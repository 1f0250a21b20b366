"""Atomic outputs: write to a temporary name, then commit with renames that a SIGINT/SIGTERM cannot split.

Every file or folder qir writes is first written under a hidden temporary name in the destination folder
(``.model.qir.<random>.tmp``) and renamed over the destination when it is complete, so a reader sees the old
output or the new one, never half of one. Some outputs take more than one rename (a ``.qir`` text and its
``.safetensors``; an artifact folder that replaces an older one); :func:`deferred_signals` holds SIGINT and
SIGTERM back while those renames run, so an interrupt lands before or after the commit, not inside it
(measured by ``tests/test_atomic.py``: a signal mask did not do it, as the kernel hands a process-directed
signal to any thread that does not block it, and Python then runs its handler in the main thread anyway).
(SIGKILL and power loss cannot be held back: after one of those the temporary files are left over, hidden and
named ``*.tmp``, and a two-rename commit may be half done.)

:func:`terminate_raises` makes SIGTERM behave like Ctrl-C (``KeyboardInterrupt``) for the command line, so the
``finally`` clauses that delete temporary files run on ``kill PID`` too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["deferred_signals", "fsync_dir", "terminate_raises", "write_bytes_atomic", "write_text_atomic"]

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration of the block; one that came is acted on when it ends.

    The block swaps in Python handlers that only note the signal, then puts the old handlers back and runs
    the one for the first noted signal (``KeyboardInterrupt`` for SIGINT; SIGTERM's default kills). Python
    handlers run in the main thread whichever thread the kernel delivers a signal to, which a signal mask
    cannot promise once torch or ONNX Runtime have started threads. Elsewhere than in the main thread this
    does nothing (only the main thread may set handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum: int, frame: object) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, note) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            first = pending[0]
            handler = old[signal.Signals(first)]
            if callable(handler):
                handler(first, None)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(first)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` (as SIGINT does) instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = p.stat().st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))
