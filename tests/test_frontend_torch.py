"""Tests of the torch.export frontend (qir.frontend.torch_export, aten, fusion) and the indexing ops it uses.

Small torch modules are traced with a dynamic sequence length, verified, run by the reference interpreter at two
lengths and compared with eager PyTorch. The ``slow`` tests trace the real MiniLM encoder.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qir
from qir.errors import QirError
from qir.frontend.torch_export import UnsupportedOpError, from_exported_program, trace
from qir.graph import Module
from qir.types import TensorType

torch.manual_seed(0)
SEQ = torch.export.Dim("seq", min=2, max=64)


def _run(m: Module, *xs: torch.Tensor, function: str | None = None) -> list[np.ndarray]:
    return qir.run(m, [x.numpy() for x in xs], function=function)


def _close(got: np.ndarray, want: torch.Tensor, tol: float = 1e-5) -> None:
    w = want.detach().numpy()
    assert got.shape == w.shape and got.dtype == w.dtype
    err = np.abs(got.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def _opcodes(m: Module, function: str | None = None) -> collections.Counter[str]:
    return collections.Counter(op.opcode for op in m.function(function).ops)


# -- small models ----------------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x))) * 0.5 + x


def test_mlp_dynamic_seq_matches_torch() -> None:
    model = MLP().eval()
    m = trace(model, (torch.randn(1, 5, 8),), {"x": {1: SEQ}})
    qir.verify(m)
    f = m.main
    assert str(f.inputs[0].type) == "f32[1,seq,8]" and str(f.outputs[0].type) == "f32[1,seq,8]"
    assert _opcodes(m)["linear"] == 2 and _opcodes(m)["silu"] == 1
    assert "up.weight" in m.constants and "down.weight" in m.constants
    # parameters are numpy views of the torch tensors, not copies
    assert np.shares_memory(m.constants["up.weight"].numpy(), model.up.weight.detach().numpy())
    assert all(op.loc and op.loc.startswith("test_frontend_torch.py:") for op in f.ops)
    for s in (3, 11):
        x = torch.randn(1, s, 8)
        (y,) = _run(m, x)
        _close(y, model(x))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class RMSNorm(torch.nn.Module):
    """HF LlamaRMSNorm, casts included."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dt)


