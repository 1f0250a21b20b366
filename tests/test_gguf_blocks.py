"""GGUF block formats decoded into qir quantized types dequantize bit-exactly like ``gguf.quants.dequantize``.

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 blocks are written by ``gguf.quants.quantize``; K-quant blocks (which
``gguf.quants`` can only read) are random bytes with the fp16 fields set to finite values, so every bit pattern of
codes, 6-bit scales and minimums occurs. The comparison is on the f32 bit patterns, through the reference
interpreter running ``dequantize`` on the weight constant, after a print/parse round trip of the module.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from qir.gguf_blocks import SUPPORTED, GGUFFormatError, decode_blocks  # noqa: E402
from qir.graph import Module  # noqa: E402
from qir.interpreter import run  # noqa: E402
from qir.parser import parse  # noqa: E402
from qir.printer import print_module  # noqa: E402
from qir.types import TensorType  # noqa: E402
from qir.verifier import verify  # noqa: E402

WRITABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# byte offsets of the fp16 fields in each K-quant block (d, dmin)
K_F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def module_for(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Module:
    """``@w`` decoded from ``raw`` and one function returning ``dequantize @w``."""
    bw = decode_blocks(raw, type_name, shape, "w")
    m = Module("g")
    for name, (arr, t) in bw.constants.items():
        m.add_constant(name, arr, type=t)
    w = m.add_constant("w", bw.codes, type=bw.type)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1]))
    f.set_outputs([x, f.add_op("dequantize", [w], names=["y"]).result])
    return m


def interpret(m: Module) -> np.ndarray:
    return np.asarray(run(m, [np.zeros(1, np.float32)])[1])


def k_blocks(type_name: str, nblocks: int, rng: np.random.Generator) -> np.ndarray:
    _, nbytes = SUPPORTED[type_name]
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off in K_F16_FIELDS[type_name]:
        vals = rng.uniform(-0.05, 0.05, size=nblocks).astype(np.float16)  # negative and tiny included
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(nblocks, 2)
    return raw


def check_bit_exact(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Module:
    qtype = gguf.GGMLQuantizationType[type_name]
    want = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).astype(np.float32)
    m = module_for(raw, type_name, shape)
    verify(m)
    m2 = parse(print_module(m))  # the text form carries offset= and two-level scales
    assert print_module(m2) == print_module(m)
    for name, c in m.constants.items():
        m2.constants[name].data = c.numpy()
    got = interpret(m2)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
        f"{type_name}: {int(np.sum(got.view(np.uint32) != want.view(np.uint32)))} elements differ")
    return m


@pytest.mark.parametrize("type_name", WRITABLE)
def test_written_blocks_dequantize_bit_exactly(type_name: str) -> None:
    rng = np.random.default_rng(sum(map(ord, type_name)))
    x = rng.standard_normal((6, 128)).astype(np.float32) * rng.uniform(0.01, 3.0, size=(6, 1)).astype(np.float32)
    x[2, :32] = 0.0  # an all-zero block: scale 0
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])
    check_bit_exact(raw, type_name, x.shape)


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quant_bytes_dequantize_bit_exactly(type_name: str) -> None:
    rng = np.random.default_rng(sum(map(ord, type_name)))
    rows, cols = 3, 512
    raw = k_blocks(type_name, rows * cols // 256, rng)
    m = check_bit_exact(raw, type_name, (rows, cols))
    # two-level: the sub-block scales are integer codes against an fp16 scale per super-block
    assert m.constants["w.scale"].type.quant is not None
    assert m.constants["w.scale.d"].type.dtype.name == "f16"


def test_q4_1_text_form() -> None:
    raw = gguf.quants.quantize(np.linspace(-1, 2, 64, dtype=np.float32).reshape(1, 64), gguf.GGMLQuantizationType.Q4_1)
    text = print_module(module_for(raw, "Q4_1", (1, 64)))
    assert "const @w : u4[1,64] q(axis=1, group=32, scale=@w.scale, offset=@w.min)" in text
    assert "const @w.min : f16[1,2]" in text


def test_q4_k_text_form() -> None:
    raw = k_blocks("Q4_K", 1, np.random.default_rng(0))
    text = print_module(module_for(raw, "Q4_K", (1, 256)))
    assert "const @w : u4[1,256] q(axis=1, group=32, scale=@w.scale, offset=@w.min)" in text
    assert "const @w.scale : u8[1,8] q(axis=1, group=8, scale=@w.scale.d)" in text
    assert "const @w.min : u8[1,8] q(axis=1, group=8, scale=@w.min.d)" in text


def test_unsupported_type_is_refused_by_name() -> None:
    with pytest.raises(GGUFFormatError, match="GGUF tensor type IQ2_XXS cannot be kept quantized"):
        decode_blocks(np.zeros(66, np.uint8), "IQ2_XXS", (1, 256), "w")


def test_wrong_byte_count_is_refused() -> None:
    with pytest.raises(GGUFFormatError, match="needs 34 bytes, got 33"):
        decode_blocks(np.zeros(33, np.uint8), "Q8_0", (1, 32), "w")


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_0", "Q4_K", "Q6_K"])
def test_embedding_rows_bit_exact_and_on_onnx_runtime(type_name: str) -> None:
    """``qembedding`` of a GGUF table gives gguf's rows bit for bit; ort-cpu gathers blocks, not expanded scales."""
    from qir.backends.onnx.lower import lower_function
    from qir.backends.onnx.runtime import make_session, run_session

    rng = np.random.default_rng(11)
    vocab, dim = 16, 256
    if type_name in K_QUANTS:
        raw = k_blocks(type_name, vocab * dim // 256, rng)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((vocab, dim)).astype(np.float32),
                                   gguf.GGMLQuantizationType[type_name])
    table = gguf.quants.dequantize(raw.reshape(vocab, -1), gguf.GGMLQuantizationType[type_name]).astype(np.float32)
    bw = decode_blocks(raw, type_name, (vocab, dim), "emb")
    m = Module("e")
    for name, (arr, t) in bw.constants.items():
        m.add_constant(name, arr, type=t)
    emb = m.add_constant("emb", bw.codes, type=bw.type)
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))
    f.set_outputs([f.add_op("qembedding", [emb, ids], names=["rows"]).result])
    verify(m)
    tokens = np.array([[3, 0, 15, 3, 9]], np.int64)
    got = np.asarray(run(m, [tokens])[0])
    want = table[tokens]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    lowered = lower_function(m)
    largest = max(int(np.prod(i.dims)) for i in lowered.model.graph.initializer if i.data_type == 1)  # f32
    assert largest < vocab * dim  # scales (and minimums) per block, not per element
    ort = run_session(make_session(lowered.model.SerializeToString()), {"ids": tokens})[0]
    np.testing.assert_allclose(ort, want, rtol=1e-6, atol=1e-6)


def test_offset_text_errors() -> None:
    from qir.errors import ParseError

    head = "module @m\n\nconst @s : f16[2,1] = dense(1.0, 1.0)\nconst @w : u4[2,4] q(axis=1, group=4, scale=@s, "
    with pytest.raises(ParseError, match="offset constant name"):
        parse(head + "offset=0.5) = dense(0, 1, 2, 3, 4, 5, 6, 7)\n")
    with pytest.raises(ParseError, match="'offset' given twice"):
        parse(head + "offset=@s, offset=@s) = dense(0, 1, 2, 3, 4, 5, 6, 7)\n")
