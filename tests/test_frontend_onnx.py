"""Tests of the ONNX importer (qir.frontend.onnx_import) and the .pt2 importer (qir.frontend.pt2).

ONNX files are made here with ``torch.onnx.export`` (the dynamo exporter, and the TorchScript one for one model)
from small torch modules (an MLP, a BERT-like block, a LLaMA-like block with RoPE/RMSNorm/causal GQA attention) and,
marked slow, from MiniLM. Each import is verified, run with the reference interpreter and compared with ONNX
Runtime on the same file, at more than one batch/sequence size (the sizes stay symbolic).
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import qir
from qir.frontend.onnx_import import ONNXImportError, import_onnx
from qir.frontend.pt2 import PT2ImportError, check_pt2_archive, import_pt2
from qir.shapes import SymDim

torch.manual_seed(0)


# -- small torch modules ----------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(x)))


class BertBlock(torch.nn.Module):
    def __init__(self, d: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h = h
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.f1 = torch.nn.Linear(d, 64)
        self.f2 = torch.nn.Linear(64, d)
        with torch.no_grad():  # distinct norm parameters, so a mix-up between them shows
            for p in (self.ln1.weight, self.ln1.bias, self.ln2.weight, self.ln2.bias):
                p.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.h, d // self.h).transpose(1, 2) for y in self.qkv(x).split(d, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].to(torch.bool))
        x = self.ln1(x + self.o(o.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.f2(F.gelu(self.f1(x))))


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class LlamaBlock(torch.nn.Module):
    def __init__(self, d: int = 32, h: int = 4, kv: int = 2, ff: int = 48) -> None:
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.v = torch.nn.Linear(d, kv * self.hd, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.g = torch.nn.Linear(d, ff, bias=False)
        self.u = torch.nn.Linear(d, ff, bias=False)
        self.dn = torch.nn.Linear(ff, d, bias=False)
        self.register_buffer("inv", 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)))

    @staticmethod
    def rot(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, -1)
        return torch.cat([-b, a], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        fr = torch.arange(t).float()[:, None] * self.inv[None]
        emb = torch.cat([fr, fr], -1)
        cos, sin = emb.cos(), emb.sin()
        y = self.n1(x)
        q = self.q(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + self.rot(q) * sin, k * cos + self.rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(o.transpose(1, 2).reshape(b, t, d))
        z = self.n2(x)
        return x + self.dn(F.silu(self.g(z)) * self.u(z))


def _export(model: torch.nn.Module, args: tuple[Any, ...], path: Path, dynamic: dict[str, dict[int, str]],
            dynamo: bool = True) -> Path:
    names = list(dynamic)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {n: {ax: torch.export.Dim(s, min=2 if s == "seq" else 1, max=512) for ax, s in d.items()}
                    for n, d in dynamic.items()}
            prog = torch.onnx.export(model.eval(), args, dynamic_shapes=dims, dynamo=True, input_names=names,
                                     verbose=False)
            prog.save(str(path))
        else:
            torch.onnx.export(model.eval(), args, str(path), dynamo=False, input_names=names, output_names=["out"],
                              dynamic_axes=dynamic, opset_version=17)
    return path


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def small_models(onnx_dir: Path) -> dict[str, Path]:
    """The three small modules, exported once per session (about 5 s in all)."""
    torch.manual_seed(0)
    return {
        "mlp": _export(MLP(), (torch.randn(2, 5, 16),), onnx_dir / "mlp.onnx", {"x": {0: "batch", 1: "seq"}}),
        "bert": _export(BertBlock(), (torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)),
                        onnx_dir / "bert.onnx", {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}),
        "bert_ts": _export(BertBlock(), (torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)),
                           onnx_dir / "bert_ts.onnx", {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}},
                           dynamo=False),
        "llama": _export(LlamaBlock(), (torch.randn(1, 6, 32),), onnx_dir / "llama.onnx", {"x": {1: "seq"}}),
    }


def _feeds(path: Path, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in ort.InferenceSession(str(path)).get_inputs():
        shape = [d if isinstance(d, int) else {"batch": batch, "seq": seq}[d] for d in i.shape]
        if "int64" in i.type:
            if "mask" in i.name:
                a = rng.integers(0, 2, shape)
                a[:, :2] = 1  # every row attends somewhere
            else:
                a = rng.integers(0, 1000, shape)
            feeds[i.name] = a.astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _compare(path: Path, module: qir.Module, batch: int, seq: int) -> float:
    feeds = _feeds(path, batch, seq)
    ref = ort.InferenceSession(str(path)).run(None, feeds)
    out = qir.run(module, feeds)
    assert len(out) == len(ref)
    worst = 0.0
    for r, o in zip(ref, out):
        assert o.shape == r.shape
        worst = max(worst, float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-12)))
    return worst


def _opcodes(module: qir.Module) -> Counter[str]:
    return Counter(op.opcode for op in module.main.ops)


# -- small models -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["mlp", "bert", "bert_ts", "llama"])
def test_small_models_match_onnxruntime_at_several_sizes(small_models: dict[str, Path], key: str) -> None:
    m = import_onnx(small_models[key])
    qir.verify(m)
    for batch, seq in ((1, 3), (3, 11)):
        if key == "llama":
            batch = 1
        err = _compare(small_models[key], m, batch, seq)
        assert err < 1e-4, (key, batch, seq, err)
    if key != "mlp":  # both exporters' decomposed SDPA becomes one attention op
        assert _opcodes(m)["attention"] == 1


def test_odd_dim_params_become_valid_symbol_names() -> None:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch size", "2nd", None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert str(m.main.inputs[0].type) == "f32[batch_size,d_2nd,d0,4]"
    (y,) = qir.run(m, [np.full((2, 3, 5, 4), -1.0, np.float32)])
    assert y.shape == (2, 3, 5, 4) and not y.any()


def test_mlp_maps_to_linear_with_fused_bias_and_keeps_symbolic_sizes(small_models: dict[str, Path]) -> None:
    m = import_onnx(small_models["mlp"])
    assert [op.opcode for op in m.main.ops] == ["linear", "gelu", "linear"]
    assert all(len(op.operands) == 3 for op in m.main.find_ops("linear"))  # bias folded into linear
    x = m.main.inputs[0]
    assert x.name == "x" and x.type.shape == (SymDim((("batch", 1),)), SymDim((("seq", 1),)), 16)
    assert str(m.main.outputs[0].type) == "f32[batch,seq,8]"
    # weights are stored once, transposed to [out, in], named after the torch parameters
    assert m.constant("a.weight").type.shape == (32, 16) and m.constant("b.weight").type.shape == (8, 32)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(small_models["mlp"])).graph.initializer}
    assert any(np.array_equal(a.T, m.constant("a.weight").numpy()) for a in init.values() if a.ndim == 2)


def test_shape_computations_are_folded_not_run(small_models: dict[str, Path]) -> None:
    """The BERT block's Shape -> Slice/Gather -> Concat -> Reshape chains leave no shape ops in qir."""
    model = onnx.load(str(small_models["bert"]))
    onnx_ops = Counter(n.op_type for n in model.graph.node)
    assert onnx_ops["Shape"] >= 2 and onnx_ops["Concat"] >= 2  # the export really has shape arithmetic
    m = import_onnx(model)
    ops = _opcodes(m)
    assert "concat" not in ops and "gather" not in ops and "arange" not in ops
    assert ops["linear"] == 4 and ops["layer_norm"] == 2 and ops["attention"] == 1
    assert "softmax" not in ops and "matmul" not in ops  # the decomposed SDPA is one attention op again
    (att,) = m.main.find_ops("attention")
    assert att.attrs["scale"] == pytest.approx(1 / math.sqrt(8)) and len(att.operands) == 4  # with the padding mask
    shapes = [op.attrs["shape"] for op in m.main.find_ops("reshape")]
    assert ("batch", "seq", 4, 8) in shapes  # the head split keeps the symbolic sizes
    # distinct LayerNorm parameters stay distinct
    lns = m.main.find_ops("layer_norm")
    assert lns[0].operands[1] is not lns[1].operands[1]


