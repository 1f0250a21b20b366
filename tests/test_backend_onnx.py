"""The ONNX Runtime backend: lowering (float and quantized) against the reference interpreter, targets, legality,
the artifact folder and ``qir compile``.

Small modules built with the graph API run in milliseconds; the real-model checks (MiniLM, SmolLM2) are
``@pytest.mark.slow`` and share module-scoped imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from qweights import add_quantized_weight as _weight

import qir
from qir.backends.compile import CompileError, compile_module, load_artifact
from qir.backends.onnx.legality import check_module
from qir.backends.onnx.lower import LowerError, LowerOptions, lower_function
from qir.backends.onnx.runtime import make_session, optimized_op_counts
from qir.backends.target import TargetError, load_target
from qir.interpreter import run
from qir.quantspec import QuantSpec
from qir.types import TensorType

ort = pytest.importorskip("onnxruntime")


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str = "all") -> list[np.ndarray]:
    sess = make_session(model.SerializeToString(), level=level,
                        session_config={"session.qdq_matmulnbits_accuracy_level": "1"})
    return sess.run(None, feeds)


def _mlp(x_spec: QuantSpec | None, w_dt: str = "i8", *, k: int = 64, n: int = 48, bias: bool = True,
         x_dt: str = "i8", **wkw: object) -> qir.Module:
    rng = np.random.default_rng(3)
    m = qir.Module("t")
    w = _weight(m, "w", rng.standard_normal((n, k)).astype(np.float32), w_dt, **wkw)
    b = m.add_constant("b", rng.standard_normal(n).astype(np.float32)) if bias else None
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, "seq", k]))
    xin = x
    if x_spec is not None:
        xin = f.add_op("quantize", [x], result_types=[TensorType.of(x_dt, [2, "seq", k], x_spec)],
                       names=["x.q"]).result
    y = f.add_op("qmatmul", [xin, w] + ([b] if b is not None else []), names=["y"]).result
    f.set_outputs([f.add_op("gelu", [y], names=["z"]).result])
    return m


def _x(k: int = 64, seq: int = 7) -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((2, seq, k)) * 2).astype(np.float32)


# -- float lowering -------------------------------------------------------------------------------------------
def test_float_ops_match_interpreter_and_keep_names() -> None:
    rng = np.random.default_rng(0)
    m = qir.Module("f")
    wq = m.add_constant("wq", rng.standard_normal((32, 16)).astype(np.float32))
    g = m.add_constant("g", rng.standard_normal(32).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 16]))
    h = f.add_op("linear", [x, wq], names=["h"]).result
    n = f.add_op("rms_norm", [h, g], {"eps": 1e-5}, names=["n"]).result
    r = f.add_op("reshape", [n], {"shape": [1, "seq", 4, 8]}, names=["r"]).result
    t = f.add_op("transpose", [r], {"perm": [0, 2, 1, 3]}, names=["t"]).result
    k = f.add_op("slice", [t], {"axis": 1, "end": 2}, names=["k"]).result
    a = f.add_op("attention", [t, k, k], {"causal": True}, names=["a"]).result
    s = f.add_op("silu", [a], names=["s"]).result
    f.set_outputs([f.add_op("softmax", [s], {"axis": -1}, names=["o"]).result])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    assert [i.name for i in lf.model.graph.input] == ["x"] and lf.model.graph.output[0].name == "o"
    assert lf.model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    assert {"h", "n", "a"} <= {o for node in lf.model.graph.node for o in node.output}
    xs = rng.standard_normal((1, 5, 16)).astype(np.float32)
    (o,) = _ort_run(lf.model, {"x": xs})
    (ref,) = run(m, [xs])
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)


def test_unlowerable_constructs_are_refused_by_name() -> None:
    bad = qir.Module("b")
    g = bad.add_function("main")
    g.add_input("x", TensorType.of("i8", [3], QuantSpec.dynamic_spec()))
    g.set_outputs([g.inputs[0]])
    with pytest.raises(LowerError, match="input %x of @main"):
        lower_function(bad)
    m = qir.Module("g")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 64]))
    q = f.add_op("quantize", [x], result_types=[TensorType.of("i8", [2, 64], QuantSpec.dynamic_spec(1, 16))],
                 names=["x.q"]).result
    f.set_outputs([f.add_op("dequantize", [q], names=["d"]).result])
    with pytest.raises(LowerError, match="%x.q: dynamic quantization in groups of 16"):
        lower_function(m)


# -- quantized lowering ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_u8", [True, False])
def test_w8a8_per_token_is_bit_exact_and_fused_safely(act_u8: bool) -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64), axis=0)
    lf = lower_function(m, options=LowerOptions(act_u8=act_u8))
    onnx.checker.check_model(lf.model, full_check=True)
    model = lf.model
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("y"))
    # Read only by MatMulInteger, the codes exist as their u8 form (+128) under "<name>::u8".
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("x.q::u8" if act_u8 else "x.q"))
    xs = _x()
    refs: dict[str, object] = {}
    run(m, [xs], observer=lambda v, rv: refs.__setitem__(v.name, rv))
    for level in ("none", "all"):  # "all": ORT's fusions must not change the integer path's result
        z, y, xq = _ort_run(model, {"x": xs}, level)
        np.testing.assert_array_equal(xq.astype(np.int16) - (128 if act_u8 else 0), refs["x.q"].codes)
        np.testing.assert_array_equal(y, refs["y"])


def test_w8a8_integer_kernels_in_optimized_graph(tmp_path: Path) -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64), axis=0)
    res = compile_module(m, "ort-cpu", tmp_path / "a")
    ops = optimized_op_counts(tmp_path / "a" / "model.onnx")
    # The integer GEMM with the weight scale fused into it, then the per-token scale: no float GEMM is left.
    assert ops.get("com.microsoft:MatMulIntegerToFloat", 0) == 1 and "MatMul" not in ops, ops
    assert res.report["functions"]["main"]["onnx_ops"]["com.microsoft.MatMulIntegerToFloat"] == 1


def test_static_per_tensor_asym_and_asym_weights() -> None:
    m = _mlp(QuantSpec.per_tensor(0.03, 7), "u8", x_dt="u8", axis=0, symmetric=False)
    xs = _x()
    (ref,) = run(m, [xs])
    for mode in ("integer", "qdq"):
        lf = lower_function(m, options=LowerOptions(qmatmul=mode))
        onnx.checker.check_model(lf.model, full_check=True)
        (o,) = _ort_run(lf.model, {"x": xs})
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)


def test_dynamic_asymmetric_per_token_uses_zero_point_correction() -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64, symmetric=False), x_dt="u8", axis=0)
    xs = _x() + 1.5
    (ref,) = run(m, [xs])
    (o,) = _ort_run(lower_function(m).model, {"x": xs})
    np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt,sym", [("i4", True), ("u4", False), ("i8", True), ("u8", False)])
def test_weight_only_per_group(dt: str, sym: bool) -> None:
    m = _mlp(None, dt, k=96, axis=1, group_size=32, symmetric=sym)
    xs = _x(96)
    (ref,) = run(m, [xs])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    kinds = {n.op_type for n in lf.model.graph.node}
    assert "MatMulNBits" in kinds  # 4- and 8-bit groups of 32 (fp32 compute, accuracy_level 0)
    for level in ("none", "all"):
        (o,) = _ort_run(lf.model, {"x": xs}, level)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)
    (o,) = _ort_run(lower_function(m, options=LowerOptions(int4="qdq")).model, {"x": xs})
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("k", "block", "kw"), [(96, 32, {"axis": 0}), (384, 128, {"axis": 0, "symmetric": False}),
                                                (64, 64, {"axis": None})])
def test_int8_weight_only_per_row_runs_as_matmulnbits(k: int, block: int, kw: dict[str, object]) -> None:
    """Per-row (or per-tensor) int8 weights become MatMulNBits blocks repeating the row's scale."""
    m = _mlp(None, "i8", k=k, **kw)
    xs = _x(k)
    (ref,) = run(m, [xs])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    nodes = [n for n in lf.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and not any(n.op_type == "DequantizeLinear" for n in lf.model.graph.node)
    assert {a.name: a.i for a in nodes[0].attribute}["block_size"] == block
    for level in ("none", "all"):
        (o,) = _ort_run(lf.model, {"x": xs}, level)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)


