"""Import a ``torch.export`` program saved as a ``.pt2`` file (``torch.export.save``) into a qir module.

``import_pt2(path)`` checks the archive, loads it with ``torch.export.load`` and converts it with the torch
converter (:func:`qir.frontend.torch_export.from_exported_program`).

Safety. ``torch.export.load`` (torch 2.13) is not a safe loader: the archive's program is JSON and plain tensors are
raw bytes, but tensors marked ``use_pickle`` are read with ``torch.load(weights_only=False)``, custom objects with
``pickle.loads`` / the TorchScript unpickler, and the sample inputs with ``torch.load(weights_only=True)`` that
*falls back* to ``weights_only=False`` when the safe load fails. Any of those can run arbitrary code. So before
calling it, ``import_pt2`` opens the file as a zip archive itself and refuses (with :class:`PT2ImportError`):

* a file that is not a zip archive, or an archive without the ``archive_format`` record of the current ``.pt2``
  format (the legacy pre-2.8 layout goes through other pickle paths);
* any weight or constant whose config entry says ``use_pickle: true``, and any custom-object constant;
* sample inputs that ``torch.load(..., weights_only=True)`` cannot read (then torch's fallback would unpickle).

What remains is what ``weights_only=True`` allows (tensors, containers, primitive types), JSON and raw bytes.

Names. A ``.pt2`` file does not keep the ``torch.export.Dim`` names, so symbolic sizes come out as torch's own
symbols (``s27``); pass ``dim_names={"s27": "seq"}`` to name them (the symbols are the keys of the loaded program's
``range_constraints``).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from qir.errors import QirError
from qir.graph import Module


class PT2ImportError(QirError):
    """A ``.pt2`` file qir refuses to load or cannot convert."""


def check_pt2_archive(path: str | os.PathLike[str]) -> None:
    """Raise :class:`PT2ImportError` unless ``path`` is a ``.pt2`` archive that loads without unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise PT2ImportError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):
        raise PT2ImportError(f"{p}: not a .pt2 file (a .pt2 file is a zip archive written by torch.export.save; "
                             "this file is not a zip archive)")
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if not any(n.endswith("/archive_format") or n == "archive_format" for n in names):
                raise PT2ImportError(f"{p}: a zip archive but not a current .pt2 archive (no archive_format record); "
                                     "re-save the program with torch.export.save from torch >= 2.8")
            for n in names:
                base = n.rsplit("/", 1)[-1]
                if "/data/constants/" in f"/{n}" and base.startswith("custom_obj"):
                    raise PT2ImportError(f"{p}: holds a pickled custom object ({n}); qir does not unpickle objects "
                                         "from files")
                if base in ("model_weights_config.json", "model_constants_config.json"):
                    try:
                        config = json.loads(z.read(n)).get("config", {})
                    except (ValueError, AttributeError):
                        raise PT2ImportError(f"{p}: {n} is not valid JSON") from None
                    pickled = [k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle")]
                    if pickled:
                        raise PT2ImportError(f"{p}: {len(pickled)} tensor(s) are stored pickled (first: "
                                             f"{', '.join(pickled[:3])}), which torch.export.load reads with "
                                             "weights_only=False; qir refuses to unpickle them (save plain, dense "
                                             "tensors instead)")
            samples = [n for n in names if "/data/sample_inputs/" in f"/{n}"]
            if samples:
                import torch

                for n in samples:
                    data = z.read(n)
                    if not data:
                        continue
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception as exc:  # noqa: BLE001 - any failure means torch would fall back to pickle
                        raise PT2ImportError(f"{p}: the sample inputs ({n}) do not load with weights_only=True "
                                             f"({type(exc).__name__}); torch.export.load would then unpickle "
                                             "arbitrary objects, so qir refuses the file") from None
    except zipfile.BadZipFile as exc:
        raise PT2ImportError(f"{p}: a damaged zip archive ({exc})") from None


def import_pt2(path: str | os.PathLike[str], *, name: str | None = None, **convert_options: Any) -> Module:
    """Load a ``.pt2`` file (after :func:`check_pt2_archive`) and convert it into a qir module (function
    ``@main``). ``convert_options`` go to ``from_exported_program`` (``dim_names=``, ``fuse=``...)."""
    check_pt2_archive(path)
    import torch

    from qir.frontend.torch_export import from_exported_program

    p = Path(path)
    try:
        ep = torch.export.load(str(p))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged archives
        raise PT2ImportError(f"{p}: torch.export.load failed: {type(exc).__name__}: {exc}") from None
    return from_exported_program(ep, name=name or p.stem, **convert_options)
