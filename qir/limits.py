"""Limits on what an input file may declare, checked from its header before anything is allocated.

A file from a stranger can claim a tensor of 10^12 elements, a billion tensors or a string of an exabyte;
a reader that believes it allocates first and fails later (or never: it swaps). Every reader of untrusted
files in qir (``.safetensors`` in :mod:`qir.safetensors_io`, ``.gguf`` in :mod:`qir.models.gguf_check`,
``.onnx`` in :mod:`qir.frontend.onnx_import`) compares what the header declares with these limits and with
the file's real size, and refuses with a message naming the file and the tensor.

The limits are far above any real model (LLaMA-3-405B's largest tensor has 2.1e9 elements; GGUF files
hold a few thousand tensors and a vocabulary of a few hundred thousand strings) and far below what would
exhaust a machine when allocated by mistake.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "MAX_ARRAY_ITEMS", "MAX_FOLD_ELEMENTS", "MAX_RANK", "MAX_STRING_BYTES", "MAX_TENSORS", "MAX_TENSOR_ELEMENTS",
    "MAX_TEXT_BYTES", "shape_problem", "text_size_problem",
]

MAX_TENSOR_ELEMENTS = 1 << 36
"""Elements one tensor may declare (6.9e10: 32x the largest tensor of a 405B model)."""

MAX_RANK = 64
"""Dimensions one tensor may declare."""

MAX_TENSORS = 1 << 20
"""Tensors one file may declare."""

MAX_STRING_BYTES = 1 << 24
"""Bytes of one string in a binary header (a key, a tensor name, one metadata value)."""

MAX_ARRAY_ITEMS = 1 << 26
"""Items of one metadata array (a tokenizer vocabulary of 67M entries)."""

MAX_TEXT_BYTES = 1 << 26
"""Bytes of a ``.qir`` text file (64 MiB; a 7B model's text is ~100 KB, as weights live in the .safetensors)."""

MAX_FOLD_ELEMENTS = 1 << 26
"""Elements an importer may compute at import time from a file's shape arithmetic (ConstantOfShape, Range)."""


def shape_problem(shape: Iterable[object], *, max_elements: int = MAX_TENSOR_ELEMENTS) -> str | None:
    """Why ``shape`` cannot be accepted from a file (rank, a negative or non-integer size, too many elements),
    or ``None``. Computed with Python ints, so nothing overflows and nothing is allocated."""
    dims = list(shape)
    if len(dims) > MAX_RANK:
        return f"rank {len(dims)} exceeds the limit of {MAX_RANK}"
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            return f"size {d!r} in shape {dims[:8]} is not a non-negative integer"
    n = math.prod(dims)
    if n > max_elements:
        return f"shape {dims} holds {n:,} elements, more than the limit of {max_elements:,}"
    return None


def text_size_problem(size: int) -> str | None:
    """Why a ``.qir`` text of ``size`` bytes is refused before it is read, or ``None``."""
    if size > MAX_TEXT_BYTES:
        return (f"the text is {size:,} bytes, more than the limit of {MAX_TEXT_BYTES:,} for a .qir file (weights "
                "belong in the .safetensors file beside it)")
    return None
