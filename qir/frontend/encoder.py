"""Sentence encoders (BERT-style, e.g. all-MiniLM-L6-v2) as one qir function ``main``.

:class:`SentenceEncoder` wraps a transformers encoder (``BertModel``) with sentence-transformers' pooling:
``forward(input_ids[B, S], attention_mask[B, S]) -> embeddings[B, H]`` = mean of the last hidden state over the
positions where the mask is 1, then L2-normalized when the model says so (``facts.normalize``). The normalization is
written as ``x * rsqrt(max(sum(x^2), eps^2))``, which equals ``torch.nn.functional.normalize`` (``x / max(|x|,
eps)``) to rounding and exports to plain elementwise ops. The pooler head (unused) is dead code and dropped by the
tracer. :func:`import_encoder` traces it with a symbolic batch and sequence length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qir.graph import Module
    from qir.models import LoadedModel

__all__ = ["SentenceEncoder", "import_encoder"]

NORMALIZE_EPS = 1e-12


class SentenceEncoder(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> [B, H]`` sentence embeddings (mean pooling, optional L2 norm)."""

    def __init__(self, encoder: torch.nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if not self.normalize:
            return pooled
        norm2 = (pooled * pooled).sum(dim=-1, keepdim=True).clamp(min=NORMALIZE_EPS * NORMALIZE_EPS)
        return pooled * torch.rsqrt(norm2)


def import_encoder(loaded: LoadedModel | Any, *, name: str | None = None, normalize: bool | None = None,
                   max_seq: int = 512) -> Module:
    """Trace a loaded encoder (a ``LoadedModel`` or a transformers encoder module) into a qir module.

    The function ``main`` takes ``input_ids`` and ``attention_mask`` (``i64[batch, seq]``, both symbolic) and returns
    ``embeddings`` (``f32[batch, H]``).
    """
    from qir.frontend.torch_export import trace

    hf = getattr(loaded, "module", loaded)
    if normalize is None:
        facts = getattr(loaded, "facts", None)
        normalize = bool(getattr(facts, "normalize", True))
    name = name or getattr(loaded, "name", None) or "encoder"
    wrapper = SentenceEncoder(hf, normalize=normalize).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return trace(wrapper, (ids, mask), dynamic_shapes=shapes, name=name, function="main",
                 input_names=["input_ids", "attention_mask"], output_names=["embeddings"])