def test_w4a8_groups_integer_path() -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=96), "i4", k=96, axis=1, group_size=32)
    xs = _x(96)
    (ref,) = run(m, [xs])
    (o,) = _ort_run(lower_function(m).model, {"x": xs})
    np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qmatmul", ["integer", "qdq"])
def test_w4a8_float_minimum_adds_offset_times_block_sums(qmatmul: str) -> None:
    """w4a8 with ``zero=float`` (the ``w4a8`` preset): the minimum is outside the integer product, ``offset *
    block sums of x`` added after it. The integer path once dropped it silently (error ~50 on this model)."""
    from qir.passes import PassManager, parse_pipeline

    rng = np.random.default_rng(4)
    m = qir.Module("lin")
    m.add_constant("w", rng.standard_normal((40, 64)).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", 64]))
    f.set_outputs([f.add_op("linear", [x, m.constants["w"]], names=["y"]).result])
    for pipeline in ("quantize{scheme=w4a8,group=32,zero=float}",
                     "quantize{scheme=w4a8,group=32,zero=float},compress-scales"):
        q = PassManager(parse_pipeline(pipeline)).run(m)
        xs = rng.standard_normal((1, 5, 64)).astype(np.float32)
        (ref,) = run(q, [xs])
        (o,) = _ort_run(lower_function(q, options=LowerOptions(qmatmul=qmatmul)).model, {"x": xs})
        np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_qembedding_dequantize_requantize() -> None:
    rng = np.random.default_rng(2)
    m = qir.Module("e")
    tab = _weight(m, "tab", rng.standard_normal((50, 64)).astype(np.float32), "i8", axis=0)
    tab4 = _weight(m, "tab4", rng.standard_normal((50, 64)).astype(np.float32), "i4", axis=1, group_size=16)
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))
    e = f.add_op("qembedding", [tab, ids], names=["e"]).result
    e4 = f.add_op("qembedding", [tab4, ids], names=["e4"]).result
    s = f.add_op("add", [e, e4], names=["s"]).result
    q = f.add_op("quantize", [s], result_types=[TensorType.of("i8", [1, "seq", 64], QuantSpec.per_tensor(0.02))],
                 names=["q"]).result
    rq = f.add_op("requantize", [q], result_types=[TensorType.of("u8", [1, "seq", 64],
                                                                 QuantSpec.per_tensor(0.05, 128))], names=["rq"]).result
    f.set_outputs([f.add_op("dequantize", [rq], names=["d"]).result])
    idv = np.array([[3, 0, 49, 7]], np.int64)
    (ref,) = run(m, [idv])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    (o,) = _ort_run(lf.model, {"ids": idv})
    np.testing.assert_allclose(o, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("dt", "kw"), [
    ("i2", {"axis": 0}), ("i4", {"axis": 0, "symmetric": False}), ("u4", {"axis": 1, "group_size": 16}),
    ("i2", {"axis": 1, "group_size": 16, "symmetric": False}), ("i4", {"axis": None}),
    ("u4", {"axis": 1, "group_size": 20, "symmetric": False})])  # 20 divides 60: the per-block path
