"""Generation, perplexity, cosine and the import/eval plumbing on small hand-built modules (no real model).

The toy causal LM is a qir module with ``prefill`` and ``decode`` whose logits are rows of a table: token ``t`` is
always followed by ``perm[t]``, so greedy generation and perplexity have answers known in closed form.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qir
from qir.evaluate import (
    DEFAULT_SENTENCES,
    EvaluationError,
    embedding_cosine,
    evaluate,
    perplexity,
    perplexity_of_ids,
    window_ids,
)
from qir.frontend.importer import (
    LoadedImport,
    ModelImportError,
    import_model,
    read_sidecar,
    save_import,
    sidecar_path,
)
from qir.generate import GenerationError, InterpreterRunner, generate, generate_ids, prompt_ids
from qir.types import TensorType

V, SLOTS, HD = 11, 16, 4
PERM = [(3 * t + 2) % V for t in range(V)]   # 3 is invertible mod 11: a permutation


def toy_lm(peak: float = 8.0) -> qir.Module:
    """prefill(tokens[1,seq]) -> logits, k.0, v.0 ; decode(token, position, cache.k.0, cache.v.0) -> same."""
    table = np.zeros((V, V), np.float32)
    table[np.arange(V), PERM] = peak
    m = qir.Module("toy")
    tab = m.add_constant("lm.table", table)
    kv_tab = m.add_constant("lm.kv", np.arange(V * HD, dtype=np.float32).reshape(V, HD))
    f = m.add_function("prefill")
    toks = f.add_input("tokens", TensorType.of("i64", [1, "seq"]))
    logits = f.add_op("embedding", [tab, toks], names=["logits"]).result
    e = f.add_op("embedding", [kv_tab, toks], names=["e"]).result                      # [1, seq, HD]
    k = f.add_op("unsqueeze", [e], {"axis": 1}, names=["k.0"]).result                  # [1, 1, seq, HD]
    v = f.add_op("neg", [k], names=["v.0"]).result
    f.set_outputs([logits, k, v])
    d = m.add_function("decode")
    tok = d.add_input("token", TensorType.of("i64", [1, 1]))
    d.add_input("position", TensorType.of("i64", [1]))
    ck = d.add_input("cache.k.0", TensorType.of("f32", [1, 1, SLOTS, HD]))
    cv = d.add_input("cache.v.0", TensorType.of("f32", [1, 1, SLOTS, HD]))
    lg = d.add_op("embedding", [tab, tok], names=["logits"]).result
    k2 = d.add_op("neg", [d.add_op("neg", [ck], names=["k.t"]).result], names=["k.0"]).result
    v2 = d.add_op("neg", [d.add_op("neg", [cv], names=["v.t"]).result], names=["v.0"]).result
    d.set_outputs([lg, k2, v2])
    qir.verify(m)
    return m


class CharTokenizer:
    """Token ids are letters a..k; a chat template wraps the prompt in 'k' ... 'j'; eos is 'j' (9)."""

    chat_template = "toy"
    eos_token_id = 9

    def __call__(self, text, add_special_tokens=False, **kw):
        if isinstance(text, list):
            raise NotImplementedError
        return {"input_ids": [ord(c) - ord("a") for c in text if "a" <= c <= "k"]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [10, *self(messages[0]["content"])["input_ids"], 9 if not add_generation_prompt else 8]

    def decode(self, ids, **kw):
        return "".join(chr(ord("a") + i) for i in ids)


def expected_chain(start: int, n: int) -> list[int]:
    out, t = [], start
    for _ in range(n):
        t = PERM[t]
        out.append(t)
    return out


def test_generate_through_interpreter_follows_the_table_and_streams() -> None:
    m = toy_lm()
    streamed: list[str] = []
    res = generate(m, "abc", tokenizer=CharTokenizer(), max_new_tokens=6, stop_at_eos=False,
                   on_text=streamed.append)
    assert res.prompt_ids == [10, 0, 1, 2, 8]
    assert res.token_ids == expected_chain(8, 6)
    assert "".join(streamed) == res.text == CharTokenizer().decode(res.token_ids)
    assert len(res.per_token_seconds) == 5 and res.tokens_per_second > 0


def test_generate_stops_at_eos() -> None:
    # from 1: PERM[1] = 5, PERM[5] = 6, PERM[6] = 9 (the EOS)
    chain = expected_chain(1, 12)
    assert 9 in chain
    res = generate(toy_lm(), [1], tokenizer=CharTokenizer(), max_new_tokens=12)
    assert res.stopped_at_eos and res.token_ids == chain[: chain.index(9) + 1]
    assert res.text == CharTokenizer().decode(res.token_ids[:-1])


def test_generate_errors() -> None:
    m = toy_lm()
    with pytest.raises(GenerationError, match="exceeds the decode graph's cache of 16 slots"):
        generate_ids(m, list(range(10)), max_new_tokens=7)
    with pytest.raises(GenerationError, match="empty"):
        generate_ids(m, [], max_new_tokens=3)
    no_decode = qir.Module("x")
    with pytest.raises(GenerationError, match="no function @prefill"):
        InterpreterRunner(no_decode)
    with pytest.raises(GenerationError, match="needs a tokenizer"):
        generate(m, "abc")


def test_prompt_ids_plain_and_chat() -> None:
    tok = CharTokenizer()
    assert prompt_ids(tok, "bad") == [10, 1, 0, 3, 8]
    assert prompt_ids(tok, "bad", chat=False) == [1, 0, 3]


def test_window_ids() -> None:
    ids = list(range(1300))
    w = window_ids(ids, window=512, max_windows=8)
    assert [len(x) for x in w] == [512, 512] and w[1][0] == 512
    assert window_ids(ids, window=512, max_windows=1) == [ids[:512]]
    assert window_ids(ids[:100], window=512) == [ids[:100]]
    with pytest.raises(EvaluationError, match="at least 2"):
        window_ids([5])


def test_perplexity_of_known_distributions() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=40).tolist()

    def uniform(tokens: np.ndarray) -> np.ndarray:
        return np.zeros(tokens.shape + (V,), np.float32)

    res = perplexity_of_ids(uniform, ids, window=8, max_windows=3)
    assert res.windows == 3 and res.tokens == 21
    assert math.isclose(res.ppl, V, rel_tol=1e-9)

    # A model that knows the next token with logit p: NLL = log(1 + (V-1) e^-p) per prediction.
    chain = [0, *expected_chain(0, 30)]
    toy = toy_lm(peak=3.0)
    ppl = perplexity(toy, " ".join(chr(ord("a") + t) for t in chain), tokenizer=CharTokenizer(), window=10,
                     max_windows=None)
    expect = 1 + (V - 1) * math.exp(-3.0)
    assert ppl.windows == 3 and ppl.tokens == 27
    assert math.isclose(ppl.ppl, expect, rel_tol=1e-6)


def test_perplexity_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 12, V)).astype(np.float32)
    ids = rng.integers(0, V, size=12).tolist()
    res = perplexity_of_ids(lambda t: logits, ids, window=12)
    x = logits[0, :-1].astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.mean([logp[i, ids[i + 1]] for i in range(11)])
    assert math.isclose(res.nll, nll, rel_tol=1e-12)


def test_embedding_cosine() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((len(DEFAULT_SENTENCES), 8))

    def ref(s):
        return base[: len(s)]

    same = embedding_cosine(lambda s: 3.0 * base[: len(s)], ref)
    assert math.isclose(same.cosine_mean, 1.0, rel_tol=1e-12) and math.isclose(same.cosine_min, 1.0, rel_tol=1e-12)
    noisy = embedding_cosine(lambda s: base[: len(s)] + 0.3 * rng.standard_normal((len(s), 8)), ref)
    assert noisy.cosine_min < noisy.cosine_mean < 1.0 and len(noisy.cosines) == len(DEFAULT_SENTENCES)
    with pytest.raises(EvaluationError, match="shapes differ"):
        embedding_cosine(lambda s: base[: len(s), :4], ref)


def test_evaluate_causal_lm_json_keys(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abcdefghijk" * 3)
    imp = LoadedImport(module=toy_lm(), kind="causal-lm", source="toy", tokenizer=CharTokenizer())
    res = evaluate(imp, text=text, window=8)
    assert set(res) == {"ppl", "tokens", "bytes"}
    assert res["bytes"] == qir.stored_bytes(imp.module) == (V * V + V * HD) * 4
    assert res["tokens"] == 4 * 7 and res["ppl"] > 1
    with pytest.raises(EvaluationError, match="--text"):
        evaluate(imp)


def test_sidecar_round_trip(tmp_path: Path) -> None:
    imp = LoadedImport(module=toy_lm(), kind="causal-lm", source="toy-source", options={"max_seq": SLOTS})
    out = tmp_path / "toy.qir"
    side = save_import(imp, out)
    assert side == sidecar_path(out) == tmp_path / "toy.json"
    assert read_sidecar(out) == {"source": "toy-source", "kind": "causal-lm", "max_seq": SLOTS}
    assert (tmp_path / "toy.safetensors").is_file()
    with pytest.raises(ModelImportError, match="must end in .qir"):
        save_import(imp, tmp_path / "toy.bin")
    side.write_text("{not json")
    with pytest.raises(ModelImportError, match="unreadable sidecar"):
        import_model(out)


def test_import_qir_without_sidecar_is_unknown(tmp_path: Path) -> None:
    out = tmp_path / "toy.qir"
    qir.save(toy_lm(), out)
    imp = import_model(out)
    assert imp.kind == "unknown" and imp.tokenizer is None
    assert [f for f in imp.module.functions] == ["prefill", "decode"]


def test_import_errors() -> None:
    with pytest.raises(qir.QirError, match="neither a known model"):
        import_model("no-such-model-anywhere")
    with pytest.raises(ModelImportError, match="no such file"):
        import_model("/nonexistent/x.qir")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qir", *args], capture_output=True, text=True, timeout=300)


def test_cli_eval_of_toy_qir(tmp_path: Path) -> None:
    out = tmp_path / "toy.qir"
    qir.save(toy_lm(), out)
    proc = _cli("eval", str(out), "--json")
    assert proc.returncode == 2 and "model family unknown" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("import", "no-such-model-anywhere", "-o", str(tmp_path / "x.qir"))
    assert proc.returncode == 2 and "neither a known model" in proc.stderr
    proc = _cli("import", "minilm-l6", "-o", str(tmp_path / "x.bin"))
    assert proc.returncode == 2 and "must end in .qir" in proc.stderr
    proc = _cli("eval", str(out), "--text", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "no such text file" in proc.stderr


def test_import_model_dispatches_pt2_and_onnx(tmp_path: Path) -> None:
    import onnx
    import torch
    from onnx import TensorProto, helper

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    pt2 = tmp_path / "double.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(Double(), (torch.ones(2, 3),)), str(pt2))
    imp = import_model(pt2, name="double")
    assert imp.kind == "unknown" and imp.module.name == "double"
    (y,) = qir.run(imp.module, [np.arange(6, dtype=np.float32).reshape(2, 3)])
    assert np.array_equal(y, 2 * np.arange(6, dtype=np.float32).reshape(2, 3))

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [out])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    imp = import_model(path)
    (y,) = qir.run(imp.module, [np.ones((2, 3), np.float32)])
    assert imp.kind == "unknown" and np.array_equal(y, np.full((2, 3), 2, np.float32))