class LlamaBlock(torch.nn.Module):
    """Embedding, RMSNorm, RoPE, grouped-query causal SDPA, SiLU-gated MLP, tied LM head."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, kv: int = 2) -> None:
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.embed = torch.nn.Embedding(vocab, d)
        self.norm1, self.norm2, self.norm3 = RMSNorm(d), RMSNorm(d), RMSNorm(d)
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.v = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, 48, bias=False)
        self.up = torch.nn.Linear(d, 48, bias=False)
        self.down = torch.nn.Linear(48, d, bias=False)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        h = self.embed(ids)
        pos = torch.arange(s).unsqueeze(0).to(torch.float32)
        freqs = pos.unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        x = self.norm1(h)
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        x = self.norm2(h)
        h = h + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(self.norm3(h))


@pytest.fixture(scope="module")
def llama() -> tuple[LlamaBlock, Module]:
    model = LlamaBlock().eval()
    return model, trace(model, (torch.randint(0, 50, (1, 6)),), {"ids": {1: SEQ}}, input_names=["tokens"],
                        output_names=["logits"])


def test_llama_block_matches_torch_at_two_lengths(llama: tuple[LlamaBlock, Module]) -> None:
    model, m = llama
    qir.verify(m)
    assert [v.name for v in m.main.inputs] == ["tokens"] and [v.name for v in m.main.outputs] == ["logits"]
    assert str(m.main.outputs[0].type) == "f32[1,seq,50]"
    for s in (4, 13):
        ids = torch.randint(0, 50, (1, s))
        (y,) = _run(m, ids)
        with torch.no_grad():
            _close(y, model(ids))


def test_llama_block_ops_are_transformer_level(llama: tuple[LlamaBlock, Module]) -> None:
    _, m = llama
    ops = _opcodes(m)
    assert ops["rms_norm"] == 3, ops            # the decomposed RMSNorm is fused
    assert ops["attention"] == 1 and ops["linear"] == 8 and ops["embedding"] == 1
    for gone in ("rsqrt", "pow", "mean"):
        assert ops[gone] == 0, (gone, ops)
    casts = m.main.find_ops("cast")   # only the positions' i64 -> f32; RMSNorm's f32 -> f32 casts are gone
    assert len(casts) == 1 and str(casts[0].operands[0].type) == "i64[1,seq]"
    att = m.main.find_ops("attention")[0]
    assert att.attrs["causal"] is True and len(att.operands) == 3
    norms = m.main.find_ops("rms_norm")
    assert all(math.isclose(op.attrs["eps"], 1e-5) for op in norms)
    assert str(m.main.find_ops("arange")[0].result.type) == "i64[seq]"


def test_tied_weights_become_one_constant(llama: tuple[LlamaBlock, Module]) -> None:
    _, m = llama
    tables = [c for c in m.constants.values() if c.type == TensorType.of("f32", [50, 32])]
    assert len(tables) == 1
    emb = m.main.find_ops("embedding")[0]
    head = [op for op in m.main.find_ops("linear") if op.result.type.shape[-1] == 50][0]
    assert emb.operands[0] is head.operands[1]


class BertBlock(torch.nn.Module):
    """Embeddings + layer_norm, GELU MLP, SDPA with a bool padding mask, masked mean pooling."""

    def __init__(self, vocab: int = 40, d: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(64, d)
        self.register_buffer("position_ids", torch.arange(64).unsqueeze(0), persistent=False)
        self.ln1 = torch.nn.LayerNorm(d, eps=1e-12)
        self.ln2 = torch.nn.LayerNorm(d, eps=1e-12)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.ff1 = torch.nn.Linear(d, 4 * d)
        self.ff2 = torch.nn.Linear(4 * d, d)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        h = self.ln1(self.tok(input_ids) + self.pos(self.position_ids[:, :s]))
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        mask = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = self.ln2(h + self.drop(self.o(a.transpose(1, 2).reshape(b, s, -1))))
        h = h + self.ff2(F.gelu(self.ff1(h)))
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)


def test_bert_block_dynamic_batch_and_seq() -> None:
    model = BertBlock().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    ids = torch.randint(1, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    shapes = {"input_ids": {0: batch, 1: SEQ}, "attention_mask": {0: batch, 1: SEQ}}
    m = trace(model, (ids, mask), shapes)
    qir.verify(m)
    assert str(m.main.inputs[0].type) == "i64[batch,seq]" and str(m.main.outputs[0].type) == "f32[batch,24]"
    ops = _opcodes(m)
    assert ops["layer_norm"] == 2 and ops["gelu"] == 1 and ops["attention"] == 1, ops
    assert len(m.main.find_ops("attention")[0].operands) == 4   # the bool mask
    for b, s in ((3, 5), (1, 12)):
        ids = torch.randint(1, 40, (b, s))
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, s - 2:] = 0
        (y,) = _run(m, ids, mask)
        with torch.no_grad():
            _close(y, model(ids, mask))


class CacheStep(torch.nn.Module):
    """Decode-style cache updates: a growing cache (cat, symbolic ``past``) and a static one (index_copy)."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, k_grow: torch.Tensor, k_static: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grown = torch.cat([k_grow, x], dim=2)
        written = k_static.index_copy(2, pos, x)
        mask = (torch.arange(written.shape[2]) <= pos).view(1, 1, 1, -1)
        a = F.scaled_dot_product_attention(x, written, written, attn_mask=mask)
        b = F.scaled_dot_product_attention(x, grown, grown)
        return a + b, grown, written


