"""The ``split-vocab`` pass: goldens, exact meaning, per-part formats with ``quantize``, backends, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vocab_share import GOLDEN_FEEDS, lookup_all, tied, zipf_feeds

import qir
from qir.passes import PassContext, PassFailedError, run_pipeline
from qir.passes.split_vocab import hot_tokens
from qir.passes.tables import token_counts
from qir.printer import print_module

GOLDEN = Path(__file__).parent / "golden" / "passes"


@pytest.mark.parametrize("order", ["id", "calib"])
def test_golden(order: str) -> None:
    src = qir.parse((GOLDEN / "vocab_share.input.qir").read_text())
    out = run_pipeline(src, f"split-vocab{{hot=2,order={order},min_rows=1}}",
                       context=PassContext(calibration=GOLDEN_FEEDS))
    assert print_module(out) == (GOLDEN / f"split_vocab.{order}.expected.qir").read_text()
    qir.verify(out)


def test_hot_tokens() -> None:
    assert hot_tokens(None, 10, 3).tolist() == [0, 1, 2]
    # most frequent first, ties by id, unseen tokens by id after the seen ones; returned sorted
    assert hot_tokens(np.array([0, 5, 0, 5, 9, 0]), 6, 4).tolist() == [0, 1, 3, 4]


@settings(max_examples=10, deadline=None)
@given(hot=st.integers(1, 47), order=st.sampled_from(["id", "calib"]), seed=st.integers(0, 3))
def test_property_exact(hot: int, order: str, seed: int) -> None:
    """The split alone changes nothing: every id looks up its own row, the head gives the same logits."""
    vocab, dim = 48, 8
    src = tied(vocab, dim, seed)
    feeds = zipf_feeds(vocab, seed=seed)
    out = run_pipeline(src, f"split-vocab{{hot={hot},order={order},min_rows=1}}",
                       context=PassContext(calibration=feeds))
    qir.verify(out)
    table = src.constant("embed").numpy()
    eff, x, logits = lookup_all(out, vocab, dim)
    np.testing.assert_array_equal(eff, table)
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)
    hot_rows = out.constant("embed.hot").numpy()
    want = hot_tokens(token_counts(feeds, {"ids"}, vocab) if order == "calib" else None, vocab, hot)
    np.testing.assert_array_equal(hot_rows, table[want])
    assert "embed" not in out.constants and ("embed.slot" in out.constants) == (order == "calib")


def test_parts_get_their_own_formats() -> None:
    """``overrides`` give the frequent and the rare rows different table formats; lookup and head stay tied."""
    vocab, dim = 64, 128
    src = tied(vocab, dim)
    ctx = PassContext(calibration=zipf_feeds(vocab))
    out = run_pipeline(src, 'split-vocab{hot=16,min_rows=1},quantize{scheme=w8a16,group=32,zero=float,'
                            'overrides="*.hot=i8;*.cold=i2g32"},dce', context=ctx)
    qir.verify(out)
    hot, cold = out.constant("embed.hot"), out.constant("embed.cold")
    assert str(hot.type).startswith("i8[16,128] q(axis=0")
    assert str(cold.type).startswith("u2[48,128] q(axis=1, group=32") and "offset=" in str(cold.type)
    text = print_module(out)
    assert text.count("qembedding @embed.") == 2 and "qmatmul %x, @embed.hot" in text
    table = src.constant("embed").numpy()
    eff, x, logits = lookup_all(out, vocab, dim)
    np.testing.assert_allclose(logits, x @ eff.T, rtol=1e-4, atol=1e-4)  # the head reads the same rows
    slot = out.constant("embed.slot").numpy()
    err = np.abs(eff - table).max(axis=1)
    assert err[slot < 16].max() < 0.5 * err[slot >= 16].mean()  # 8-bit rows are far closer than 2-bit rows
    full = run_pipeline(src, 'quantize{scheme=w8a16,embedding=i8,head=i8}')
    # 16 rows at 8 bits + 48 at 2 bits (+ f32 scale and minimum per 32) + the i32 slot map, against 64 rows at 8 bits
    assert qir.stored_bytes(out) == 16 * (128 + 4) + 48 * (32 + 4 * 8) + 64 * 4 + 2 * 4 < 0.7 * qir.stored_bytes(full)


def test_table_format_override_rejected_for_plain_weights() -> None:
    from test_quantize import tiny_lm

    with pytest.raises(PassFailedError, match="is a table format"):
        run_pipeline(tiny_lm(), 'quantize{scheme=w8a16,overrides="*.up.weight=i4g32;*up*=i4g32"}')
    with pytest.raises(Exception, match="table format such as i8"):
        run_pipeline(tiny_lm(), 'quantize{scheme=w8a16,overrides="*=i3g32"}')


@pytest.mark.parametrize("target, order", [("ort-cpu", "id"), ("ort-cpu", "calib"), ("tvm-llvm", "calib")])
def test_lowers_on_backends(target: str, order: str, tmp_path: Path) -> None:
    from qir.backends.compile import compile_module, load_artifact

    vocab, dim = 64, 32
    src = tied(vocab, dim)
    out = run_pipeline(src, f'split-vocab{{hot=16,order={order},min_rows=1}},quantize{{scheme=w8a16,'
                            f'overrides="*.hot=i8;*.cold=i4"}}', context=PassContext(calibration=zipf_feeds(vocab)))
    compile_module(out, target, tmp_path / "a")
    art = load_artifact(tmp_path / "a")
    ids = np.array([[0, 15, 16, 63, 7, 40]], dtype=np.int64)
    x = np.random.default_rng(3).standard_normal((1, 6, dim)).astype(np.float32)
    got = art.run([ids, x])
    want = qir.run(out, {"ids": ids, "x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_left_alone_and_errors() -> None:
    src = tied(64, 8)
    assert print_module(run_pipeline(src, "split-vocab{hot=8}")) == print_module(src)  # 64 rows < min_rows
    assert print_module(run_pipeline(src, "split-vocab{hot=64,min_rows=1}")) == print_module(src)  # nothing cold
    with pytest.raises(PassFailedError, match="hot must be >= 1"):
        run_pipeline(src, "split-vocab{hot=0,min_rows=1}")
    with pytest.raises(PassFailedError, match="calibration data"):
        run_pipeline(src, "split-vocab{hot=8,min_rows=1}")
    with pytest.raises(PassFailedError, match="no ids for the lookup"):
        run_pipeline(src, "split-vocab{hot=8,min_rows=1}", context=PassContext(calibration=[{"tok": np.array([[1]])}]))
    out = run_pipeline(src, "split-vocab{hot=8,order=id,min_rows=1}")  # order=id needs no calibration
    assert out.constant("embed.hot").type.shape == (8, 8)
    f = src.function("main")
    f.add_op("relu", [src.constant("embed")], names=["r"])
    with pytest.raises(PassFailedError, match="also read by relu %r"):
        run_pipeline(src, "split-vocab{hot=8,order=id,min_rows=1}")


def test_onnx_lookup_reads_the_heads_4bit_blob(tmp_path: Path) -> None:
    """A tied 4-bit grouped part is stored once on ort-cpu: the lookup gathers from the head's MatMulNBits bytes."""
    import onnx

    from qir.backends.compile import compile_module, load_artifact

    vocab, dim = 64, 64
    src = tied(vocab, dim)
    out = run_pipeline(src, 'split-vocab{hot=16,min_rows=1},quantize{scheme=w4a16,group=32,zero=float,'
                            'overrides="*.hot=i8;*.cold=i4g32"},compress-scales',
                       context=PassContext(calibration=zipf_feeds(vocab)))
    compile_module(out, "ort-cpu", tmp_path / "a")
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    names = [t.name for t in model.graph.initializer]
    assert any(n.startswith("embed.cold::nbits") for n in names)
    assert not any("packed" in n for n in names), names  # no second copy of the codes
    # the compressed block scales / minimums stay u8 codes (not f32 [V, nb] arrays, once per user)
    onnx_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert onnx_bytes <= 1.1 * qir.stored_bytes(out), (onnx_bytes, qir.stored_bytes(out))
    ids = np.arange(vocab, dtype=np.int64)[None]
    x = np.random.default_rng(5).standard_normal((1, vocab, dim)).astype(np.float32)
    got = load_artifact(tmp_path / "a").run([ids, x])
    for g, w in zip(got, qir.run(out, {"ids": ids, "x": x})):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