def test_sub_byte_qembedding_is_stored_packed_and_exact(dt: str, kw: dict[str, object]) -> None:
    rng = np.random.default_rng(5)
    m = qir.Module("e")
    tab = _weight(m, "tab", rng.standard_normal((40, 60)).astype(np.float32), dt, **kw)  # 60: no group divides
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [2, "seq"]))
    f.set_outputs([f.add_op("qembedding", [tab, ids], names=["e"]).result])
    idv = np.array([[3, 0, 39, 7], [1, 1, 2, 38]], np.int64)
    (ref,) = run(m, [idv])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    packed = [t for t in lf.model.graph.initializer if "::packed" in t.name]
    bits = qir.dtypes.dtype(dt).bits
    assert len(packed) == 1 and tuple(packed[0].dims) == (40, -(-60 * bits // 8))
    zps = [t for t in lf.model.graph.initializer if "::zp" in t.name]
    assert all(t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for t in zps), zps  # 1 byte each
    for level in ("none", "all"):
        (o,) = _ort_run(lf.model, {"ids": idv}, level)
        np.testing.assert_array_equal(o, ref)


@pytest.mark.parametrize("x_spec", [None, QuantSpec.dynamic_spec(axis=2, group_size=32)])
def test_tied_int8_table_is_stored_once(x_spec: QuantSpec | None) -> None:
    """A table read by an embedding lookup and by a head (weight-only or w8a8) is one initializer."""
    rng = np.random.default_rng(6)
    m = qir.Module("tied")
    tab = _weight(m, "tab", rng.standard_normal((50, 32)).astype(np.float32), "i8", axis=0)
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))
    e = f.add_op("qembedding", [tab, ids], names=["e"]).result
    if x_spec is not None:
        e = f.add_op("quantize", [e], result_types=[TensorType.of("i8", [1, "seq", 32], x_spec)],
                     names=["e.q"]).result
    f.set_outputs([f.add_op("qmatmul", [e, tab], result_types=[TensorType.of("f32", [1, "seq", 50])],
                            names=["logits"]).result])
    idv = np.array([[3, 0, 49, 7]], np.int64)
    (ref,) = run(m, [idv])
    lf = lower_function(m)
    onnx.checker.check_model(lf.model, full_check=True)
    big = [t.name for t in lf.model.graph.initializer if int(np.prod(t.dims)) == 50 * 32]
    assert len(big) == 1, big  # the codes Gather reads (weight-only: MatMulNBits' blob; w8a8: the qir layout)
    (o,) = _ort_run(lf.model, {"ids": idv}, "all")
    np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


