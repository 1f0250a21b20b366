"""Causal language models as one qir module with two functions: ``prefill`` and ``decode``.

A LLaMA-style transformers model (``LlamaForCausalLM``, e.g. SmolLM2) is re-expressed as a *functional* layer loop
(:class:`FunctionalCausalLM`) around the model's own weight-holding submodules, so that the KV caches are plain
tensors that go in and come out instead of transformers cache objects or mutated buffers:

* ``prefill(tokens[1, seq]) -> (logits[1, seq, V], k.0, v.0, ..., k.{L-1}, v.{L-1})``, each cache
  ``[1, n_kv, seq, head_dim]``; ``seq`` stays symbolic; attention is causal (``is_causal=True``), no mask ops.
* ``decode(token[1, 1], position[1], cache.k.0, cache.v.0, ...) -> (logits[1, 1, V], k.0, v.0, ...)`` with a
  *static* cache of ``max_seq`` slots: the new K/V row is written at ``position`` with an out-of-place
  ``index_copy`` and the query sees the slots ``arange(max_seq) <= position``. Every shape is fixed, which is what
  compiled backends want.

:func:`export_causal_lm` runs ``torch.export`` on both; :func:`import_causal_lm` converts both into ONE
:class:`qir.Module` through :func:`qir.frontend.torch_export.from_exported_program`, which reuses the weight constants
by parameter name (and keeps a tied embedding/head as one constant). Importing this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qir.errors import QirError

if TYPE_CHECKING:
    from qir.graph import Module
    from qir.models import LoadedModel

__all__ = [
    "DEFAULT_MAX_SEQ", "CausalLMExport", "FunctionalCausalLM", "cache_input_names", "cache_output_names",
    "TorchRunner", "export_causal_lm", "import_causal_lm",
]

DEFAULT_MAX_SEQ = 1024
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


class CausalLMError(QirError):
    """A causal LM cannot be expressed as prefill/decode graphs (unsupported architecture or options)."""


def cache_output_names(num_layers: int) -> list[str]:
    """``k.0, v.0, ..., k.{L-1}, v.{L-1}``: the cache outputs of both functions."""
    return [f"{kv}.{i}" for i in range(num_layers) for kv in ("k", "v")]


def cache_input_names(num_layers: int) -> list[str]:
    """``cache.k.0, cache.v.0, ...``: the cache inputs of ``decode``."""
    return [f"cache.{kv}.{i}" for i in range(num_layers) for kv in ("k", "v")]


class FunctionalCausalLM(torch.nn.Module):
    """Runs a LLaMA-style ``*ForCausalLM`` as ``prefill`` or ``decode`` with the KV caches as plain tensors.

    ``prefill``: ``forward(tokens[1, S]) -> (logits[1, S, V], k0, v0, ...)``, caches ``[1, n_kv, S, hd]``.
    ``decode``: ``forward(token[1, 1], position[1], k0, v0, ...) -> (logits[1, 1, V], k0', v0', ...)``, caches
    ``[1, n_kv, M, hd]`` with the new row written at ``position`` (a static cache of ``M`` slots).
    The attention/MLP/norm/rotary submodules and their weights are the HF model's own; nothing is copied.
    """

    def __init__(self, hf_model: torch.nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in ("prefill", "decode"):
            raise CausalLMError(f"mode must be 'prefill' or 'decode', not {mode!r}")
        cfg = hf_model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
            raise CausalLMError(f"causal LM type {getattr(cfg, 'model_type', None)!r} is not supported; the "
                                f"prefill/decode wrapper handles {', '.join(SUPPORTED_TYPES)} (LLaMA-style)")
        self.hf = hf_model
        self.mode = mode
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def _layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_past: torch.Tensor | None, v_past: torch.Tensor | None,
               position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.hf.model.layers[i]
        att = layer.self_attn
        b, s, _ = h.shape
        x = layer.input_layernorm(h)
        q = att.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if self.mode == "prefill":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            k_all, v_all = k, v
        else:
            assert k_past is not None and v_past is not None and position is not None
            k_all = k_past.index_copy(2, position, k)
            v_all = v_past.index_copy(2, position, v)
            mask = (torch.arange(k_all.shape[2], device=h.device) <= position).view(1, 1, 1, -1)
            o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        h = h + att.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k_all, v_all

    def forward(self, tokens: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.hf.model
        h = model.embed_tokens(tokens)
        if self.mode == "prefill":
            position, kv = None, ()
            pos_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        else:
            position, kv = rest[0], rest[1:]
            pos_ids = position.view(1, 1)
        cos, sin = model.rotary_emb(h, pos_ids)
        outs: list[torch.Tensor] = []
        for i in range(len(model.layers)):
            kp = kv[2 * i] if kv else None
            vp = kv[2 * i + 1] if kv else None
            h, k_all, v_all = self._layer(i, h, cos, sin, kp, vp, position)
            outs += [k_all, v_all]
        logits = self.hf.lm_head(model.norm(h))
        return (logits, *outs)


@dataclass
class CausalLMExport:
    """The two exported programs of a causal LM and the shapes they were exported with."""

    prefill: Any            # torch.export.ExportedProgram
    decode: Any             # torch.export.ExportedProgram
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq: int


def export_causal_lm(hf_model: Any, *, max_seq: int = DEFAULT_MAX_SEQ) -> CausalLMExport:
    """``torch.export`` the prefill (symbolic ``seq`` in ``[2, max_seq]``) and the static decode step."""
    import torch

    if max_seq < 2:
        raise CausalLMError(f"max_seq must be at least 2, not {max_seq}")
    cfg = hf_model.config
    layers = int(cfg.num_hidden_layers)
    pre, dec = FunctionalCausalLM(hf_model, "prefill"), FunctionalCausalLM(hf_model, "decode")
    n_kv, hd = dec.n_kv, dec.head_dim
    example = torch.zeros((1, min(8, max_seq)), dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    caches = tuple(torch.zeros((1, n_kv, max_seq, hd), dtype=torch.float32) for _ in range(2 * layers))
    with torch.no_grad():
        ep_pre = torch.export.export(pre, (example,), dynamic_shapes={"tokens": {1: seq}})
        ep_dec = torch.export.export(dec, (example[:, :1], torch.tensor([example.shape[1]]), *caches))
    return CausalLMExport(ep_pre, ep_dec, layers, n_kv, hd, max_seq)


def import_causal_lm(loaded: LoadedModel | Any, *, max_seq: int = DEFAULT_MAX_SEQ, name: str | None = None) -> Module:
    """One qir module with ``prefill`` and ``decode`` for a loaded causal LM (a ``LoadedModel`` or HF module).

    Weight constants are named by parameter path and shared by both functions.
    """
    from qir.frontend.torch_export import from_exported_program

    hf = getattr(loaded, "module", loaded)
    name = name or getattr(loaded, "name", None) or "causal_lm"
    from qir.tools.progress import Progress

    with Progress(f"trace {name} (torch.export prefill + decode)"):
        ex = export_causal_lm(hf, max_seq=max_seq)
    outs = ["logits", *cache_output_names(ex.num_layers)]
    with Progress(f"convert {name} to qir", total=2) as bar:
        module = from_exported_program(ex.prefill, function="prefill", input_names=["tokens"], output_names=outs,
                                       name=name)
        bar.update()
        from_exported_program(ex.decode, module=module, function="decode",
                              input_names=["token", "position", *cache_input_names(ex.num_layers)], output_names=outs)
        bar.update()
    return module


class TorchRunner:
    """A :class:`qir.generate.StepRunner` over PyTorch: the functional wrapper run eagerly (or exported programs).

    Used to check generation and the decode graph's design against PyTorch without the qir converter.
    """

    def __init__(self, hf_model: Any, *, max_seq: int = DEFAULT_MAX_SEQ, export: CausalLMExport | None = None) -> None:
        self.max_seq = export.max_seq if export is not None else max_seq
        if export is not None:
            self._pre, self._dec = export.prefill.module(), export.decode.module()
        else:
            self._pre = FunctionalCausalLM(hf_model, "prefill")
            self._dec = FunctionalCausalLM(hf_model, "decode")

    def prefill(self, tokens: Any) -> tuple[Any, list[Any]]:
        with torch.no_grad():
            out = self._pre(torch.as_tensor(tokens))
        return out[0].numpy(), [t.numpy() for t in out[1:]]

    def decode(self, token: Any, position: Any, caches: list[Any]) -> tuple[Any, list[Any]]:
        with torch.no_grad():
            out = self._dec(torch.as_tensor(token), torch.as_tensor(position), *(torch.as_tensor(c) for c in caches))
        return out[0].numpy(), [t.numpy() for t in out[1:]]
