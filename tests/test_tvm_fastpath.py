"""The scheduled non-matmul CPU kernels of the TVM backend against the reference interpreter.

``attention`` (fused scores/mask/softmax/``p @ v``, read and written through head transposes), ``quantize`` per
token (bit-exact codes, scales and zero points, ties included), ``layer_norm`` / ``rms_norm``, ``gelu`` and the
polynomial ``exp`` / ``erf`` they use (:mod:`qir.backends.tvm.kernels`). Each test builds a small module with
``use_kernels=True`` (what ``qir compile --target tvm-llvm`` does), checks that the kernel was chosen, and compares
with :func:`qir.interpreter.run`.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import qir
from qir.backends.target import load_target
from qir.interpreter import run
from qir.quantspec import QuantSpec
from qir.types import TensorType

tvm = pytest.importorskip("tvm")

from qir.backends.tvm.compile import Built, build  # noqa: E402 - after the importorskip


def _build(m: qir.Module) -> Built:
    return build(m, load_target("tvm-llvm"), use_kernels=True)


def _compare(m: qir.Module, feeds: list[np.ndarray], kernels: dict[str, int], *, rtol: float = 1e-5,
             atol: float = 1e-5) -> tuple[list[np.ndarray], Built]:
    built = _build(m)
    for name, count in kernels.items():
        assert built.lowered.kernels.get(name) == count, built.lowered.kernels
    outs = built.run(feeds)
    refs = run(m, feeds)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)
    return outs, built


# -- polynomial math ----------------------------------------------------------------------------------------------
def _elementwise(fn: object, x: np.ndarray) -> np.ndarray:
    from tvm import s_tir, te

    n = x.size
    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: fn(a[i]), name="b")  # type: ignore[operator]
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("b"))
    sch.vectorize(sch.split(i, [None, 8])[1])
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


def test_fast_exp_and_erf_accuracy() -> None:
    from math import erf

    from qir.backends.tvm.kernels.mathfn import fast_erf, fast_exp, gelu_erf

    x = np.linspace(-87.0, 88.0, 100_003).astype(np.float32)
    got = _elementwise(fast_exp, x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2.5e-7  # 2 ulp
    x = np.linspace(-6.0, 6.0, 20_001).astype(np.float32)
    want_erf = np.array([erf(float(v)) for v in x])
    assert np.max(np.abs(_elementwise(fast_erf, x) - want_erf)) < 5e-7
    gelu = 0.5 * x.astype(np.float64) * (1.0 + np.array([erf(float(v) / np.sqrt(2.0)) for v in x]))
    assert np.max(np.abs(_elementwise(gelu_erf, x) - gelu)) < 2e-6


# -- quantize per token ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym,dt,k", [(True, "i8", 70), (False, "u8", 70), (True, "i8", 384)])
def test_quantize_per_token_kernel_is_bit_exact(sym: bool, dt: str, k: int) -> None:
    m = qir.Module("q")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, "seq", k]))
    spec = QuantSpec.dynamic_spec(axis=2, group_size=k, symmetric=sym)
    xq = f.add_op("quantize", [x], result_types=[TensorType.of(dt, [2, "seq", k], spec)], names=["x.q"]).result
    f.set_outputs([f.add_op("dequantize", [xq], names=["x.dq"]).result])
    rng = np.random.default_rng(11)
    xs = (rng.standard_normal((2, 5, k)) * 3 + (0.0 if sym else 1.5)).astype(np.float32)
    # Ties: with a row maximum of 127 the symmetric scale is exactly 1, so x / s = 2.5, -3.5, 0.5, 126.5 must
    # round half to even (2, -4, 0, 126), which a floor(x + 0.5) or round-half-away kernel gets wrong.
    xs[0, 0, :5] = [127.0, 2.5, -3.5, 0.5, 126.5]
    xs[1, 2, :] = 0.0  # an all-zero row: scale 1, codes 0
    built = _build(m)
    assert built.lowered.kernels.get("quantize_rows") == 1, built.lowered.kernels
    (out,) = built.run([xs])
    (ref,) = run(m, [xs])
    np.testing.assert_array_equal(out, ref)  # x.dq = scale * (q - zp): equal only if codes, scale and zp are
    if sym:
        np.testing.assert_array_equal(out[0, 0, :5], [127.0, 2.0, -4.0, 0.0, 126.0])


def test_quantize_per_channel_stays_on_the_generic_path() -> None:
    """A dynamic spec with no group is one scale per column, not per row: the row kernel must not take it."""
    m = qir.Module("q")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [6, 32]))
    spec = QuantSpec.dynamic_spec(axis=1, symmetric=True)
    xq = f.add_op("quantize", [x], result_types=[TensorType.of("i8", [6, 32], spec)], names=["x.q"]).result
    f.set_outputs([f.add_op("dequantize", [xq], names=["x.dq"]).result])
    xs = np.random.default_rng(2).standard_normal((6, 32)).astype(np.float32)
    built = _build(m)
    assert "quantize_rows" not in built.lowered.kernels
    np.testing.assert_array_equal(built.run([xs])[0], run(m, [xs])[0])


# -- attention ------------------------------------------------------------------------------------------------------
def _attention_module(*, hq: int, hkv: int, d: int, mask: str | None, causal: bool, through_transposes: bool,
                      sq: object = "s", sk: object = "s") -> qir.Module:
    m = qir.Module("att")
    f = m.add_function("main")
    if through_transposes:
        xq = f.add_input("xq", TensorType.of("f32", [2, sq, hq, d]))
        xk = f.add_input("xk", TensorType.of("f32", [2, sk, hkv, d]))
        q = f.add_op("transpose", [xq], {"perm": [0, 2, 1, 3]}, names=["q"]).result
        k = f.add_op("transpose", [xk], {"perm": [0, 2, 1, 3]}, names=["k"]).result
    else:
        q = f.add_input("q", TensorType.of("f32", [2, hq, sq, d]))
        k = f.add_input("k", TensorType.of("f32", [2, hkv, sk, d]))
    v = f.add_input("v", TensorType.of("f32", [2, hkv, sk, d]))
    operands = [q, k, v]
    if mask == "bool":
        operands.append(f.add_input("mask", TensorType.of("bool", [2, 1, sq, sk])))
    elif mask == "f32":
        operands.append(f.add_input("mask", TensorType.of("f32", [sq, sk])))
    a = f.add_op("attention", operands, {"causal": causal}, names=["a"]).result
    if through_transposes:
        a = f.add_op("transpose", [a], {"perm": [0, 2, 1, 3]}, names=["o"]).result
    f.set_outputs([a])
    return m


@pytest.mark.parametrize("hq,hkv,mask,causal,through,s", [
    (4, 4, "bool", False, True, 21),  # MiniLM's shape of the op: bool padding mask, read through transposes
    (6, 2, None, True, False, 45),    # GQA + causal (SmolLM2 prefill); 3 x 45 query rows: three 64-row tasks
    (4, 2, "f32", True, True, 21),    # additive float mask + causal
])
def test_fused_attention_matches_interpreter(hq: int, hkv: int, mask: str | None, causal: bool,
                                             through: bool, s: int) -> None:
    d = 32  # 21 keys: one full 16-lane tile plus a padded one
    m = _attention_module(hq=hq, hkv=hkv, d=d, mask=mask, causal=causal, through_transposes=through)
    rng = np.random.default_rng(5)
    if through:
        feeds = [rng.standard_normal((2, s, hq, d)), rng.standard_normal((2, s, hkv, d))]
    else:
        feeds = [rng.standard_normal((2, hq, s, d)), rng.standard_normal((2, hkv, s, d))]
    feeds = [x.astype(np.float32) for x in feeds] + [rng.standard_normal((2, hkv, s, d)).astype(np.float32)]
    if mask == "bool":
        mk = rng.random((2, 1, s, s)) > 0.3
        mk[1, 0, 4, :] = False  # a row with no key left: output 0, not NaN
        feeds.append(mk)
    elif mask == "f32":
        feeds.append(rng.standard_normal((s, s)).astype(np.float32))
    (out,), built = _compare(m, feeds, {"attention": 1})
    if mask == "bool":
        assert not np.isnan(out).any()
        row = out[1, 4] if through else out[1, :, 4]
        np.testing.assert_array_equal(row, 0.0)
    if through:  # the head transposes are folded into the kernel: the VM program calls no transpose
        assert "transpose" not in built.executable.as_text()


def test_fused_attention_decode_step_over_a_static_cache() -> None:
    """One query against a 40-slot cache with a bool mask of the filled slots (SmolLM2's decode shape)."""
    m = _attention_module(hq=6, hkv=2, d=64, mask="bool", causal=False, through_transposes=False, sq=1, sk=40)
    rng = np.random.default_rng(9)
    mk = np.zeros((2, 1, 1, 40), bool)
    mk[0, ..., :7] = True
    mk[1, ..., :33] = True
    feeds = [rng.standard_normal((2, 6, 1, 64)).astype(np.float32),
             rng.standard_normal((2, 2, 40, 64)).astype(np.float32),
             rng.standard_normal((2, 2, 40, 64)).astype(np.float32), mk]
    _compare(m, feeds, {"attention": 1})


# -- norms and gelu -------------------------------------------------------------------------------------------------
def test_norms_and_gelu_kernels_match_interpreter() -> None:
    rng = np.random.default_rng(4)
    m = qir.Module("n")
    w = m.add_constant("w", rng.standard_normal(40).astype(np.float32))
    b = m.add_constant("b", rng.standard_normal(40).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, "s", 40]))  # 40 = two 16-lane vectors + a scalar tail
    ln = f.add_op("layer_norm", [x, w, b], {"eps": 1e-12}, names=["ln"]).result
    rms = f.add_op("rms_norm", [x, w], {"eps": 1e-6}, names=["rms"]).result
    g = f.add_op("gelu", [x], names=["g"]).result
    f.set_outputs([ln, rms, g])
    xs = (rng.standard_normal((2, 5, 40)) * 4 + 1).astype(np.float32)
    _compare(m, [xs], {"layer_norm": 1, "rms_norm": 1, "gelu": 1})