# -- targets, legality, artifacts -----------------------------------------------------------------------------
def test_targets_load_with_sources() -> None:
    for name in ("ort-cpu", "ort-ascend"):
        t = load_target(name)
        assert t.rules and all(r.source for r in t.rules)
    assert load_target("ort-ascend").opset == 17
    with pytest.raises(TargetError, match="known: ort-ascend, ort-cpu"):
        load_target("tpu")


def test_ascend_refuses_with_rules_and_fixes_then_fallback(tmp_path: Path) -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64), axis=0)
    with pytest.raises(CompileError) as info:
        compile_module(m, "ort-ascend", tmp_path / "a")
    msg = str(info.value)
    assert "[static-shapes] @main input %x" in msg and "--bind" in msg
    assert "[act-int8-per-tensor] @main qmatmul -> %y" in msg and "act=static" in msg
    assert not (tmp_path / "a").exists()
    res = compile_module(m, "ort-ascend", tmp_path / "a", bind={"seq": 7}, fallback=True)
    assert res.report["fallbacks"] and "kept in f16" in res.report["fallbacks"][0]
    art = load_artifact(tmp_path / "a")
    (ref,) = run(m, [_x()])
    np.testing.assert_allclose(art.run([_x()])[0], ref, rtol=2e-2, atol=2e-2)


def test_ascend_static_int8_passes_and_runs_on_cpu(tmp_path: Path) -> None:
    m = _mlp(QuantSpec.per_tensor(0.03, 7), "i8", x_dt="u8", axis=0)
    assert [v.severity for v in check_module(m, load_target("ort-ascend"), bind={"seq": 7})] == ["warning"]
    res = compile_module(m, "ort-ascend", tmp_path / "npu", bind={"seq": 7})
    ops = res.report["functions"]["main"]["onnx_ops"]
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= set(ops) and "MatMulInteger" not in ops
    (ref,) = run(m, [_x()])
    np.testing.assert_allclose(load_artifact(tmp_path / "npu").run([_x()])[0], ref, rtol=1e-4, atol=1e-4)


