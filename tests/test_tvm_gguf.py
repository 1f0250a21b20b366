"""GGUF block weights on ``tvm-llvm``: ``offset=`` specs, fp16 block parameters and two-level parameters.

Differential tests against the reference interpreter on small synthetic modules: every GGUF block format qir keeps
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 written by ``gguf.quants``; Q4_K, Q5_K, Q6_K from raw bytes) through ``qmatmul``
(weight-only; decode GEMV with one token and prefill GEMM with a symbolic number of tokens), ``qembedding`` and
``dequantize``, with the scheduled kernels of ``qir.backends.tvm.kernels`` and with the lowering's own TE computes;
``compress-scales`` output (two-level parameters, folded at compile time); and a tiny GGUF model kept with
``keep_gguf_quantization`` compiled to an artifact. The SmolLM2 measurement is ``bench/gguf_smollm2.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tvm = pytest.importorskip("tvm")

from test_gguf_blocks import k_blocks  # noqa: E402
from test_gguf_keep import Q, kept_tiny_model  # noqa: E402

from qir.backends.compile import load_artifact  # noqa: E402
from qir.backends.target import load_target  # noqa: E402
from qir.backends.tvm.compile import build, compile_tvm  # noqa: E402
from qir.gguf_blocks import decode_blocks  # noqa: E402
from qir.graph import Module  # noqa: E402
from qir.interpreter import run  # noqa: E402
from qir.passes.compress_scales import CompressScales  # noqa: E402
from qir.types import TensorType  # noqa: E402
from qir.verifier import verify  # noqa: E402

TARGET = load_target("tvm-llvm")
WRITABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def raw_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if type_name in K_QUANTS:
        return k_blocks(type_name, rows * cols // 256, rng)
    w = (rng.standard_normal((rows, cols)) * 0.2 + rng.uniform(-0.1, 0.1, (rows, 1))).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])


def block_module(type_name: str, rows: int, cols: int, seq: int | str, *, bias: bool = False,
                 seed: int = 0) -> Module:
    """``y = qmatmul(x, @w [, @b])``, ``e = qembedding(@w, ids)`` and ``d = dequantize(@w)`` for a GGUF weight."""
    rng = np.random.default_rng(seed)
    bw = decode_blocks(raw_blocks(type_name, rows, cols, rng), type_name, (rows, cols), "w")
    m = Module("g")
    for name, (arr, t) in bw.constants.items():
        m.add_constant(name, arr, type=t)
    w = m.add_constant("w", bw.codes, type=bw.type)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, seq, cols]))
    ids = f.add_input("ids", TensorType.of("i64", [1, 4]))
    args = [x, w] + ([m.add_constant("b", rng.standard_normal(rows).astype(np.float32))] if bias else [])
    y = f.add_op("qmatmul", args, names=["y"]).result
    e = f.add_op("qembedding", [w, ids], names=["e"]).result
    d = f.add_op("dequantize", [w], names=["d"]).result
    f.set_outputs([y, e, d])
    verify(m)
    return m


def inputs(m: Module, seq: int, seed: int = 1) -> list[np.ndarray]:
    cols = m.constants["w"].type.shape[1]
    rng = np.random.default_rng(seed)
    rows = m.constants["w"].type.shape[0]
    return [rng.standard_normal((1, seq, cols)).astype(np.float32), rng.integers(0, rows, (1, 4)).astype(np.int64)]


def check_against_interpreter(m: Module, xs: list[np.ndarray], *, use_kernels: bool) -> dict[str, int]:
    want = [np.asarray(a) for a in run(m, xs)]
    built = build(m, TARGET, use_kernels=use_kernels)
    got = built.run(xs)
    k = m.constants["w"].type.shape[1]
    # The matmul sums K products in another order (and the kernels may fuse the offset add into an FMA).
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6 * k * np.abs(want[0]).max())
    for g, w in zip(got[1:], want[1:]):  # gathered / dequantized weights: the interpreter's f32 up to one rounding
        np.testing.assert_allclose(g, w, rtol=2e-7, atol=1e-7 * np.abs(w).max())
    return built.lowered.kernels


@pytest.mark.parametrize("type_name", WRITABLE + K_QUANTS)
@pytest.mark.parametrize("seq", [1, "seq"], ids=["decode-gemv", "prefill-gemm"])
def test_block_formats_match_interpreter_with_kernels(type_name: str, seq: int | str) -> None:
    m = block_module(type_name, 24, 256, seq, bias=type_name == "Q4_1")
    kernels = check_against_interpreter(m, inputs(m, 1 if seq == 1 else 5), use_kernels=True)
    bits = 4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8
    want = f"wmatmul{bits}"  # the fused dequantize-matmul kernel, not the TE fallback
    if seq == 1 and type_name in ("Q4_0", "Q4_1"):
        from qir.backends.tvm.compile import tvm_target
        from qir.backends.tvm.kernels.w4a8_gemv import w4a8_isa

        if w4a8_isa(tvm_target(TARGET)) in ("vnni", "avx2"):  # one token, groups of 32 on x86: the dot-product GEMV
            want = "w4a16dot"
    assert kernels == {want: 1}, kernels


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q4_K"])
def test_block_formats_match_interpreter_without_kernels(type_name: str) -> None:
    m = block_module(type_name, 16, 256, "seq", seed=2)
    assert check_against_interpreter(m, inputs(m, 3), use_kernels=False) == {"te:wmatmul": 1}


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1", "Q4_0"])
def test_codes_stay_packed_and_fp16_parameters_stay_fp16(type_name: str) -> None:
    m = block_module(type_name, 16, 64, 1)
    params = build(m, TARGET).lowered.params
    bits = 4 if type_name.startswith("Q4") else 8
    assert params["w"].nbytes == 16 * 64 * bits // 8
    assert params["w_scale"].dtype == np.float16 and params["w_scale"].shape == (16, 2)
    if type_name.endswith("_1"):
        assert params["w_min"].dtype == np.float16 and params["w_min"].shape == (16, 2)
    assert not [p for p in params if p.endswith("_f32")]  # nothing folded: no two-level parameters here


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quant_sub_block_parameters_stay_quantized(type_name: str) -> None:
    """K-quants' 6-/8-bit sub-block scales against an fp16 per 256 are parameters as they are (one byte per
    sub-block), dequantized inside the kernel; nothing is folded."""
    m = block_module(type_name, 16, 512, 1)
    lw = build(m, TARGET).lowered
    assert lw.folded == {}
    sub = 32 if type_name == "Q4_K" else 16
    assert lw.params["w_scale"].dtype == (np.uint8 if type_name == "Q4_K" else np.int8)
    assert lw.params["w_scale"].shape == (16, 512 // sub) and lw.params["w_scale_d"].dtype == np.float16


def test_three_level_parameters_are_folded_at_compile_time(tmp_path: Path) -> None:
    """A block scale quantized against a per-row scale that is quantized too: folded to one f32 per block."""
    from qir.quantspec import QuantSpec

    rng = np.random.default_rng(6)
    rows, cols = 16, 64
    m = Module("f")
    m.add_constant("s3", rng.integers(1, 200, rows).astype(np.uint8),
                   type=TensorType.of("u8", [rows], QuantSpec.per_tensor(1e-4)))
    m.add_constant("s2", rng.integers(1, 255, (rows, 2)).astype(np.uint8),
                   type=TensorType.of("u8", [rows, 2], QuantSpec(axis=0, scale="s3")))
    w = m.add_constant("w", rng.integers(-128, 128, (rows, cols)).astype(np.int8),
                       type=TensorType.of("i8", [rows, cols], QuantSpec(axis=1, group_size=32, scale="s2")))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, 1, cols]))
    f.set_outputs([f.add_op("qmatmul", [x, w], names=["y"]).result])
    verify(m)
    xs = [np.random.default_rng(1).standard_normal((1, 1, cols)).astype(np.float32)]
    res = compile_tvm(m, TARGET, tmp_path / "a")
    assert res.report["folded_params"] == {"s2": "s2_f32"}
    assert any("folded at compile time" in n for n in res.report["notes"])
    got = load_artifact(tmp_path / "a").run(xs)[0]
    want = np.asarray(run(m, xs)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * cols * np.abs(want).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_compress_scales_output_matches_interpreter(bits: int, tmp_path: Path) -> None:
    m = block_module("Q4_1", 16, 256, "seq", seed=3)
    CompressScales(bits=bits).run(m)
    verify(m)
    assert m.constants["w.scale"].type.quant is not None  # two-level now
    xs = inputs(m, 4)
    assert check_against_interpreter(m, xs, use_kernels=True) == {"wmatmul4": 1}
    res = compile_tvm(m, TARGET, tmp_path / "a")
    assert res.report["folded_params"] == {}  # the 8-/4-bit block parameters are read as they are stored
    params = build(m, TARGET).lowered.params
    assert params["w_scale"].dtype == np.uint8 and params["w_scale"].nbytes == 16 * 8 * bits // 8
    assert not [p for p in params if p.endswith("_f32")]
    got = load_artifact(tmp_path / "a").run(xs)
    np.testing.assert_allclose(got[2], np.asarray(run(m, xs)[2]), rtol=2e-7, atol=1e-7)


def test_offset_with_zero_point_matches_interpreter() -> None:
    """A spec with both a zero point and an offset (``scale*(q - zp) + offset``) on unsigned 4-bit codes."""
    from qir.dtypes import dtype
    from qir.quantspec import QuantSpec

    u4 = dtype("u4").numpy
    rng = np.random.default_rng(4)
    rows, cols = 6, 64
    m = Module("z")
    m.add_constant("w.scale", (rng.random((rows, 2)) * 0.05 + 0.01).astype(np.float32))
    m.add_constant("w.zp", rng.integers(0, 16, (rows, 2)).astype(u4), type=TensorType.of("u4", [rows, 2]))
    m.add_constant("w.min", rng.standard_normal((rows, 2)).astype(np.float16))
    spec = QuantSpec(axis=1, group_size=32, scale="w.scale", zero_point="w.zp", symmetric=False, offset="w.min")
    codes = rng.integers(0, 16, (rows, cols)).astype(u4)
    w = m.add_constant("w", codes, type=TensorType.of("u4", [rows, cols], spec))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", cols]))
    ids = f.add_input("ids", TensorType.of("i64", [1, 4]))
    f.set_outputs([f.add_op("qmatmul", [x, w], names=["y"]).result,
                   f.add_op("qembedding", [w, ids], names=["e"]).result,
                   f.add_op("dequantize", [w], names=["d"]).result])
    verify(m)
    xs = inputs(m, 3)
    for use_kernels in (True, False):
        check_against_interpreter(m, xs, use_kernels=use_kernels)


@pytest.mark.parametrize("q_type", [Q.Q4_1, Q.Q8_0, Q.Q4_0])
def test_kept_tiny_gguf_model_artifact_matches_interpreter(q_type: object, tmp_path: Path) -> None:
    """A tiny llama GGUF (tied Q8_0 table, Q4_0/Q5_1 and ``q_type`` linears) kept as is and compiled."""
    m, tokens, want = kept_tiny_model(tmp_path, q_type)
    res = compile_tvm(m, TARGET, tmp_path / "art")
    got = load_artifact(tmp_path / "art").run([tokens], function="prefill")[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert sum(n for k, n in report["kernels"].items() if k.startswith("wmatmul")) == 4
    assert not [k for k in report["kernels"] if k.startswith("te:")]
    assert res.report["folded_params"] == {}