def test_llama_block_rope_range_is_symbolic(small_models: dict[str, Path]) -> None:
    m = import_onnx(small_models["llama"])
    ar = m.main.find_ops("arange")
    assert ar and all(op.attrs["size"] == ("seq",) for op in ar)
    ops = _opcodes(m)
    assert ops["linear"] == 7 and ops["rms_norm"] == 2 and ops["silu"] == 1 and ops["attention"] == 1
    assert "pow" not in ops and "sigmoid" not in ops and "matmul" not in ops
    (att,) = m.main.find_ops("attention")
    assert att.operands[1].type.shape[1] == 2 and att.operands[0].type.shape[1] == 4  # grouped-query heads kept
    # the exported causal mask (Trilu over [seq, seq]) folds into causal=true: no mask operand, no mask ops
    assert att.attrs["causal"] is True and len(att.operands) == 3
    assert "le" not in ops and "eq" not in ops and "where" not in ops
    text = qir.print_module(m)
    assert "f32[1,seq,32]" in text


def test_handmade_shape_chain_folds_to_one_reshape() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, on a symbolic batch and sequence."""
    g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], name="shape"),
         helper.make_node("Gather", ["s", "i0"], ["b"], name="g0", axis=0),
         helper.make_node("Gather", ["s", "i1"], ["t"], name="g1", axis=0),
         helper.make_node("Mul", ["t", "two"], ["t2"], name="mul"),
         helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"], name="u0"),
         helper.make_node("Unsqueeze", ["t2", "ax0"], ["tu"], name="u1"),
         helper.make_node("Concat", ["bu", "tu", "m1"], ["shape_out"], name="cat", axis=0),
         helper.make_node("Reshape", ["x", "shape_out"], ["y"], name="reshape"),
         helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor("i0", TensorProto.INT64, [], [0]), helper.make_tensor("i1", TensorProto.INT64, [], [1]),
         helper.make_tensor("two", TensorProto.INT64, [], [2]), helper.make_tensor("ax0", TensorProto.INT64, [1], [0]),
         helper.make_tensor("m1", TensorProto.INT64, [1], [-1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m = import_onnx(model)
    assert [op.opcode for op in m.main.ops] == ["reshape", "relu"]
    rs = m.main.ops[0]
    assert rs.attrs["shape"] == ("batch", "2*seq", -1) and str(rs.result.type) == "f32[batch,2*seq,3]"
    assert rs.loc == "reshape" and rs.result.name == "y"
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    (z,) = qir.run(m, [x])
    np.testing.assert_array_equal(z, np.maximum(x.reshape(2, 8, 3), 0))


def test_gemm_and_names_match_onnxruntime(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    c = rng.standard_normal((5,)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm/0", transB=1, alpha=0.5),
         helper.make_node("Tanh", ["y"], ["out:0"], name="tanh")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("out:0", TensorProto.FLOAT, [3, 5])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(c, "c")])
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    m = import_onnx(path)
    qir.verify(m)
    assert m.main.outputs[0].name == "out_0" and m.main.ops[0].loc == "gemm/0"
    x = rng.standard_normal((3, 4)).astype(np.float32)
    (ref,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    (out,) = qir.run(m, [x])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_unsupported_ops_are_listed_with_counts_and_node_names() -> None:
    nodes = [helper.make_node("Hardmax", ["x"], ["a"], name="hm_first"),
             helper.make_node("Hardmax", ["a"], ["b"], name="hm_second"),
             helper.make_node("Relu", ["b"], ["c"], name="ok"),
             helper.make_node("Frobnicate", ["c"], ["d"], name="custom_one", domain="com.example")]
    g = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(ONNXImportError) as info:
        import_onnx(model)
    msg = str(info.value)
    assert "2 unsupported ONNX op types" in msg
    assert "Hardmax: 2 nodes (first: hm_first, hm_second)" in msg
    assert "com.example.Frobnicate: 1 node (first: custom_one)" in msg
    assert "Relu:" not in msg.split("supported ops:")[0]
    assert isinstance(info.value, qir.QirError)


def test_bad_files_raise_qir_errors(tmp_path: Path) -> None:
    with pytest.raises(ONNXImportError, match="no such file"):
        import_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(ONNXImportError, match="not a readable ONNX model"):
        import_onnx(junk)


def test_imported_module_saves_and_reloads(small_models: dict[str, Path], tmp_path: Path) -> None:
    m = import_onnx(small_models["bert"])
    qir.save(m, tmp_path / "bert.qir")
    m2 = qir.load(tmp_path / "bert.qir")
    assert _compare(small_models["bert"], m2, 2, 6) < 1e-4


def test_import_model_dispatches_onnx_files(small_models: dict[str, Path]) -> None:
    from qir.frontend.importer import import_model

    imported = import_model(small_models["mlp"])
    assert _opcodes(imported.module)["linear"] == 2


# -- .pt2 -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_pt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.export.ExportedProgram]:
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.manual_seed(0)
    with torch.no_grad():
        ep = torch.export.export(MLP().eval(), (torch.randn(2, 5, 16),),
                                 dynamic_shapes={"x": {1: torch.export.Dim("seq", min=2, max=64)}})
    torch.export.save(ep, str(path))
    return path, ep


def test_pt2_import_matches_the_exported_program(mlp_pt2: tuple[Path, Any]) -> None:
    path, ep = mlp_pt2
    m = import_pt2(path)
    qir.verify(m)
    assert _opcodes(m)["linear"] == 2
    # a .pt2 file does not keep the torch.export.Dim names: the symbol is torch's own unless renamed
    loaded = torch.export.load(str(path))
    (sym,) = [str(s) for s in loaded.range_constraints]
    assert str(m.main.inputs[0].type) == f"f32[2,{sym},16]"
    named = import_pt2(path, dim_names={sym: "seq"})
    assert str(named.main.inputs[0].type) == "f32[2,seq,16]"
    for seq in (3, 9):
        x = torch.randn(2, seq, 16)
        with torch.no_grad():
            ref = ep.module()(x).numpy()
        (out,) = qir.run(m, [x.numpy()])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_pt2_refuses_non_zip_and_foreign_zip(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"PK? not really a zip file")
    with pytest.raises(PT2ImportError, match="not a zip archive"):
        import_pt2(bad)
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("data.pkl", b"\x80\x04K\x01.")
    with pytest.raises(PT2ImportError, match="archive_format"):
        import_pt2(foreign)
    with pytest.raises(PT2ImportError, match="no such file"):
        import_pt2(tmp_path / "missing.pt2")


def _rewrite(src: Path, dst: Path, edit: Any) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


def test_pt2_refuses_pickled_payloads(mlp_pt2: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = mlp_pt2
    check_pt2_archive(path)  # the plain archive passes

    def mark_pickled(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    pickled = tmp_path / "pickled.pt2"
    _rewrite(path, pickled, mark_pickled)
    with pytest.raises(PT2ImportError, match="pickled"):
        import_pt2(pickled)

    def evil_samples(name: str, data: bytes) -> bytes:
        if "sample_inputs" in name:
            buf = io.BytesIO()
            torch.save({"x": Fraction(1, 3)}, buf)  # an arbitrary class: refused by weights_only=True
            return buf.getvalue()
        return data

    evil = tmp_path / "evil.pt2"
    _rewrite(path, evil, evil_samples)
    with pytest.raises(PT2ImportError, match="weights_only"):
        import_pt2(evil)


# -- MiniLM (slow) ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_onnx(onnx_dir: Path) -> Iterator[tuple[Path, Any]]:
    from qir.models import load_model

    enc = load_model("minilm-l6")

    class LastHidden(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tok = enc.tokenizer(["hello world", "a somewhat longer sentence for the encoder"], padding=True,
                        return_tensors="pt")
    path = _export(LastHidden(enc.module), (tok["input_ids"], tok["attention_mask"]), onnx_dir / "minilm.onnx",
                   {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    yield path, enc


@pytest.mark.slow
def test_minilm_onnx_matches_onnxruntime_and_torch(minilm_onnx: tuple[Path, Any]) -> None:
    path, enc = minilm_onnx
    m = import_onnx(path)
    qir.verify(m)
    ops = _opcodes(m)
    assert ops["linear"] == 36 and ops["layer_norm"] == 13 and ops["embedding"] == 3
    assert [str(v.type) for v in m.main.inputs] == ["i64[batch,seq]", "i64[batch,seq]"]
    texts = ["The capital of France is Paris.", "Paris is the capital of France, a country in Europe.",
             "I like trains."]
    tok = enc.tokenizer(texts, padding=True, return_tensors="np")
    feeds = {"input_ids": tok["input_ids"].astype(np.int64), "attention_mask": tok["attention_mask"].astype(np.int64)}
    (out,) = qir.run(m, feeds)
    (ref,) = ort.InferenceSession(str(path)).run(None, feeds)
    assert float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))) < 1e-4
    with torch.no_grad():
        eager = enc.module(input_ids=torch.from_numpy(feeds["input_ids"]),
                           attention_mask=torch.from_numpy(feeds["attention_mask"])).last_hidden_state.numpy()
    valid = feeds["attention_mask"].astype(bool)  # padded positions are not part of the contract
    assert float(np.max(np.abs(out[valid] - eager[valid])) / np.max(np.abs(eager[valid]))) < 1e-4


# -- SmolLM2 prefill (slow: about 20 s load, 50 s export) ---------------------------------------------------------
@pytest.mark.slow
def test_smollm2_prefill_onnx_matches_onnxruntime_and_torch(onnx_dir: Path) -> None:
    from qir.frontend.causal_lm import FunctionalCausalLM
    from qir.models import load_model

    lm = load_model("smollm2-135m")
    ids = np.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]], np.int64)
    wrapper = FunctionalCausalLM(lm.module, "prefill").eval()
    with torch.no_grad():
        eager = [t.numpy() for t in wrapper(torch.from_numpy(ids))]
    path = _export(wrapper, (torch.from_numpy(ids[:, :8]),), onnx_dir / "smollm2_prefill.onnx", {"tokens": {1: "seq"}})
    del wrapper, lm
    m = import_onnx(path)
    qir.verify(m)
    ops = _opcodes(m)
    # transformer-level ops survive: 7 linears per layer + the head, norms, attention, SiLU
    assert ops["linear"] == 211 and ops["rms_norm"] == 61 and ops["attention"] == 30 and ops["silu"] == 30
    assert ops["embedding"] == 1
    assert all(op.attrs["causal"] and len(op.operands) == 3 for op in m.main.find_ops("attention"))
    head = m.main.find_ops("linear")[-1].operands[1]
    assert head is m.main.find_ops("embedding")[0].operands[0]  # the tied LM head shares the embedding table
    assert str(m.main.inputs[0].type) == "i64[1,seq]" and len(m.main.outputs) == 61
    assert str(m.main.outputs[1].type) == "f32[1,3,seq,64]"
    out = qir.run(m, [ids])
    ref = ort.InferenceSession(str(path)).run(None, {"tokens": ids})
    for o, r, e in zip(out, ref, eager):
        scale = float(np.max(np.abs(e)))
        assert float(np.max(np.abs(o - r))) / scale < 1e-4
        assert float(np.max(np.abs(o - e))) / scale < 1e-4
    assert out[0][0, -1].argmax() == eager[0][0, -1].argmax()