def test_decode_attention_reads_only_the_filled_cache_prefix() -> None:
    """SmolLM2's decode mask, ``reshape(arange(Sk) <= position)``, becomes the kernel's key count (position + 1)."""
    m = qir.Module("dec")
    f = m.add_function("decode")
    q = f.add_input("q", TensorType.of("f32", [1, 6, 1, 64]))
    k = f.add_input("k", TensorType.of("f32", [1, 2, 40, 64]))
    v = f.add_input("v", TensorType.of("f32", [1, 2, 40, 64]))
    pos = f.add_input("position", TensorType.of("i64", [1]))
    ar = f.add_op("arange", [], {"size": [40]}, names=["ar"]).result
    le = f.add_op("le", [ar, pos], names=["le"]).result
    mask = f.add_op("reshape", [le], {"shape": [1, 1, 1, 40]}, names=["mask"]).result
    f.set_outputs([f.add_op("attention", [q, k, v, mask], names=["a"]).result])
    built = _build(m)
    assert built.lowered.kernels.get("attention") == 1, built.lowered.kernels
    assert "less_equal" not in built.executable.as_text()  # the mask is not computed at all
    rng = np.random.default_rng(3)
    for position in (0, 17, 39, 64):  # 64: past the cache's end, every slot attended
        feeds = [rng.standard_normal((1, 6, 1, 64)).astype(np.float32),
                 rng.standard_normal((1, 2, 40, 64)).astype(np.float32),
                 rng.standard_normal((1, 2, 40, 64)).astype(np.float32), np.array([position], np.int64)]
        for o, r in zip(built.run(feeds), run(m, feeds)):
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)


