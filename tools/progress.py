"""Progress bars for the long steps (download, tracing, calibration, sensitivity, compilation, evaluation).

One line on stderr, redrawn in place (``\\r``) at most ten times a second::

    calibrate @prefill [##########..........]  16/32  12.3 s

A bar draws only when stderr is a terminal and the command was not given ``--quiet``; otherwise every call is a
cheap no-op, so library loops can report progress unconditionally and tests, pipes and logs stay clean. The
``qir`` command calls :func:`set_quiet` once from its ``--quiet`` flag; library users who want silence on a
terminal do the same.

    >>> for feed in progress(feeds, "calibrate @prefill"):
    ...     run(feed)
    >>> with Progress("export decode") as bar:    # no total: a step that reports only when it is done
    ...     export()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["Progress", "enabled", "progress", "set_quiet"]

T = TypeVar("T")
_WIDTH = 20
_INTERVAL_S = 0.1

# The one switch: the command line's --quiet. Progress is display only (it never changes a result), which is why
# a process-wide flag is acceptable here where the rest of qir passes everything explicitly.
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-allow) every progress bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def enabled(stream: TextIO | None = None) -> bool:
    """Whether bars draw: not quiet and ``stream`` (default stderr) is a terminal."""
    s = stream if stream is not None else sys.stderr
    try:
        return not _quiet and s.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class Progress:
    """One progress line: ``update()`` after each unit of work, ``close()`` (or leave the ``with``) at the end."""

    def __init__(self, desc: str, total: int | None = None, *, stream: TextIO | None = None) -> None:
        self.desc = desc
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.active = enabled(self.stream)
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._closed = False
        if self.active:
            self._draw(force=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.active:
            self._draw(force=self.total is not None and self.done >= self.total)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.active:
            self._draw(force=True, final=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, *, force: bool = False, final: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < _INTERVAL_S:
            return
        self._last = now
        elapsed = f"{now - self.t0:6.1f} s"
        if self.total:
            filled = min(_WIDTH, int(_WIDTH * self.done / self.total))
            bar = "#" * filled + "." * (_WIDTH - filled)
            width = len(str(self.total))
            line = f"{self.desc} [{bar}] {self.done:{width}d}/{self.total} {elapsed}"
        else:
            line = f"{self.desc} ... {'done ' if final else ''}{elapsed}"
        self.stream.write("\r" + line + "\x1b[K")  # \x1b[K clears what a longer earlier line left
        self.stream.flush()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while drawing a bar (``total`` defaults to ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(desc, total)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
