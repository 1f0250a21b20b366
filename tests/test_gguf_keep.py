"""``keep_gguf_quantization``: a traced float module gets a small GGUF file's own blocks, bit-exactly.

The GGUF files are written with ``GGUFWriter`` (llama tensor names, Q/K weights permuted the way llama.cpp's
converter stores them); the module stands in for a traced model: constants ``@hf.<HF name>`` holding what
transformers' loader makes of the file (``gguf.quants.dequantize``, Q/K permutation undone), read by ``linear``
and ``embedding`` ops. The slow test imports SmolLM2 itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from qir.errors import QirError  # noqa: E402
from qir.frontend.gguf_keep import keep_gguf_quantization  # noqa: E402
from qir.gguf_blocks import GGUFFormatError  # noqa: E402
from qir.graph import Module  # noqa: E402
from qir.interpreter import run  # noqa: E402
from qir.parser import parse  # noqa: E402
from qir.printer import print_module  # noqa: E402
from qir.types import TensorType  # noqa: E402
from qir.verifier import verify  # noqa: E402

Q = gguf.GGMLQuantizationType
HEADS, KV, DIM, VOCAB = 4, 2, 64, 96


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the file stores)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' ``_reverse_permute_weights``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    """``tensors``: GGUF name -> (float weight in HF row order, GGUF type or raw bytes + type)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    for name, (arr, qtype) in tensors.items():
        if isinstance(qtype, tuple):  # (raw bytes, type): blocks gguf.quants cannot write
            raw, t = qtype
            w.add_tensor(name, raw, raw_dtype=t)
            continue
        stored = arr
        if ".attn_q." in name:
            stored = llama_permute(arr, HEADS)
        elif ".attn_k." in name:
            stored = llama_permute(arr, KV)
        if qtype == Q.F32:
            w.add_tensor(name, stored.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def traced_like(path: Path) -> Module:
    """The module an import of ``path`` would trace: float constants as transformers loads them."""
    reader = gguf.GGUFReader(str(path))
    data = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(d) for d in reversed(t.shape)])
        if ".attn_q." in t.name:
            arr = hf_unpermute(arr, HEADS)
        elif ".attn_k." in t.name:
            arr = hf_unpermute(arr, KV)
        data[t.name] = arr
    m = Module("tiny")
    emb = m.add_constant("hf.lm_head.weight", data["token_embd.weight"])  # tied: one table
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_down": "mlp.down_proj"}
    ws = {g: m.add_constant(f"hf.model.layers.0.{hf}.weight", data[f"blk.0.{g}.weight"]) for g, hf in names.items()}
    norm = m.add_constant("hf.model.norm.weight", data["output_norm.weight"])
    f = m.add_function("prefill")
    ids = f.add_input("tokens", TensorType.of("i64", [1, 5]))
    h = f.add_op("embedding", [emb, ids], names=["h"]).result
    q = f.add_op("linear", [h, ws["attn_q"]], names=["q"]).result
    k = f.add_op("linear", [h, ws["attn_k"]], names=["k"]).result
    d = f.add_op("linear", [f.add_op("concat", [q, k, q, k], {"axis": -1}, names=["qk"]).result, ws["ffn_down"]],
                 names=["d"]).result
    n = f.add_op("rms_norm", [d, norm], {"eps": 1e-5}, names=["n"]).result
    f.set_outputs([f.add_op("linear", [n, emb], names=["logits"]).result])
    verify(m)
    return m