# -- prepacked int8 weights -------------------------------------------------------------------------------------------
def test_int8_weights_are_prepacked_at_compile_time() -> None:
    """On VNNI/sdot targets the w8a8 matmul reads tiles made once at lowering; a tied table (matmul weight and
    embedding, like SmolLM2's head) is stored once, as tiles, and the lookup reads them; an int8 weight that
    something else reads keeps its plain codes."""
    from qweights import add_quantized_weight

    from qir.backends.tvm.kernels import prepack_isa

    rng = np.random.default_rng(8)
    m = qir.Module("pp")
    w = add_quantized_weight(m, "w", rng.standard_normal((40, 64)).astype(np.float32), "i8", axis=0)
    tied = add_quantized_weight(m, "tied", rng.standard_normal((40, 64)).astype(np.float32), "i8", axis=0)
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [3, 64]))
    ids = f.add_input("ids", TensorType.of("i64", [3]))
    spec = QuantSpec.dynamic_spec(axis=1, group_size=64, symmetric=True)
    xq = f.add_op("quantize", [x], result_types=[TensorType.of("i8", [3, 64], spec)], names=["x.q"]).result
    y = f.add_op("qmatmul", [xq, w], names=["y"]).result
    z = f.add_op("qmatmul", [xq, tied], names=["z"]).result
    e = f.add_op("qembedding", [tied, ids], names=["e"]).result
    other = add_quantized_weight(m, "other", rng.standard_normal((40, 64)).astype(np.float32), "i8", axis=0)
    o = f.add_op("qmatmul", [xq, other], names=["o"]).result
    od = f.add_op("dequantize", [other], names=["od"]).result
    f.set_outputs([y, z, e, o, od])
    feeds = [rng.standard_normal((3, 64)).astype(np.float32), np.array([0, 39, 7], np.int64)]
    _, built = _compare(m, feeds, {"qmatmul_i8": 3}, rtol=1e-6, atol=1e-5)
    params = built.lowered.params
    assert params["other"].shape == (40, 64) and "other__rowsum" not in params
    packs = prepack_isa(64, built.target) is not None  # False on AVX2-only / SSE hosts: packed per call there
    for name in ("w", "tied"):
        assert (params[name].shape != (40, 64)) == packs and (f"{name}__rowsum" in params) == packs