def test_cache_updates_symbolic_past() -> None:
    past = torch.export.Dim("past", min=1, max=30)
    args = (torch.randn(1, 2, 1, 4), torch.tensor([3]), torch.randn(1, 2, 5, 4), torch.zeros(1, 2, 8, 4))
    m = trace(CacheStep(), args, {"x": None, "pos": None, "k_grow": {2: past}, "k_static": None})
    qir.verify(m)
    assert str(m.main.outputs[1].type) == "f32[1,2,past+1,4]"
    assert _opcodes(m)["index_copy"] == 1 and _opcodes(m)["concat"] == 1
    for p, pos in ((2, 0), (9, 6)):
        xs = (torch.randn(1, 2, 1, 4), torch.tensor([pos]), torch.randn(1, 2, p, 4), torch.randn(1, 2, 8, 4))
        got = _run(m, *xs)
        for g, w in zip(got, CacheStep()(*xs)):
            _close(g, w)


def test_sym_size_arithmetic_and_slices() -> None:
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]
            y = x[:, 1:] - x[:, : n - 1]                      # a symbolic end: the size minus a constant
            z = y.reshape(x.shape[0] * (n - 1), -1)           # size arithmetic on SymInts
            return z.cumsum(0) + torch.arange(x.shape[0] * (n - 1)).unsqueeze(-1)

    seq = torch.export.Dim("seq", min=3, max=64)
    m = trace(M(), (torch.randn(2, 6, 3),), {"x": {1: seq}})
    qir.verify(m)
    assert str(m.main.outputs[0].type) == "f32[2*seq-2,3]"
    for s in (3, 9):
        x = torch.randn(2, s, 3)
        (y,) = _run(m, x)
        _close(y, M()(x))


def test_unsupported_op_names_op_count_and_line() -> None:
    class Frac(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.frac()
            return y + y.frac()

    with pytest.raises(UnsupportedOpError) as info:
        trace(Frac(), (torch.randn(3, 4),))
    text = str(info.value)
    assert isinstance(info.value, QirError)
    assert "unsupported aten op aten.frac.default (2 uses)" in text
    assert "test_frontend_torch.py:" in text and "y = x.frac()" in text and "return y + y.frac()" in text
    assert list(info.value.ops) == ["aten.frac.default"] and len(info.value.ops["aten.frac.default"]) == 2


def test_two_functions_share_constants() -> None:
    model = MLP().eval()
    with torch.no_grad():
        ep1 = torch.export.export(model, (torch.randn(1, 4, 8),), dynamic_shapes={"x": {1: SEQ}})
        ep2 = torch.export.export(model, (torch.randn(1, 1, 8),))
    m = from_exported_program(ep1, function="prefill", name="two")
    n_const = len(m.constants)
    assert from_exported_program(ep2, module=m, function="decode") is m
    assert len(m.constants) == n_const and set(m.functions) == {"prefill", "decode"}
    w = m.constants["up.weight"]
    assert {op.parent.name for op, _ in w.uses} == {"prefill", "decode"}
    qir.verify(m)
    x = torch.randn(1, 1, 8)
    _close(_run(m, x, function="decode")[0], model(x))


# -- the indexing ops (oracle tests against numpy / torch) -----------------------------------------------------
def _single_op(opcode: str, inputs: list[np.ndarray], attrs: dict, result_types: list[TensorType] | None = None
               ) -> tuple[Module, np.ndarray]:
    m = Module("t")
    f = m.add_function("main")
    vals = [f.add_input(f"x{i}", TensorType.of(qir.dtype(str(_qdt(a))), a.shape)) for i, a in enumerate(inputs)]
    y = f.add_op(opcode, vals, attrs, result_types=result_types).result
    f.set_outputs([y])
    qir.verify(m)
    return m, qir.run(m, inputs)[0]


def _qdt(a: np.ndarray) -> str:
    from qir.dtypes import from_numpy

    return from_numpy(a.dtype).name


def test_op_arange_symbolic_size() -> None:
    m = Module("t")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", ["n"]))
    r = f.add_op("arange", [], {"size": ["n+1"], "start": 3, "step": 2, "dtype": "f32"}).result
    f.set_outputs([f.add_op("add", [f.add_op("slice", [r], {"axis": 0, "end": -1}).result, x]).result])
    assert str(r.type) == "f32[n+1]"
    (y,) = qir.run(m, [np.zeros(4, np.float32)])
    np.testing.assert_array_equal(y, np.arange(3, 11, 2, dtype=np.float32))
    with pytest.raises(QirError, match="dtype"):
        f.add_op("arange", [], {"size": [3], "dtype": "i4"})


def test_op_cumsum() -> None:
    a = np.random.default_rng(0).integers(-5, 5, (3, 4)).astype(np.int64)
    _, y = _single_op("cumsum", [a], {"axis": 1})
    np.testing.assert_array_equal(y, np.cumsum(a, axis=1))
    b = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    _, y = _single_op("cumsum", [b], {"axis": -2})
    np.testing.assert_allclose(y, torch.from_numpy(b).cumsum(0).numpy(), rtol=1e-6)


def test_op_index_copy() -> None:
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 3)).astype(np.float32)
    src = np.random.default_rng(1).standard_normal((1, 2, 2, 3)).astype(np.float32)
    idx = np.array([4, 1], np.int64)
    _, y = _single_op("index_copy", [x, idx, src], {"axis": 2})
    want = torch.from_numpy(x).index_copy(2, torch.from_numpy(idx), torch.from_numpy(src)).numpy()
    np.testing.assert_array_equal(y, want)
    assert not np.array_equal(x, y)   # the input is not written in place
    with pytest.raises(QirError, match="out of range"):
        qir.run(_single_op("index_copy", [x, idx, src], {"axis": 2})[0], [x, np.array([9, 0]), src])


