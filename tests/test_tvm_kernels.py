"""Differential tests of the hand-scheduled TVM CPU kernels (qir.backends.tvm.kernels) against numpy.

Integer paths must be exact up to the final f32 epilogue (LLVM may contract ``acc * scale + bias``
into one FMA, so the comparison allows a few ulps); float paths within a tolerance scaled by K.
Each case compiles one small kernel (~0.3 s).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import tirx  # noqa: E402

from qir.backends.tvm.kernels import features_of, matmul_f32, qmatmul_i8, wmatmul  # noqa: E402
from qir.ops.quantized import _integer_path  # noqa: E402
from qir.quant import QTensor, quantize_dynamic  # noqa: E402
from qir.quantspec import QuantSpec  # noqa: E402
from qir.safetensors_io import pack  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
# A generic x86-64 target: the kernels must not depend on the build host's AVX-512 / VNNI.
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
ARM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
DYN = tirx.Var("m", "int64")


def _run(func: tirx.PrimFunc, target: tvm.target.Target, args: list[np.ndarray], out_shape: tuple[int, ...]
         ) -> np.ndarray:
    ex = tvm.compile(tvm.IRModule({"main": func}), target=target)
    y = tvm.runtime.empty(out_shape, "float32")
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], y)
    return y.numpy()


def test_features_follow_the_target_not_the_host() -> None:
    assert features_of(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})).avx512 is False
    assert features_of(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})).vnni is True
    arm = features_of(ARM)
    assert arm.arch == "aarch64" and arm.dotprod and not arm.avx2
    assert features_of(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) is None
    assert matmul_f32(4, 4, 4, tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) is None


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize(("m", "n", "k", "layout", "bias"), [
    (37, 50, 70, "NK", True), (64, 96, 128, "KN", False), (1, 50, 70, "NK", True), (DYN, 33, 9, "NK", False)])
def test_matmul_f32(target: tvm.target.Target, m: int | tirx.Var, n: int, k: int, layout: str, bias: bool) -> None:
    rng = np.random.default_rng(1)
    mv = 11 if isinstance(m, tirx.Var) else m
    a = rng.standard_normal((mv, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if layout == "NK" else (k, n)).astype(np.float32)
    bs = rng.standard_normal(n).astype(np.float32)
    func = matmul_f32(m, n, k, target, b_layout=layout, bias=bias)
    y = _run(func, target, [a, b] + ([bs] if bias else []), (mv, n))
    ref = a.astype(np.float64) @ (b.T if layout == "NK" else b).astype(np.float64) + (bs if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * k)


def _reference_qmatmul(xq: QTensor, w: QTensor, bias: np.ndarray | None) -> np.ndarray:
    y = _integer_path(xq, w)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize(("m", "n", "k"), [(9, 40, 64), (1, 17, 36), (DYN, 64, 24)])
def test_qmatmul_i8_dynamic_per_token_matches_interpreter(target: tvm.target.Target, m: int | tirx.Var, n: int,
                                                         k: int) -> None:
    rng = np.random.default_rng(2)
    mv = 5 if isinstance(m, tirx.Var) else m
    x = (rng.standard_normal((mv, k)) * 3).astype(np.float32)
    xq = quantize_dynamic(x, QuantSpec(axis=1, group_size=k, dynamic=True), "i8")
    wf = rng.standard_normal((n, k)).astype(np.float32)
    wscale = (np.abs(wf).max(axis=1) / 127).astype(np.float32)
    wq = QTensor(np.clip(np.rint(wf / wscale[:, None]), -127, 127).astype(np.int8), wscale, None,
                 QuantSpec(axis=0, scale="s"))
    bias = rng.standard_normal(n).astype(np.float32)
    func = qmatmul_i8(m, n, k, target, a_dtype="int8", a_scale="token", bias=True)
    y = _run(func, target, [xq.codes, wq.codes, xq.scale.reshape(-1), wscale, bias], (mv, n))
    ref = _reference_qmatmul(xq, wq, bias)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
def test_qmatmul_i8_static_u8_with_zero_point_is_exact_in_integers(target: tvm.target.Target) -> None:
    rng = np.random.default_rng(3)
    m, n, k, zp = 7, 33, 50, 102
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    # Unit scales make Y the integer accumulator itself: any off-by-one in the zero point shows.
    func = qmatmul_i8(m, n, k, target, a_dtype="uint8", a_scale="tensor", a_zero_point=zp)
    y = _run(func, target, [a, w, np.ones(1, np.float32), np.ones(n, np.float32)], (m, n))
    acc = (a.astype(np.int64) - zp) @ w.astype(np.int64).T
    np.testing.assert_array_equal(y, acc.astype(np.float32))


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize(("m", "n", "k", "bits", "group", "sym", "bias"), [
    (1, 40, 64, 4, 32, True, True), (1, 35, 64, 4, None, False, False), (1, 40, 64, 8, 16, True, False),
    (1, 24, 48, 8, None, False, True), (5, 40, 64, 4, 32, False, True), (DYN, 40, 64, 8, None, True, True),
    (3, 33, 20, 4, 6, True, False), (1, 40, 128, 4, 64, False, False)])
def test_wmatmul_dequantizes_like_qir(target: tvm.target.Target, m: int | tirx.Var, n: int, k: int, bits: int,
                                      group: int | None, sym: bool, bias: bool) -> None:
    rng = np.random.default_rng(4)
    mv = 6 if isinstance(m, tirx.Var) else m
    lo, hi = {(4, True): (-8, 8), (4, False): (0, 16), (8, True): (-128, 128), (8, False): (0, 256)}[(bits, sym)]
    codes = rng.integers(lo, hi, (n, k))
    groups = 1 if group is None else -(-k // group)
    scale = (rng.random((n,) if group is None else (n, groups)) * 0.1 + 0.01).astype(np.float32)
    zp = None if sym else rng.integers(lo, hi, scale.shape).astype(np.int32)
    spec = QuantSpec(axis=0, scale="s") if group is None else QuantSpec(axis=1, group_size=group, scale="s")
    if not sym:
        spec = QuantSpec(axis=spec.axis, group_size=spec.group_size, scale="s", zero_point="z", symmetric=False)
    wq = QTensor(codes, scale, zp, spec)
    x = rng.standard_normal((mv, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    if bits == 8:
        packed = codes.astype(np.int8 if sym else np.uint8)
    else:
        packed = pack(codes, "i4" if sym else "u4").reshape(n, k // 2)
    func = wmatmul(m, n, k, bits, group, target, symmetric=sym, bias=bias)
    args = [x, packed, scale] + ([] if sym else [zp]) + ([b] if bias else [])
    y = _run(func, target, args, (mv, n))
    ref = x.astype(np.float64) @ wq.dequantize().astype(np.float64).T + (b if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * k)


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("params", ["float32", "float16", "nested"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_int4_gemv_with_minimums(target: tvm.target.Target, params: str, bias: bool) -> None:
    """The decode GEMV of the w4a16 preset (and GGUF Q4_1): unsigned nibbles, a scale and a minimum per group of 32,
    the parameters plain (f32, f16) or two-level (``compress-scales``: u8 codes x fp16 row scale + fp16 row base).
    The kernel factors the parameters out of the per-weight work (``sum_g s_g * sum x*q + m_g * sum x``); an odd N
    leaves a partial chunk of rows."""
    from qir.backends.tvm.kernels import Nested
    from qir.backends.tvm.qops import QLayout

    rng = np.random.default_rng(7)
    n, k, group = 38, 192, 32
    g = k // group
    codes = rng.integers(0, 16, (n, k))
    x = rng.standard_normal((1, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    if params == "nested":
        lay = QLayout(axis=0, group=None, bits=8, signed=False, has_zp=False, qmin=0, qmax=255)
        flat: list[np.ndarray] = []
        vals = []
        for base in (0.01, -0.5):  # the scale, then the minimum: codes, per-row fp16 scale and base
            c = rng.integers(0, 256, (n, g)).astype(np.uint8)
            rs = (rng.random(n) * 0.01 + 0.001).astype(np.float16)
            rb = np.full(n, base, np.float16)
            vals.append(c * rs.astype(np.float32)[:, None] + rb.astype(np.float32)[:, None])
            flat += [c, rs, rb]
        scale, minimum = vals
        sdt: str | Nested = Nested(lay, "float16", "float16")
    else:
        dt = np.float32 if params == "float32" else np.float16
        scale = (rng.random((n, g)) * 0.1 + 0.01).astype(dt)
        minimum = (rng.standard_normal((n, g)) * 0.3).astype(dt)
        flat = [scale, minimum]
        sdt = params
        scale, minimum = scale.astype(np.float32), minimum.astype(np.float32)
    func = wmatmul(1, n, k, 4, group, target, symmetric=True, signed=False, offset=True, bias=bias,
                   scale_dtype=sdt, offset_dtype=sdt)
    packed = pack(codes, "u4").reshape(n, k // 2)
    y = _run(func, target, [x, packed, *flat] + ([b] if bias else []), (1, n))
    w = codes * np.repeat(scale, group, axis=1).astype(np.float64) + np.repeat(minimum, group, axis=1)
    ref = x.astype(np.float64) @ w.T + (b if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * k)


def _w4a8_offset(offset: str | None, rng: np.random.Generator, n: int, g: int
                 ) -> tuple[list[np.ndarray], np.ndarray, str | tuple[str, str, str] | None]:
    """A w4a8 kernel's minimum per group: (its arguments, its f32 values [n, g], its form), for ``offset`` None,
    ``"float16"`` or ``"nested"`` (8-bit codes against an fp16 scale and base per row, as compress-scales stores)."""
    if offset == "float16":
        o = (rng.standard_normal((n, g)) * 0.3).astype(np.float16)
        return [o], o.astype(np.float32), "float16"
    if offset == "nested":
        c = rng.integers(0, 256, (n, g)).astype(np.uint8)
        r = (rng.random(n) * 0.01).astype(np.float16)
        base = np.full(n, -0.5, np.float16)
        return [c, r, base], c * r.astype(np.float32)[:, None] + base.astype(np.float32)[:, None], (
            "uint8", "float16", "float16")
    return [], np.zeros((n, g), np.float32), None


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize(("signed", "zp", "offset", "group", "k"), [
    (False, True, None, 32, 192), (True, False, None, 64, 192), (False, False, "float16", 32, 192),
    (False, False, "nested", 64, 192), (False, False, "nested", 32, 96), (False, True, "float16", 32, 1088),
    (True, False, None, 32, 1088)])
def test_w4a8_gemv_matches_the_integer_path(target: tvm.target.Target, signed: bool, zp: bool, offset: str | None,
                                            group: int, k: int) -> None:
    """The w4a8 decode GEMV against qir's integer ``qmatmul`` (numpy): int8 per-token codes times 4-bit codes in
    groups, zero points (u4), signed codes (i4), float minimums plain or two-level; an N that leaves a partial
    chunk of rows. Host: ``vpdpbusd`` where VNNI exists; AVX2: ``vpmaddubsw`` + ``vpmaddwd``. ``K`` a multiple of
    64 takes 64 weights per step (2 rows per task; 1 row past K = 1024, and 34 groups leave a tail for the
    vectorized zero-point term); ``K = 96`` one group of 32 at a time."""
    from qir.backends.tvm.kernels import w4a8_gemv

    rng = np.random.default_rng(11)
    n = 37
    g = k // group
    codes = rng.integers(-8, 8, (n, k)) if signed else rng.integers(0, 16, (n, k))
    z = rng.integers(0, 16, (n, g)).astype(np.uint8)
    s = (rng.random((n, g)) * 0.1).astype(np.float32)
    xq = rng.integers(-127, 128, (1, k)).astype(np.int8)
    sx = np.array([0.02], np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    oargs, ov, oform = _w4a8_offset(offset, rng, n, g)
    func = w4a8_gemv(n, k, group, target, signed=signed, zp_dtype="uint8" if zp else None, scale="float32",
                     offset=oform, bias=True)
    assert func is not None
    assert w4a8_gemv(n, k, group, target, signed=True, zp_dtype="uint8", scale="float32") is None  # not a qir spec
    args = [xq, sx, pack(codes, "i4" if signed else "u4").reshape(n, k // 2), s] + ([z] if zp else []) + oargs + [b]
    y = _run(func, target, args, (1, n))
    wz = codes - (np.repeat(z, group, 1).astype(np.int64) if zp else 0)
    w = wz * np.repeat(s, group, 1).astype(np.float64) + np.repeat(ov, group, 1)
    ref = sx[0] * (xq.astype(np.float64) @ w.T) + b
    np.testing.assert_allclose(y[0], ref[0], rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize(("signed", "zp", "offset", "k"), [
    (True, False, None, 192), (False, True, None, 1088), (False, False, "nested", 576)])
def test_w4a16_dot_gemv_carries_the_float_token_to_its_bound(target: tvm.target.Target, signed: bool, zp: bool,
                                                              offset: str | None, k: int) -> None:
    """``float_x``: a float token split per chunk of 32 into two int8 parts (``x = a * (h + l / 254)``, ``a`` the
    chunk's max / 127) against 4-bit weights on the dot products. Each element is then off by at most ``a / 508``,
    so every output is within ``sum_k |w_k| * a_chunk(k) / 508`` of the float product (plus f32 rounding), an
    outlier of 60 in one chunk included; the bound is also not loose by orders of magnitude."""
    from qir.backends.tvm.kernels import w4a8_gemv

    rng = np.random.default_rng(5)
    n, g = 37, k // 32
    codes = rng.integers(-8, 8, (n, k)) if signed else rng.integers(0, 16, (n, k))
    z = rng.integers(0, 16, (n, g)).astype(np.uint8)
    s = (rng.random((n, g)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, 7] = 60.0
    b = rng.standard_normal(n).astype(np.float32)
    oargs, ov, oform = _w4a8_offset(offset, rng, n, g)
    func = w4a8_gemv(n, k, 32, target, signed=signed, zp_dtype="uint8" if zp else None, scale="float32",
                     offset=oform, bias=True, float_x=True)
    assert func is not None
    args = [x, pack(codes, "i4" if signed else "u4").reshape(n, k // 2), s] + ([z] if zp else []) + oargs + [b]
    y = _run(func, target, args, (1, n))[0]
    wz = codes - (np.repeat(z, 32, 1).astype(np.int64) if zp else 0)
    w = wz * np.repeat(s, 32, 1).astype(np.float64) + np.repeat(ov, 32, 1)
    ref = (x.astype(np.float64) @ w.T)[0] + b
    a = np.repeat(np.abs(x).reshape(-1, 32).max(1) / 127, 32)
    bound = np.abs(w) @ (a / 508) + 1e-6 * (np.abs(w) @ np.abs(x[0]) + np.abs(b))
    err = np.abs(y - ref)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 1e-4 * bound.max()  # the split is there: not exact f32


def test_w4a16_dot_gemv_only_where_it_applies() -> None:
    from qir.backends.tvm.kernels import w4a8_gemv

    common = {"signed": False, "zp_dtype": None, "scale": "float32", "float_x": True}
    assert w4a8_gemv(16, 192, 64, HOST, **common) is None  # groups of 64: the float GEMV keeps them
    assert w4a8_gemv(16, 96, 32, HOST, **common) is None  # K not a multiple of 64
    assert w4a8_gemv(16, 192, 32, ARM, **common) is None  # Arm: not this path
    assert w4a8_gemv(16, 192, 32, HOST, **common) is not None


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("case", ["random", "zeros", "halves"])
def test_w4a8_gemv_quantizes_the_token_as_the_quantize_op(target: tvm.target.Target, case: str) -> None:
    """``quantize_x``: the kernel takes the float token and quantizes it itself; its result is bit-identical to the
    kernel fed the codes and scale of qir's dynamic per-token ``quantize`` (the interpreter's), for random values,
    an all-zero token (scale 1) and values exactly half a step apart (round half to even). (A NaN is not covered:
    the interpreter gives it code 0, and neither this nor the ``quantize_rows`` kernel does.)"""
    from qir.backends.tvm.kernels import w4a8_gemv

    rng = np.random.default_rng(7)
    n, k = 37, 192
    x = rng.standard_normal((1, k)).astype(np.float32)
    if case == "zeros":
        x[:] = 0
    elif case == "halves":
        x = (rng.integers(-60, 60, (1, k)) + 0.5).astype(np.float32)
        x[0, 0] = 127.0  # the scale is exactly 1: every other value is half a step from two codes
    q = quantize_dynamic(x, QuantSpec.dynamic_spec(axis=1, group_size=k), "i8")
    xq, sx = np.asarray(q.codes, np.int8), np.asarray(q.scale, np.float32).reshape(1)
    codes = rng.integers(0, 16, (n, k))
    s = (rng.random((n, k // 32)) * 0.1).astype(np.float32)
    w = pack(codes, "u4").reshape(n, k // 2)
    common = {"signed": False, "zp_dtype": None, "scale": "float32"}
    folded = _run(w4a8_gemv(n, k, 32, target, **common, quantize_x=(-128, 127)), target, [x, w, s], (1, n))
    given = _run(w4a8_gemv(n, k, 32, target, **common), target, [xq, sx, w, s], (1, n))
    np.testing.assert_array_equal(folded, given)


def test_w4a8_gemv_instructions_per_isa() -> None:
    """One dot-product instruction per group: ``vpdpbusd`` with VNNI, ``vpmaddubsw`` on AVX2 only, ``sdot`` on
    AArch64 (cross-compiled, not run); no kernel without any of them (SSE)."""
    from qir.backends.tvm.kernels import w4a8_gemv

    def asm(target: tvm.target.Target) -> str:
        f = w4a8_gemv(64, 128, 32, target, signed=False, zp_dtype="uint8", scale="float16")
        return tvm.compile(tvm.IRModule({"main": f}), target=target).mod.inspect_source("asm")

    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert re.search(r"^\s+vpdpbusd\s", asm(zen4), re.M)
    zen3 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    a = asm(zen3)
    assert re.search(r"^\s+vpmaddubsw\s", a, re.M) and not re.search(r"vpdpbusd", a)
    assert re.search(r"^\s+sdot\s", asm(ARM), re.M)
    assert w4a8_gemv(64, 128, 32, tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}), signed=False,
                     zp_dtype=None, scale="float32") is None
    assert w4a8_gemv(64, 96, 48, HOST, signed=False, zp_dtype=None, scale="float32") is None  # group % 32


def test_int4_needs_even_k() -> None:
    with pytest.raises(ValueError, match="even K"):
        wmatmul(1, 8, 7, 4, None, HOST)


@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_int8_kernel_cross_compiles_for_aarch64_with_sdot(a_dtype: str) -> None:
    # Compile-only (no AArch64 machine here): the int8 kernel's inner loop is the dot-product instruction.
    func = qmatmul_i8(16, 32, 64, ARM, a_dtype=a_dtype, a_scale="tensor", a_zero_point=3 if a_dtype == "uint8" else 0)
    asm = tvm.compile(tvm.IRModule({"main": func}), target=ARM).mod.inspect_source("asm")
    assert re.search(r"^\s+sdot\s", asm, re.M), "no sdot in the AArch64 int8 kernel"
    # Without +dotprod the exact NEON fallback (widening multiply-accumulate) is used instead.
    plain = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    asm = tvm.compile(tvm.IRModule({"main": qmatmul_i8(16, 32, 64, plain)}), target=plain).mod.inspect_source("asm")
    assert not re.search(r"^\s+sdot\s", asm, re.M)
    assert re.search(r"^\s+(smlal|smull)\d?\s", asm, re.M)


def _x86_mnemonics(func: tirx.PrimFunc, target: tvm.target.Target) -> set[str]:
    asm = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.inspect_source("asm")
    return set(re.findall(r"^\s+([a-z][a-z0-9]*)\s", asm, re.M))


def test_int8_kernel_uses_vnni_only_where_the_target_has_it() -> None:
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert "vpdpbusd" in _x86_mnemonics(qmatmul_i8(8, 64, 64, zen4), zen4)
    zen3 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})  # AVX2 only: no VNNI, no AVX-512
    assert not {"vpdpbusd", "vpmaddubsw"} & _x86_mnemonics(qmatmul_i8(8, 64, 64, zen3), zen3)


def _parallel_bodies(ll: str) -> list[str]:
    """The LLVM IR bodies of a module's parallel tasks (``__tvm_parallel_lambda*``)."""
    return [m.group(0) for m in re.finditer(r"define [^\n]*@__tvm_parallel_lambda[^\n]*\{.*?\n\}", ll, re.S)]