def test_artifact_folder_is_atomic_and_complete(tmp_path: Path) -> None:
    m = _mlp(None, "i4", k=96, axis=1, group_size=32)
    out = tmp_path / "art"
    compile_module(m, "ort-cpu", out, meta={"source": "x", "kind": "unknown"})
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "target.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["bytes"] == (out / "model.onnx").stat().st_size and rep["functions"]["main"]["onnx_ops"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folder left behind


def test_compile_cli_show_pipeline_and_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from qir.serialize import save
    from qir.tools.compile_cli import add_compile_parser

    parser = argparse.ArgumentParser()
    add_compile_parser(parser.add_subparsers())
    args = parser.parse_args(["compile", "--preset", "npu-int8", "--show-pipeline"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().startswith("calibrate,quantize{scheme=w8a8,act=static")
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64), axis=0)
    save(m, tmp_path / "t.qir")
    args = parser.parse_args(["compile", str(tmp_path / "t.qir"), "--target", "ort-cpu", "-o", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "model.onnx").is_file()


# -- real models ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> qir.Module:
    from qir.frontend.importer import import_model

    return import_model("minilm-l6").module


@pytest.mark.slow
def test_minilm_float_and_w8a8(minilm: qir.Module, tmp_path: Path) -> None:
    from qir.passes import PassManager, parse_pipeline

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    lf = lower_function(minilm)
    onnx.checker.check_model(lf.model, full_check=True)
    (o,) = _ort_run(lf.model, {"input_ids": ids, "attention_mask": mask})
    (ref,) = run(minilm, [ids, mask])
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
    q = PassManager(parse_pipeline("quantize{scheme=w8a8}")).run(minilm.clone())
    res = compile_module(q, "ort-cpu", tmp_path / "m8")
    assert res.report["bytes"] < 25_000_000
    (o8,) = load_artifact(tmp_path / "m8").run([ids, mask])
    (r8,) = run(q, [ids, mask])

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    # Per-token codes flip where upstream floats differ in the last bit (ORT fuses LayerNorm, Gelu ...), so ORT's
    # w8a8 result is another draw of the same quantization noise: as close to float as the interpreter's.
    assert cos(o8, ref).min() > cos(r8, ref).min() - 0.003
    assert cos(o8, r8).min() > 0.99


@pytest.mark.slow
def test_smollm2_prefill_and_decode() -> None:
    from qir.frontend.importer import import_model

    m = import_model("smollm2-135m", max_seq=16).module
    toks = np.array([[1, 504, 3458, 282, 2]], np.int64)
    for fname in ("prefill", "decode"):
        lf = lower_function(m, fname)
        onnx.checker.check_model(lf.model, full_check=True)
        if fname == "prefill":
            feeds = {"tokens": toks}
        else:
            rng = np.random.default_rng(1)
            feeds = {"token": np.array([[42]], np.int64), "position": np.array([3], np.int64)}
            feeds.update({i.name: rng.standard_normal((1, 3, 16, 64)).astype(np.float32)
                          for i in lf.model.graph.input[2:]})
        outs = _ort_run(lf.model, feeds)
        refs = run(m, feeds, function=fname)
        for o, r in zip(outs, refs):
            np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


@pytest.mark.slow
def test_eval_of_a_static_shape_artifact_pads_to_the_bound_sizes(tmp_path: Path) -> None:
    """An artifact compiled with --bind batch=1,seq=64 is fed one sentence at a time, padded to 64 tokens."""
    import json
    import subprocess
    import sys

    out = tmp_path / "static"
    cmd = [sys.executable, "-m", "qir"]
    proc = subprocess.run([*cmd, "compile", "minilm-l6", "--target", "ort-cpu", "--preset", "float",
                           "--bind", "batch=1,seq=64", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([*cmd, "eval", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"cosine_mean", "cosine_min", "bytes"}
    assert result["cosine_min"] > 0.9999
