"""The ``vocab-share`` pass: goldens, k-means, the tied lookup/head staying consistent, errors, composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qir
from qir.errors import QirError
from qir.graph import Module
from qir.passes import PassContext, PassFailedError, run_pipeline
from qir.passes.gptq import rtn_quantize
from qir.passes.vocab_share import kmeans, residual_quantize, token_counts
from qir.printer import print_module
from qir.types import TensorType

GOLDEN = Path(__file__).parent / "golden" / "passes"
GOLDEN_FEEDS = [{"ids": np.array([[4, 4, 4, 1, 0]])}]


def tied(vocab: int = 64, dim: int = 8, seed: int = 0) -> Module:
    """``main(ids, x) -> (embedding(T, ids), linear(x, T))``: a lookup and a tied head on one table."""
    rng = np.random.default_rng(seed)
    m = Module("tied")
    t = m.add_constant("embed", rng.standard_normal((vocab, dim)).astype(np.float32))
    f = m.add_function("main")
    ids = f.add_input("ids", TensorType.of("i64", [1, "seq"]))
    x = f.add_input("x", TensorType.of("f32", [1, "seq", dim]))
    h = f.add_op("embedding", [t, ids], names=["h"]).result
    logits = f.add_op("linear", [x, t], names=["logits"]).result
    f.set_outputs([h, logits])
    qir.verify(m)
    return m


def zipf_feeds(vocab: int, n: int = 2, seq: int = 64, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": (rng.zipf(1.3, size=(1, seq)) % vocab).astype(np.int64)} for _ in range(n)]


def lookup_all(m: Module, vocab: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(effective table, x, head logits)``: every id looked up, and the head on random ``x``."""
    ids = np.arange(vocab, dtype=np.int64)[None]
    x = np.random.default_rng(7).standard_normal((1, vocab, dim)).astype(np.float32)
    h, logits = qir.run(m, {"ids": ids, "x": x})
    return np.asarray(h)[0], x[0], np.asarray(logits)[0]


# -- goldens --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 4])
def test_golden(bits: int) -> None:
    src = qir.parse((GOLDEN / "vocab_share.input.qir").read_text())
    out = run_pipeline(src, f"vocab-share{{clusters=2,keep=1,residual_bits={bits},min_rows=1}}",
                       context=PassContext(calibration=GOLDEN_FEEDS))
    assert print_module(out) == (GOLDEN / f"vocab_share.r{bits}.expected.qir").read_text()
    qir.verify(out)


def test_golden_meaning() -> None:
    """Token 4 (most frequent) is kept exactly; 2 and 3 share their mean; 0, 1, 5 theirs (no residual)."""
    src = qir.parse((GOLDEN / "vocab_share.input.qir").read_text())
    table = src.constant("emb").numpy()
    out = run_pipeline(src, "vocab-share{clusters=2,keep=1,residual_bits=0,min_rows=1}",
                       context=PassContext(calibration=GOLDEN_FEEDS))
    ids = np.arange(6)[None]
    h, _ = qir.run(out, {"ids": ids, "x": np.zeros((1, 6, 2), np.float32)})
    h = np.asarray(h)[0]
    np.testing.assert_array_equal(h[4], table[4])
    np.testing.assert_allclose(h[2], table[[2, 3]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(h[0], table[[0, 1, 5]].mean(0), rtol=1e-6)


# -- k-means and counts ---------------------------------------------------------------------------------------------
def test_kmeans_deterministic_and_recovers_clusters() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 3)) * 10
    x = np.concatenate([c + 0.01 * rng.standard_normal((20, 3)) for c in centers]).astype(np.float32)
    c1, a1 = kmeans(x, 4, iters=10, seed=3)
    c2, a2 = kmeans(x, 4, iters=10, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    # each true cluster lands in one k-means cluster: within-cluster spread is the noise only
    assert len(set(a1.tolist())) == 4
    assert np.max(np.linalg.norm(x - c1[a1], axis=1)) < 0.1
    with pytest.raises(QirError, match="clusters"):
        kmeans(x, 0)


def test_residual_quantize_beats_minmax_at_2_bits() -> None:
    x = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    codes, scale = residual_quantize(x, 2)
    assert codes.min() >= -2 and codes.max() <= 1 and scale.shape == (50,)
    ours = np.square(codes.astype(np.float32) * scale[:, None] - x).sum()
    c2, s2, _ = rtn_quantize(x, "i2", group=None, symmetric=True)
    minmax = np.square(c2.astype(np.float32) * s2[:, None] - x).sum()
    assert ours < 0.7 * minmax  # clipping keeps much more of a Gaussian row than min/max scaling
    zero_codes, zero_scale = residual_quantize(np.zeros((2, 4), np.float32), 4)
    assert not zero_codes.astype(np.int8).any() and np.all(zero_scale > 0)


def test_token_counts() -> None:
    counts = token_counts([{"ids": np.array([[1, 1, 3]])}, {"ids": np.array([[3, 9]]), "other": np.array([1])}],
                          {"ids"}, 5)
    assert counts.tolist() == [0, 2, 0, 2, 0]  # 9 is out of range and ignored


# -- meaning: the lookup and the tied head use the same effective table --------------------------------------------
@settings(max_examples=8, deadline=None)
@given(bits=st.sampled_from([0, 2, 4, 8]), clusters=st.integers(1, 20), keep=st.integers(0, 12),
       seed=st.integers(0, 3))
def test_property_tied_consistent_and_bounded(bits: int, clusters: int, keep: int, seed: int) -> None:
    vocab, dim = 48, 8
    src = tied(vocab, dim, seed)
    table = src.constant("embed").numpy()
    feeds = zipf_feeds(vocab, seed=seed)
    out = run_pipeline(src, f"vocab-share{{clusters={clusters},keep={keep},residual_bits={bits},min_rows=1}}",
                       context=PassContext(calibration=feeds))
    qir.verify(out)
    eff, x, logits = lookup_all(out, vocab, dim)
    # the head computes x @ eff.T: codebook logits gathered through the index map plus the residual correction
    np.testing.assert_allclose(logits, x @ eff.T, rtol=1e-4, atol=1e-4)
    counts = token_counts(feeds, {"ids"}, vocab)
    kept = np.argsort(-counts, kind="stable")[:keep]
    np.testing.assert_array_equal(eff[kept], table[kept])  # frequent tokens keep their own rows exactly
    if bits:
        # the residual's scale is chosen per row for least error: never worse than min/max round-to-nearest
        index = out.constant("embed.index").numpy()
        resid = table - out.constant("embed.codebook").numpy()[index]
        codes, scale, _ = rtn_quantize(resid, f"i{bits}", group=None, symmetric=True)
        rtn_err = np.square(codes.astype(np.float32) * scale[:, None] - resid).sum(axis=1)
        assert np.all(np.square(eff - table).sum(axis=1) <= rtn_err * (1 + 1e-4) + 1e-9)  # 1e-4: float32 sums
    else:
        index = out.constant("embed.index").numpy()
        np.testing.assert_array_equal(eff, out.constant("embed.codebook").numpy()[index])
    assert "embed" not in out.constants  # the float table is gone: both users were rewritten


def test_residual_bits_reduce_error_and_sizes_count_index() -> None:
    vocab, dim = 64, 8
    src = tied(vocab, dim)
    feeds = zipf_feeds(vocab)
    table = src.constant("embed").numpy()
    errs, sizes = [], []
    for bits in (0, 2, 4, 8):
        out = run_pipeline(src, f"vocab-share{{clusters=8,keep=4,residual_bits={bits},min_rows=1}}",
                           context=PassContext(calibration=feeds))
        eff, _, _ = lookup_all(out, vocab, dim)
        errs.append(float(np.linalg.norm(eff - table)))
        sizes.append(qir.stored_bytes(out))
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3]
    # bits=0: codebook (12 rows f32) + index map (i32 per token)
    assert sizes[0] == (4 + 8) * dim * 4 + vocab * 4