def test_op_take_along_axis() -> None:
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    idx = np.array([[0, 4], [1, 1], [3, 2]], np.int64)
    _, y = _single_op("take_along_axis", [x, idx], {"axis": 1})
    np.testing.assert_array_equal(y, torch.gather(torch.from_numpy(x), 1, torch.from_numpy(idx)).numpy())


def test_op_index() -> None:
    x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
    i0 = np.array([[0], [3]], np.int64)
    i2 = np.array([1, 5, 2], np.int64)
    m, y = _single_op("index", [x, i0, i2], {"axes": [0, 2]})
    want = torch.from_numpy(x)[torch.from_numpy(i0), :, torch.from_numpy(i2)].numpy()
    assert y.shape == want.shape == (2, 3, 5) and str(m.main.outputs[0].type) == "f32[2,3,5]"
    np.testing.assert_array_equal(y, want)
    i1 = np.array([1, 4, -2], np.int64)
    m, y = _single_op("index", [x, i1], {"axes": [1]})
    np.testing.assert_array_equal(y, x[:, i1])


# -- the real encoder ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, Module, object]:
    from qir.frontend.encoder import SentenceEncoder
    from qir.models import load_model

    enc = load_model("minilm-l6")
    wrapper = SentenceEncoder(enc.module, normalize=False).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=512)
    ex = enc.tokenizer(["a first example", "and a second, longer example sentence"], padding=True,
                       return_tensors="pt")
    m = trace(wrapper, (ex["input_ids"], ex["attention_mask"]),
              {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, name="minilm")
    return wrapper, m, enc.tokenizer


@pytest.mark.slow
def test_minilm_traces_fully_and_matches_torch(minilm: tuple[torch.nn.Module, Module, object]) -> None:
    wrapper, m, tok = minilm
    qir.verify(m)
    ops = _opcodes(m)
    print("MiniLM qir ops by kind:", dict(ops.most_common()))
    assert ops["linear"] == 36 and ops["layer_norm"] == 13 and ops["attention"] == 6 and ops["gelu"] == 6
    assert str(m.main.inputs[0].type) == "i64[batch,seq]" and str(m.main.outputs[0].type) == "f32[batch,384]"
    assert "encoder.pooler.dense.weight" not in m.constants   # the unused pooler is dropped
    sentences = ["Paris is the capital of France.", "The capital of France is Paris.", "I like trains.",
                 "A much longer sentence, with punctuation, numbers like 1234 and rarely seen words: quixotic."]
    for batch in (sentences[:3], sentences):
        enc = tok(batch, padding=True, return_tensors="pt")  # type: ignore[operator]
        (y,) = _run(m, enc["input_ids"], enc["attention_mask"])
        with torch.no_grad():
            _close(y, wrapper(enc["input_ids"], enc["attention_mask"]), tol=1e-4)