# -- a real model ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_w8a8_with_every_kernel_matches_interpreter() -> None:
    """SmolLM2 w8a8 through all the kernels above (GQA causal prefill attention, decode over the filled cache
    prefix, rms_norm, per-token quantize, prepacked int8 weights, the tied head looked up from its tiles)."""
    from qir.frontend.importer import import_model
    from qir.passes import PassManager, parse_pipeline

    fm = import_model("smollm2-135m", max_seq=16).module
    m = PassManager(parse_pipeline("quantize{scheme=w8a8}")).run(fm.clone())
    built = _build(m)
    for name in ("attention", "rms_norm", "quantize_rows", "qmatmul_i8"):
        assert built.lowered.kernels.get(name), built.lowered.kernels

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    # Per-token codes flip where upstream floats differ in the last bit, so TVM's w8a8 logits are another draw
    # of the same quantization noise (the generic lowering is 0.998 from the interpreter at one position too):
    # close to the interpreter's, and as close to the float model as the interpreter's are.
    toks = np.array([[1, 504, 3458, 282, 2]], np.int64)
    out = built.run([toks], function="prefill")[0]
    ref = run(m, [toks], function="prefill")[0]
    flt = run(fm, [toks], function="prefill")[0]
    assert cos(out, ref).min() > 0.995
    assert cos(out, flt).min() > cos(ref, flt).min() - 0.003
    rng = np.random.default_rng(1)
    dec = m.function("decode")
    feeds = [np.array([[42]], np.int64), np.array([6], np.int64)]
    feeds += [rng.standard_normal((1, 3, 16, 64)).astype(np.float32) for _ in dec.inputs[2:]]
    assert cos(built.run(feeds, function="decode")[0], run(m, feeds, function="decode")[0]).min() > 0.995


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w4a16", "w4a8"])
def test_smollm2_4bit_presets_with_every_kernel_match_interpreter(preset: str) -> None:
    """SmolLM2 through the 4-bit presets as `qir compile` runs them (merge-siblings: q/k/v and gate/up stacked):
    the decode GEMVs on the dot products (w4a16: the token split in two int8 parts; w4a8: its quantize inside the
    kernel), the split decode attention, the prefill GEMMs; against the interpreter. w4a16 is float up to the
    split (logits within 1e-3 relative); w4a8's per-token codes may flip where upstream floats differ in the last
    bit, so its logits are compared by cosine, as w8a8's are above."""
    from qir.backends.tvm.kernels.w4a8_gemv import w4a8_isa
    from qir.frontend.importer import import_model
    from qir.passes import PassManager, parse_pipeline
    from qir.tools.compile_cli import PRESETS

    fm = import_model("smollm2-135m", max_seq=16).module
    m = PassManager(parse_pipeline(PRESETS[preset])).run(fm.clone())
    assert sum(op.opcode == "qmatmul" for op in m.function("decode").ops) == 4 * 30 + 1  # stacked: 4 per layer
    built = _build(m)
    if w4a8_isa(built.target) in ("vnni", "avx2"):
        assert built.lowered.kernels.get("w4a16dot" if preset == "w4a16" else "w4a8") == 120, built.lowered.kernels

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    def check(out: np.ndarray, ref: np.ndarray, flt: np.ndarray) -> None:
        if preset == "w4a16":
            assert np.linalg.norm(out - ref) < 1e-3 * np.linalg.norm(ref)
            assert cos(out, ref).min() > 0.9999
        else:  # another draw of the same quantization noise: as close to the float model as the interpreter
            assert cos(out, ref).min() > 0.97
            assert cos(out, flt).mean() > cos(ref, flt).mean() - 0.003

    toks = np.array([[1, 504, 3458, 282, 2]], np.int64)
    check(built.run([toks], function="prefill")[0], run(m, [toks], function="prefill")[0],
          run(fm, [toks], function="prefill")[0])
    rng = np.random.default_rng(1)
    dec = m.function("decode")
    feeds = [np.array([[42]], np.int64), np.array([6], np.int64)]
    feeds += [rng.standard_normal((1, 3, 16, 64)).astype(np.float32) for _ in dec.inputs[2:]]
    check(built.run(feeds, function="decode")[0], run(m, feeds, function="decode")[0],
          run(fm, feeds, function="decode")[0])


