"""``compress-scales``: golden text, error bounds, and a property test that the module stays valid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qir
from qir.graph import Module
from qir.interpreter import RunContext
from qir.passes import run_pipeline
from qir.printer import print_module
from qir.quantspec import QuantSpec
from qir.serialize import stored_bytes
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden" / "passes"


def weights(m: Module) -> dict[str, np.ndarray]:
    """Every quantized weight read by a qmatmul, dequantized (two-level parameters included)."""
    ctx = RunContext(m)
    names = {op.operands[1].name for op in m.functions["main"].ops if op.opcode == "qmatmul"}
    return {n: ctx.constant(n).dequantize() for n in sorted(names)}


def test_golden() -> None:
    src = qir.parse((GOLDEN / "compress_scales.input.qir").read_text())
    out = run_pipeline(src, "compress-scales", verify_each=True)
    assert print_module(out) == (GOLDEN / "compress_scales.expected.qir").read_text()
    before, after = weights(src), weights(out)
    for name in before:
        err = np.abs(after[name] - before[name]).max()
        assert 0 < err < 0.01 * np.abs(before[name]).max(), (name, err)
    assert stored_bytes(out) < stored_bytes(src) + 16  # 2x2 f16 -> 2x2 8-bit + 2 f16 per parameter: tiny here


def test_leaves_two_level_and_per_row_weights_alone() -> None:
    src = qir.parse((GOLDEN / "compress_scales.expected.qir").read_text())
    out = run_pipeline(src, "compress-scales")
    assert print_module(out) == print_module(src)


def test_bits_option_is_checked() -> None:
    src = qir.parse((GOLDEN / "compress_scales.input.qir").read_text())
    with pytest.raises(qir.QirError, match="bits must be 4 or 8"):
        run_pipeline(src, "compress-scales{bits=6}")


def _module(rows: int, blocks: int, group: int, kind: str, rng: np.random.Generator) -> Module:
    m = Module("p")
    k = blocks * group
    scale = rng.uniform(1e-4, 0.2, (rows, blocks)).astype(np.float16)
    if kind == "i4":  # Q4_0-like: signed scales, no minimum
        scale = (scale * rng.choice([-1, 1], (rows, blocks))).astype(np.float16)
        codes = rng.integers(-8, 8, (rows, k)).astype(np.int8)
        spec = QuantSpec(axis=1, group_size=group, scale="w.scale")
    else:  # Q4_1 / Q5_1-like: unsigned codes plus a float minimum
        codes = rng.integers(0, 16 if kind == "u4" else 32, (rows, k)).astype(np.uint8)
        m.add_constant("w.min", rng.uniform(-2, 0.5, (rows, blocks)).astype(np.float16))
        spec = QuantSpec(axis=1, group_size=group, scale="w.scale", offset="w.min")
    m.add_constant("w.scale", scale)
    dt = {"i4": "i4", "u4": "u4", "u8": "u8"}[kind]
    w = m.add_constant("w", codes.astype(TensorType.of(dt, [rows, k]).dtype.numpy), type=TensorType.of(
        dt, [rows, k], spec))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, k]))
    f.set_outputs([f.add_op("qmatmul", [x, w], names=["y"]).result])
    qir.verify(m)
    return m


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), group=st.sampled_from([4, 8, 32]),
       kind=st.sampled_from(["i4", "u4", "u8"]), bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_property_valid_and_bounded(rows: int, blocks: int, group: int, kind: str, bits: int, seed: int) -> None:
    src = _module(rows, blocks, group, kind, np.random.default_rng(seed))
    kept = run_pipeline(src, f"compress-scales{{bits={bits},requantize=false}}", verify_each=True)
    out = run_pipeline(src, f"compress-scales{{bits={bits}}}", verify_each=True)
    qir.verify(out)
    x = weights(src)["w"]
    # codes kept: each element moves by at most |q - zp| * row_scale / 2 + row_min / 2 (round to nearest)
    ctx = RunContext(kept)
    spec = kept.constants["w"].type.quant
    assert spec is not None and isinstance(spec.scale, str)
    s_row = np.asarray(kept.constants[kept.constants[spec.scale].type.quant.scale].numpy(), np.float32)
    q = np.abs(np.asarray(kept.constants["w"].numpy()).astype(np.float32))
    bound = q * s_row[:, None] / 2
    if spec.offset is not None:
        m_row = np.asarray(kept.constants[kept.constants[spec.offset].type.quant.scale].numpy(), np.float32)
        bound = bound + m_row[:, None] / 2
    err_kept = np.abs(ctx.constant("w").dequantize() - x)
    assert np.all(err_kept <= bound * (1 + 1e-3) + 1e-6)
    # requantized codes are the nearest grid points of the new parameters: never worse than keeping the codes
    err_new = np.abs(weights(out)["w"] - x)
    assert np.all(err_new <= err_kept + 1e-6)
    xs = np.random.default_rng(seed + 1).standard_normal((1, x.shape[1])).astype(np.float32)
    np.testing.assert_allclose(qir.run(out, [xs])[0], xs @ weights(out)["w"].T, rtol=1e-4, atol=1e-4)


def test_ort_artifact_keeps_compressed_parameters(tmp_path: Path) -> None:
    """On ort-cpu the u8 block scales and minimums stay codes (recomputed in the graph), results equal qir's."""
    import onnx

    from qir.backends.compile import compile_module, load_artifact

    rng = np.random.default_rng(0)
    src = Module("m")
    w = src.add_constant("w", rng.standard_normal((96, 128)).astype(np.float32))
    v = src.add_constant("v", rng.standard_normal((32, 96)).astype(np.float32))
    f = src.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, 5, 128]))
    h = f.add_op("linear", [x, w], names=["h"]).result
    f.set_outputs([f.add_op("linear", [h, v], names=["y"]).result])
    qir.verify(src)
    out = run_pipeline(src, "quantize{scheme=w4a16,group=32,zero=float},compress-scales")
    assert out.constant("w.scale").type.quant is not None  # two-level: the case under test
    compile_module(out, "ort-cpu", tmp_path / "a")
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    f32_params = [t.name for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1 and np.prod(t.dims) >= 96 * 4]
    assert not f32_params, f32_params
    onnx_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert onnx_bytes <= 1.15 * stored_bytes(out), (onnx_bytes, stored_bytes(out))
    xs = rng.standard_normal((2, 5, 128)).astype(np.float32)
    got = load_artifact(tmp_path / "a").run([xs])[0]
    # f32 sums in another order (block sums of x for the minimums): ~1e-6 relative to the outputs (~100)
    np.testing.assert_allclose(np.asarray(got), np.asarray(qir.run(out, {"x": xs})[0]), rtol=1e-4, atol=1e-3)