def tiny_tensors(rng: np.random.Generator, q_type: object = Q.Q4_1) -> dict[str, tuple[np.ndarray, object]]:
    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    return {
        "token_embd.weight": (w(VOCAB, DIM), Q.Q8_0),
        "blk.0.attn_q.weight": (w(DIM, DIM), q_type),
        "blk.0.attn_k.weight": (w(KV * DIM // HEADS, DIM), Q.Q4_0),
        "blk.0.ffn_down.weight": (w(DIM, 2 * DIM + 2 * KV * DIM // HEADS), Q.Q5_1),
        "output_norm.weight": (np.ones(DIM, np.float32) + w(1, DIM)[0], Q.F32),
    }


def test_keep_rewrites_ops_and_preserves_outputs(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_tensors(np.random.default_rng(0)))
    m = traced_like(path)
    tokens = np.array([[1, 5, 7, 95, 0]], np.int64)
    want = run(m, [tokens])[0]
    report = keep_gguf_quantization(m, path)
    verify(m)
    assert report.kept == {"hf.lm_head.weight": "Q8_0", "hf.model.layers.0.self_attn.q_proj.weight": "Q4_1",
                           "hf.model.layers.0.self_attn.k_proj.weight": "Q4_0",
                           "hf.model.layers.0.mlp.down_proj.weight": "Q5_1"}
    assert report.float_tensors == ["output_norm.weight"]
    ops = [op.opcode for op in m.functions["prefill"].ops]
    assert ops.count("qmatmul") == 4 and "linear" not in ops and ops[0] == "qembedding"
    assert str(m.constants["hf.lm_head.weight"].type) == "i8[96,64] q(axis=1, group=32, scale=@hf.lm_head.weight.scale)"
    text = print_module(m)
    assert "offset=@hf.model.layers.0.self_attn.q_proj.weight.min" in text
    assert print_module(parse(text)) == text
    got = run(m, [tokens])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # same weights; only the op changed


def test_wrong_weight_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_tensors(np.random.default_rng(1)))
    m = traced_like(path)
    c = m.constants["hf.model.layers.0.mlp.down_proj.weight"]
    arr = c.numpy().copy()
    arr[3, 7] = np.nextafter(arr[3, 7], np.float32(1))  # one ulp off
    c.data = arr
    with pytest.raises(QirError, match="blk.0.ffn_down.weight .Q5_1. decoded into .* does not reproduce"):
        keep_gguf_quantization(m, path)


def test_unsupported_type_is_refused_by_name(tmp_path: Path) -> None:
    tensors = tiny_tensors(np.random.default_rng(2))
    raw = np.zeros((1, 84), np.uint8)  # one Q2_K super-block: 84 bytes for 256 elements
    tensors["blk.0.attn_q.weight"] = (np.zeros((1, 256), np.float32), (raw, Q.Q2_K))
    path = tmp_path / "q2k.gguf"
    write_gguf(path, tensors)
    with pytest.raises(GGUFFormatError, match="blk.0.attn_q.weight has GGUF type Q2_K, which qir cannot keep"):
        keep_gguf_quantization(Module("empty"), path)


def test_keep_quantized_refuses_non_gguf_sources(tmp_path: Path) -> None:
    from qir.frontend.importer import ModelImportError, import_model

    with pytest.raises(ModelImportError, match="--keep-quantized applies to GGUF models"):
        import_model(tmp_path / "x.qir", keep_quantized=True)


@pytest.mark.slow
def test_smollm2_keeps_its_own_blocks() -> None:
    """SmolLM2's GGUF kept quantized: 5.74 bits/param (the file's own) and the float model's logits."""
    import torch

    from qir.frontend.importer import import_model
    from qir.serialize import stored_bytes

    imported = import_model("smollm2-135m", keep_quantized=True, max_seq=64)
    m = imported.module
    kinds = {op.opcode for op in m.functions["prefill"].ops}
    assert "linear" not in kinds and "embedding" not in kinds
    refs = m.spec_references()
    params = sum(c.type.numel() for n, c in m.constants.items() if n not in refs)
    bits = 8 * stored_bytes(m) / params
    assert bits <= 5.745, bits  # the file's tensors: 96,576,768 bytes for 134,515,008 parameters = 5.7437
    tokens = np.array([[1, 504, 3458, 314, 253, 1743, 28, 30, 2]], np.int64)
    got = np.asarray(run(m, [tokens], function="prefill")[0])
    with torch.no_grad():
        want = imported.loaded.module(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def kept_tiny_model(tmp_path: Path, q_type: object) -> tuple[Module, np.ndarray, np.ndarray]:
    """The tiny GGUF of ``q_type`` linears, traced and kept quantized; a token row and the interpreter's logits."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_tensors(np.random.default_rng(3), q_type))
    m = traced_like(path)
    keep_gguf_quantization(m, path)
    tokens = np.array([[1, 5, 7, 95, 0]], np.int64)
    return m, tokens, np.asarray(run(m, [tokens])[0])


@pytest.mark.parametrize("q_type", [Q.Q4_1, Q.Q8_0])
def test_kept_module_runs_on_onnx_runtime(tmp_path: Path, q_type: object) -> None:
    """ort-cpu lowering: 4- and 8-bit MatMulNBits (+ a block-sum term for the minimum); the tied table once."""
    from qir.backends.onnx.lower import lower_function
    from qir.backends.onnx.runtime import make_session, run_session

    m, tokens, want = kept_tiny_model(tmp_path, q_type)
    lowered = lower_function(m, "prefill")
    ops = [n.op_type for n in lowered.model.graph.node]
    assert ops.count("MatMulNBits") == 4 and "DequantizeLinear" not in ops
    got = run_session(make_session(lowered.model.SerializeToString()), {"tokens": tokens})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the tied Q8_0 table is stored once (the head dequantizes the embedding's codes), its scales per block
    sizes = {i.name: int(np.prod(i.dims)) for i in lowered.model.graph.initializer}
    table = sum(v for k, v in sizes.items() if k.startswith("hf.lm_head.weight"))
    assert VOCAB * DIM <= table < VOCAB * DIM * 1.1


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q5_0"])
def test_k_quants_run_on_onnx_runtime(type_name: str) -> None:
    """Two-level scales (and minimums) lower with their real values expanded to one f32 per sub-block."""
    from test_gguf_blocks import k_blocks

    from qir.backends.onnx.lower import lower_function
    from qir.backends.onnx.runtime import make_session, run_session
    from qir.gguf_blocks import decode_blocks

    rng = np.random.default_rng(5)
    rows, cols = 8, 512
    if type_name == "Q5_0":
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.Q5_0)
    else:
        raw = k_blocks(type_name, rows * cols // 256, rng)
    bw = decode_blocks(raw, type_name, (rows, cols), "w")
    m = Module("k")
    for name, (arr, t) in bw.constants.items():
        m.add_constant(name, arr, type=t)
    w = m.add_constant("w", bw.codes, type=bw.type)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", cols]))
    f.set_outputs([f.add_op("qmatmul", [x, w], names=["y"]).result])
    verify(m)
    xs = rng.standard_normal((1, 3, cols)).astype(np.float32)
    want = np.asarray(run(m, [xs])[0])
    lowered = lower_function(m)
    assert "MatMulNBits" in {n.op_type for n in lowered.model.graph.node}
    got = run_session(make_session(lowered.model.SerializeToString()), {"x": xs})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(("model", "keep"), [("smollm2-135m", True), ("x.gguf", True), ("out/x.qir", False)])
def test_preset_keep_imports_with_keep_quantized(monkeypatch: pytest.MonkeyPatch, model: str, keep: bool) -> None:
    """``qir compile MODEL --preset keep``: no pipeline; GGUF sources import with keep_quantized, .qir files as is."""
    import qir.frontend.importer as importer
    from qir.tools import compile_cli

    seen: dict[str, object] = {}

    def fake_import(name: str, **kw: object) -> object:
        seen.update(kw)
        raise QirError("stop here")

    monkeypatch.setattr(importer, "import_model", fake_import)
    parser = __import__("argparse").ArgumentParser()
    compile_cli.add_compile_parser(parser.add_subparsers())
    args = parser.parse_args(["compile", model, "--preset", "keep", "-o", "out"])
    assert compile_cli.PRESETS["keep"] == ""
    with pytest.raises(QirError, match="stop here"):
        args.func(args)
    assert seen["keep_quantized"] is keep