@pytest.mark.parametrize("p,isa,d", [(0, "host", 64), (17, "host", 64), (39, "host", 64), (17, "avx2", 64),
                                       (39, "avx2", 32), (5, "host", 32), (17, "host", 24)])
def test_attention_kernel_limit_reads_only_the_filled_prefix(p: int, isa: str, d: int) -> None:
    """The decode kernel over a static cache filled up to ``p`` (``limit``): keys ``j <= p`` only, in key tiles
    that do not divide the cache (40 slots, tiles of 2 vectors), grouped-query heads; against numpy. The keys are
    transposed in vector blocks (AVX-512: 16 x 16, AVX2: 8 x 8) where ``d`` is a whole number of vectors, one
    element at a time otherwise (``d = 24``, with values of 32)."""
    from qir.backends.tvm.compile import tvm_target
    from qir.backends.tvm.kernels.attention import attention

    target = tvm_target(load_target("tvm-llvm")) if isa == "host" else tvm.target.Target(
        {"kind": "llvm", "mcpu": "haswell"})
    hq, hkv, sk = 6, 2, 40
    dv = d if d % 16 == 0 else 32
    pf = attention(1, hq, hkv, 1, sk, d, dv, target, scale=0.125, limit=True)
    assert pf is not None
    with target:
        lib = tvm.compile(pf, target=target)
    rng = np.random.default_rng(p)
    q = rng.standard_normal((1, hq, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((1, hkv, sk, dv)).astype(np.float32)
    k[:, :, p + 1:] = np.nan  # slots past the prefix must never be read
    v[:, :, p + 1:] = np.nan
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, np.array([p], np.int64),
                                                  np.zeros((1, hq, 1, dv), np.float32))]
    lib(*args)
    want = np.zeros((hq, dv))
    for h in range(hq):
        s = q[0, h, 0].astype(np.float64) @ k[0, h // (hq // hkv), : p + 1].T.astype(np.float64) * 0.125
        e = np.exp(s - s.max())
        want[h] = (e / e.sum()) @ v[0, h // (hq // hkv), : p + 1].astype(np.float64)
    np.testing.assert_allclose(args[-1].numpy()[0, :, 0], want, rtol=1e-5, atol=1e-5)


# -- the kernels survive the module build as scheduled ----------------------------------------------------------
def test_gemm_kernel_keeps_its_schedule_and_noalias_inside_a_dynamic_module() -> None:
    """A scheduled kernel must reach LLVM as it was scheduled, inside a module with dynamic shapes.

    Two ways it did not (SmolLM2 prefill ran its GEMMs 2-10x slower than the same kernel compiled alone):
    DLight's default-schedule pass re-scheduled unmarked kernels (the generic rule inlined the GEMM's packed weight
    panels back into the FMA loop), and Relax's shape function, without ``tirx.noalias``, made TVM's code generator
    drop the ``noalias`` compute functions for every kernel of the module (LLVM then stores the register tile to
    memory after every FMA). K = 576 is also the size whose old 128-wide K split put a bound check on every FMA.
    """
    from qir.backends.tvm.schedule import pipeline

    rng = np.random.default_rng(5)
    m = qir.Module("g")
    w = m.add_constant("w", rng.standard_normal((40, 576)).astype(np.float32))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", ["s", 576]))
    f.set_outputs([f.add_op("linear", [x, w], names=["y"]).result])
    xs = rng.standard_normal((11, 576)).astype(np.float32)
    _, built = _compare(m, [xs], {"matmul_f32": 1}, rtol=1e-4, atol=1e-4)
    lowered = pipeline(built.target)(built.lowered.mod)
    kernel = next(fn for gv, fn in lowered.functions.items() if gv.name_hint.startswith("matmul_f32_k"))
    assert 'sblock("B_pack")' in kernel.script(), "the packed weight panels were inlined by a default schedule"
    assert not re.search(r"T\.where\([^\n]*\bk_", kernel.script()), "a bound check on K inside the FMA loop"
    prims = [(gv.name_hint, fn) for gv, fn in lowered.functions.items() if isinstance(fn, tvm.tirx.PrimFunc)]
    assert any(name == "shape_func" for name, _ in prims)  # the dynamic shape made Relax add one
    assert all("tirx.noalias" in fn.attrs for _, fn in prims), [n for n, fn in prims if "tirx.noalias" not in fn.attrs]
    ll = built.executable.mod.imports[0].inspect_source("ll")
    compute = [line for line in ll.splitlines() if line.startswith("define") and "@matmul_f32_k_compute_(" in line]
    assert compute and "noalias" in compute[0], "no noalias compute function for the GEMM kernel"
