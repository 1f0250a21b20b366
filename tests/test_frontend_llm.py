"""Real models through the frontend: SmolLM2 as prefill + decode, MiniLM as a sentence encoder (slow, run in CI).

Every number is checked against PyTorch eager computed here, not against stored values:

* SmolLM2 prefill logits from the reference interpreter vs ``LlamaForCausalLM`` within 1e-4 relative error
  (max |diff| / max |ref|), and one decode step's logits vs HF with its own KV cache;
* perplexity on GPL-3 (windows of 512 tokens) equal to PyTorch's to 4 significant digits;
* 32 greedy tokens through the qir decode graph equal to ``generate(do_sample=False)`` (EOS suppressed on both);
* MiniLM sentence embeddings: cosine > 0.99999 against eager, and ``qir import`` / ``qir eval --json`` end to end.

The loaded models and the imported modules are module-scoped fixtures: each model is loaded and traced once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qir

pytestmark = pytest.mark.slow

GPL3 = Path("/usr/share/common-licenses/GPL-3")
PROMPT = "What is the capital of France?"
MAX_SEQ = 256
PPL_WINDOWS = 2   # 8 windows measured once: qir 24.924687, torch 24.924686 (see the report)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def smollm():
    from qir.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_import(smollm):
    from qir.frontend.importer import import_loaded

    t0 = time.perf_counter()
    imp = import_loaded(smollm, max_seq=MAX_SEQ)
    print(f"\nSmolLM2 import (export + convert, prefill + decode): {time.perf_counter() - t0:.1f} s")
    return imp


def test_smollm_module_layout(smollm, smollm_import) -> None:
    m = smollm_import.module
    qir.verify(m)
    f = smollm.facts
    pre, dec = m.functions["prefill"], m.functions["decode"]
    assert [v.name for v in pre.inputs] == ["tokens"]
    assert [v.name for v in dec.inputs][:4] == ["token", "position", "cache.k.0", "cache.v.0"]
    assert len(dec.inputs) == 2 + 2 * f.num_layers and len(pre.outputs) == len(dec.outputs) == 1 + 2 * f.num_layers
    assert str(pre.inputs[0].type) == "i64[1,seq]"
    assert str(pre.outputs[1].type) == f"f32[1,{f.num_kv_heads},seq,{f.head_dim}]"
    assert str(dec.inputs[2].type) == str(dec.outputs[1].type) == f"f32[1,{f.num_kv_heads},{MAX_SEQ},{f.head_dim}]"
    assert str(pre.outputs[0].type) == f"f32[1,seq,{f.vocab_size}]"
    # Both functions read the same weight constants; the tied embedding/head is one constant.
    big = [c for c in m.constants.values() if c.type.numel() == f.vocab_size * f.hidden_size]
    assert len(big) == 1
    used_by = {fn: {c.name for op in m.functions[fn].ops for c in op.operands if c.is_constant} for fn in m.functions}
    assert big[0].name in used_by["prefill"] and big[0].name in used_by["decode"]
    params = sum(c.type.numel() for c in m.constants.values())
    assert params < f.num_params * 1.01, "weights must not be stored twice"
    assert params >= f.num_params - f.vocab_size * f.hidden_size
    from qir.ops import all_ops

    opcodes = {op.opcode for fn in m.functions.values() for op in fn.ops}
    assert opcodes <= set(all_ops()) and not any(o.startswith(("aten", "torch", "opaque")) for o in opcodes)
    kinds = {op.opcode for op in pre.ops}
    assert {"linear", "embedding", "rms_norm", "attention"} <= kinds, kinds


def test_smollm_prefill_and_decode_logits_match_eager(smollm, smollm_import) -> None:
    import torch

    from qir.generate import prompt_ids

    ids = prompt_ids(smollm.tokenizer, PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = smollm.module(input_ids=x, use_cache=True)
        ref = out.logits.numpy()
        nxt = int(ref[0, -1].argmax())
        ref_dec = smollm.module(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values,
                                use_cache=True).logits.numpy()
    interp = qir.Interpreter(smollm_import.module)
    res = interp.run([np.asarray([ids], np.int64)], function="prefill")
    err = rel_err(res[0], ref)
    print(f"\nprefill logits rel err {err:.2e}")
    assert err < 1e-4
    caches = []
    for c in res[1:]:
        padded = np.zeros(c.shape[:2] + (MAX_SEQ,) + c.shape[3:], np.float32)
        padded[:, :, : c.shape[2]] = c
        caches.append(padded)
    dec = interp.run([np.asarray([[nxt]], np.int64), np.asarray([len(ids)], np.int64), *caches], function="decode")
    err_dec = rel_err(dec[0], ref_dec)
    print(f"decode logits rel err {err_dec:.2e}")
    assert err_dec < 1e-4
    assert np.allclose(dec[1][:, :, : len(ids)], caches[0][:, :, : len(ids)])


def test_smollm_greedy_generation_equals_transformers(smollm, smollm_import) -> None:
    import torch

    res = qir.generate(smollm_import, PROMPT, max_new_tokens=32, stop_at_eos=False)
    with torch.no_grad():
        hf = smollm.module.generate(torch.tensor([res.prompt_ids]), max_new_tokens=32, min_new_tokens=32,
                                    do_sample=False, eos_token_id=None)
    ref = hf[0, len(res.prompt_ids):].tolist()
    print(f"\nqir greedy: {res.tokens_per_second:.1f} tok/s, {res.text!r}")
    assert len(res.token_ids) == 32
    assert res.token_ids == ref
    stopped = qir.generate(smollm_import, PROMPT, max_new_tokens=32)
    eos = smollm.tokenizer.eos_token_id
    assert stopped.stopped_at_eos and stopped.token_ids == ref[: ref.index(eos) + 1]


def test_smollm_perplexity_matches_pytorch(smollm, smollm_import) -> None:
    from qir.evaluate import perplexity, torch_logits_fn

    text = GPL3.read_text()
    t0 = time.perf_counter()
    got = perplexity(smollm_import, text, max_windows=PPL_WINDOWS)
    t1 = time.perf_counter()
    ref = perplexity(torch_logits_fn(smollm.module), text, tokenizer=smollm.tokenizer, max_windows=PPL_WINDOWS)
    t2 = time.perf_counter()
    print(f"\nppl qir {got.ppl:.6f} ({t1 - t0:.1f} s) torch {ref.ppl:.6f} ({t2 - t1:.1f} s), {got.tokens} tokens")
    assert got.windows == ref.windows == PPL_WINDOWS and got.tokens == PPL_WINDOWS * 511
    assert f"{got.ppl:.4g}" == f"{ref.ppl:.4g}"
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-5


# -- MiniLM ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from qir.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def minilm_import(minilm):
    from qir.frontend.importer import import_loaded

    return import_loaded(minilm)


def test_minilm_embeddings_match_eager(minilm, minilm_import) -> None:
    from qir.evaluate import DEFAULT_SENTENCES, embedding_cosine, qir_embed_fn

    m = minilm_import.module
    qir.verify(m)
    main = m.functions["main"]
    assert [v.name for v in main.inputs] == ["input_ids", "attention_mask"]
    assert str(main.outputs[0].type) == f"f32[batch,{minilm.facts.hidden_size}]"
    embed = qir_embed_fn(m, minilm.tokenizer, max_length=minilm.facts.max_seq_len)
    sentences = list(DEFAULT_SENTENCES)
    got = embed(sentences)
    ref = minilm.embed(sentences).numpy()
    assert rel_err(got, ref) < 1e-4
    cos = embedding_cosine(embed, lambda s: minilm.embed(s).numpy(), sentences)
    print(f"\nMiniLM qir vs eager: cosine mean {cos.cosine_mean:.8f} min {cos.cosine_min:.8f}")
    assert cos.cosine_min > 0.99999
    # Batch of one and a different padding length: the symbolic batch and seq really are symbolic.
    one = embed(sentences[3:4])
    assert rel_err(one, ref[3:4]) < 1e-4


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qir", *args], capture_output=True, text=True, timeout=600)


def test_cli_import_and_eval_minilm(tmp_path: Path) -> None:
    out = tmp_path / "minilm.qir"
    proc = _cli("import", "minilm-l6", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_suffix(".safetensors").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["kind"] == "encoder"
    summary = proc.stdout
    assert "parameters:" in summary and "stored bytes:" in summary and "ops by kind" in summary
    assert any(line.split()[:1] == ["linear"] for line in summary.splitlines())
    assert len(summary.splitlines()) < 40
    proc = _cli("eval", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(res) == {"cosine_mean", "cosine_min", "bytes"}
    assert res["cosine_mean"] > 0.99999 and res["cosine_min"] > 0.99999
    assert res["bytes"] == qir.stored_bytes(qir.load(out)) > 80_000_000