def test_head_separate_keeps_float_head() -> None:
    vocab, dim = 64, 8
    src = tied(vocab, dim)
    out = run_pipeline(src, "vocab-share{clusters=4,keep=2,residual_bits=0,min_rows=1,head=separate}",
                       context=PassContext(calibration=zipf_feeds(vocab)))
    qir.verify(out)
    assert "embed" in out.constants and out.constant("embed").type == src.constant("embed").type
    eff, x, logits = lookup_all(out, vocab, dim)
    np.testing.assert_allclose(logits, x @ src.constant("embed").numpy().T, rtol=1e-5, atol=1e-5)
    assert not np.allclose(eff, src.constant("embed").numpy())


def test_small_tables_left_alone() -> None:
    src = tied(64, 8)
    out = run_pipeline(src, "vocab-share{clusters=8,keep=4}", context=PassContext(calibration=zipf_feeds(64)))
    assert print_module(out) == print_module(src)  # 64 rows < min_rows=1024
    out = run_pipeline(src, "vocab-share{clusters=60,keep=4,min_rows=1}",
                       context=PassContext(calibration=zipf_feeds(64)))
    assert print_module(out) == print_module(src)  # keep + clusters >= vocab: nothing to share


def test_composes_with_quantize_and_dce() -> None:
    """``quantize`` treats the codebook as a tied embedding table (one i8 constant for lookup and head)."""
    from test_quantize import VOCAB, feeds, rel_err, run_out, tiny_lm

    src = tiny_lm()
    ctx = PassContext(calibration=feeds())
    out = run_pipeline(src, "vocab-share{clusters=8,keep=4,residual_bits=2,min_rows=1},quantize{scheme=w8a16},dce",
                       context=ctx)
    qir.verify(out)
    cb = out.constant("embed.codebook")
    assert str(cb.type).startswith("i8[12,48] q(axis=0")
    text = print_module(out)
    assert "qembedding @embed.codebook" in text and "qmatmul %add.2, @embed.codebook" in text
    assert qir.stored_bytes(out) < qir.stored_bytes(run_pipeline(src, "quantize{scheme=w8a16}"))
    # quantize adds only its own (small) error on top of vocab-share's
    shared = run_pipeline(src, "vocab-share{clusters=8,keep=4,residual_bits=2,min_rows=1}", context=ctx)
    feed = feeds(1, seed=9)[0]
    assert rel_err(run_out(out, feed), run_out(shared, feed)) < 0.05
    assert run_out(out, feed).shape == (1, 12, VOCAB)


def test_errors() -> None:
    src = tied(64, 8)
    with pytest.raises(PassFailedError, match="calibration data"):
        run_pipeline(src, "vocab-share{clusters=4,keep=2,min_rows=1}")
    with pytest.raises(PassFailedError, match="residual_bits must be"):
        run_pipeline(src, "vocab-share{clusters=4,keep=0,residual_bits=3,min_rows=1}")
    with pytest.raises(PassFailedError, match="no ids for the lookup"):
        run_pipeline(src, "vocab-share{clusters=4,keep=2,min_rows=1}",
                     context=PassContext(calibration=[{"tokens": np.array([[1, 2]])}]))
    # keep=0 needs no calibration at all
    out = run_pipeline(src, "vocab-share{clusters=4,keep=0,residual_bits=0,min_rows=1}")
    assert out.constant("embed.codebook").type.shape == (4, 8)