@pytest.mark.parametrize("kind", ["f32", "int8", "int4"])
def test_gemv_tasks_allocate_nothing_per_row(kind: str) -> None:
    """A decode GEMV's per-task partial sums live on the stack, not in a heap workspace.

    TVM lowers a ``local``-scope buffer on CPU to ``TVMBackendAllocWorkspace``/``Free`` calls, made once per
    iteration of the parallel loop: per output row here. That cost a SmolLM2 w8a16 decode step about half its
    time (60 tok/s against 117 once the buffers were plain ``global`` allocations, which LLVM keeps in registers).
    """
    if kind == "f32":
        func = matmul_f32(1, 256, 576, HOST)
    elif kind == "int8":
        func = wmatmul(1, 256, 576, 8, None, HOST)
    else:
        func = wmatmul(1, 256, 576, 4, 32, HOST, symmetric=False, signed=False)
    ll = tvm.compile(tvm.IRModule({"main": func}), target=HOST).mod.inspect_source("ll")
    bodies = _parallel_bodies(ll)
    assert bodies, "the GEMV has no parallel loop"
    assert not any("__TVMBackendAllocWorkspace" in b for b in bodies)


def test_tvmscript_kernels_bind_their_scalars_without_allocating() -> None:
    """In the installed TVMScript a plain ``x = expr`` inside a kernel is a mutable binding that TVM lowers to a
    ``TVMBackendAllocWorkspace``/``Free`` pair, per iteration of the parallel loop around it; ``x: T.let = expr`` is
    a let. SmolLM2's decode attention made ~60 such calls per task (its index arithmetic and the vectors of the key
    transpose), the w4a8 GEMV 7 per row chunk (25 us -> 60 us per call). Only real buffers may be allocated per
    task: the attention's transposed keys ``Kt`` and score rows ``S``."""
    from qir.backends.tvm.kernels.attention import attention
    from qir.backends.tvm.kernels.w4a8_gemv import w4a8_gemv

    cases = {
        "attention": (attention(1, 9, 3, 1, 1024, 64, 64, HOST, scale=0.125, limit=True), {"Kt", "S"}),
        "qmatmul_i8": (qmatmul_i8(1, 256, 576, HOST, a_dtype="int8", a_scale="token", a_zero_point=0), set()),
        "w4a8": (w4a8_gemv(256, 576, 32, HOST, signed=False, zp_dtype="uint8", scale="float32"), set()),
        "w4a8_avx2": (w4a8_gemv(256, 576, 32, AVX2, signed=True, zp_dtype=None, scale="float16"), set()),
    }
    for name, (func, allowed) in cases.items():
        target = AVX2 if name.endswith("avx2") else HOST
        ll = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.inspect_source("ll")
        bodies = _parallel_bodies(ll)
        assert bodies, f"{name}: no parallel loop"
        allocated = {m.group(1) for b in bodies for m in re.finditer(r"%([A-Za-z_][\w.]*) = tail call ptr %\d+\(i32 1, "
                                                                     r"i32 %dev_id", b)}
        assert {a.rstrip("0123456789") for a in allocated} <= allowed, f"{name} allocates {sorted(allocated)} per task"
