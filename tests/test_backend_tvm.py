"""The TVM backend: qir -> Relax lowering against the reference interpreter, targets, artifacts, ``qir compile``.

Small modules built with the graph API check each quantized op (integer codes exact, floats within tolerance);
the real models (MiniLM float and w8a8, SmolLM2 prefill and decode) are ``@pytest.mark.slow`` and compiled once
per module-scoped fixture. ``tvm-arm`` and ``tvm-cuda`` are compile-only here (no aarch64 device, no GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

import qir
from qir import quant
from qir.backends.compile import CompileError
from qir.backends.target import load_target
from qir.interpreter import run
from qir.quantspec import QuantSpec
from qir.types import TensorType

tvm = pytest.importorskip("tvm")

from qir.backends.tvm.compile import build  # noqa: E402 - after the importorskip


def _weight(m: qir.Module, name: str, w: np.ndarray, dt: str, **kw: object) -> qir.graph.Value:
    spec, scale, zp = quant.choose_params(w, dt, scale_name=f"{name}.scale", zero_point_name=f"{name}.zp", **kw)
    codes = quant.quantize_spec(w, spec, dt, scale, zp).codes
    if spec.axis is not None:
        m.add_constant(f"{name}.scale", scale)
        if zp is not None:
            m.add_constant(f"{name}.zp", zp.astype(qir.dtypes.dtype(dt).numpy))
    return m.add_constant(name, codes, type=TensorType.of(dt, codes.shape, spec))


def _mlp(x_spec: QuantSpec | None, w_dt: str = "i8", *, k: int = 64, n: int = 48, bias: bool = True,
         x_dt: str = "i8", **wkw: object) -> qir.Module:
    """x -> [quantize] -> qmatmul -> gelu, with the codes and the matmul result as extra outputs."""
    rng = np.random.default_rng(3)
    m = qir.Module("t")
    w = _weight(m, "w", rng.standard_normal((n, k)).astype(np.float32), w_dt, **wkw)
    b = m.add_constant("b", rng.standard_normal(n).astype(np.float32)) if bias else None
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [2, "seq", k]))
    xin = x
    outs = []
    if x_spec is not None:
        xin = f.add_op("quantize", [x], result_types=[TensorType.of(x_dt, [2, "seq", k], x_spec)],
                       names=["x.q"]).result
    y = f.add_op("qmatmul", [xin, w] + ([b] if b is not None else []), names=["y"]).result
    outs = [f.add_op("gelu", [y], names=["z"]).result, y]
    if x_spec is not None:
        outs.append(f.add_op("dequantize", [xin], names=["x.dq"]).result)
    f.set_outputs(outs)
    return m


def _x(k: int = 64, seq: int = 7) -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((2, seq, k)) * 2).astype(np.float32)


def _tvm_run(m: qir.Module, inputs: list[np.ndarray], *, function: str | None = None,
             use_kernels: bool = False) -> list[np.ndarray]:
    return build(m, load_target("tvm-llvm"), use_kernels=use_kernels).run(inputs, function=function)


# -- quantized ops against the interpreter ---------------------------------------------------------------------
@pytest.mark.parametrize("sym,x_dt", [(True, "i8"), (False, "u8")])
def test_w8a8_dynamic_per_token_matches_interpreter(sym: bool, x_dt: str) -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=64, symmetric=sym), x_dt=x_dt, axis=0)
    xs = _x() + (0.0 if sym else 1.5)
    refs: dict[str, object] = {}
    ref = run(m, [xs], observer=lambda v, rv: refs.__setitem__(v.name, rv))
    z, y, xdq = _tvm_run(m, [xs])
    # The codes and scales are exact when the dequantized codes are (x.dq = scale * (q - zp)) ...
    np.testing.assert_array_equal(xdq, ref[2])
    # ... and the integer matmul with its f32 epilogue follows the interpreter's order of operations.
    np.testing.assert_allclose(y, ref[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, ref[0], rtol=1e-5, atol=1e-5)


def test_static_per_tensor_asymmetric_activations_and_weights() -> None:
    m = _mlp(QuantSpec.per_tensor(0.03, 7), "u8", x_dt="u8", axis=0, symmetric=False)
    xs = _x()
    ref = run(m, [xs])
    out = _tvm_run(m, [xs])
    np.testing.assert_array_equal(out[2], ref[2])
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dt,sym", [("i4", True), ("u4", False), ("i8", True)])
def test_weight_only_per_group(dt: str, sym: bool) -> None:
    m = _mlp(None, dt, k=96, axis=1, group_size=32, symmetric=sym)
    xs = _x(96)
    ref = run(m, [xs])
    lowered = build(m, load_target("tvm-llvm"), use_kernels=False).lowered
    if dt != "i8":  # int4 weights stay packed, two codes per byte
        assert lowered.params["w"].dtype == np.uint8 and lowered.params["w"].shape == (48, 48)
    out = _tvm_run(m, [xs])
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_w4a8_groups_integer_path() -> None:
    m = _mlp(QuantSpec.dynamic_spec(axis=2, group_size=96), "i4", k=96, axis=1, group_size=32)
    xs = _x(96)
    ref = run(m, [xs])
    out = _tvm_run(m, [xs])
    np.testing.assert_array_equal(out[2], ref[2])
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-6, atol=1e-6)


def test_qembedding_dequantize_requantize_exact() -> None:
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
    dyn = f.add_op("quantize", [s], result_types=[TensorType.of("i8", [1, "seq", 64], QuantSpec.dynamic_spec())],
                   names=["dyn"]).result
    f.set_outputs([f.add_op("dequantize", [rq], names=["d"]).result, e4,
                   f.add_op("dequantize", [dyn], names=["dd"]).result])
    idv = np.array([[3, 0, 49, 7]], np.int64)
    refs = run(m, [idv])
    for o, r in zip(_tvm_run(m, [idv]), refs):
        np.testing.assert_array_equal(o, r)


def test_attention_gqa_causal_mask_and_inplace_cache_update() -> None:
    """GQA attention with a bool mask and the causal rule, and a KV-cache write that aliases its input."""
    rng = np.random.default_rng(7)
    m = qir.Module("a")
    f = m.add_function("decode")
    q = f.add_input("q", TensorType.of("f32", [1, 4, "s", 8]))
    cache = f.add_input("cache", TensorType.of("f32", [1, 2, 16, 8]))
    pos = f.add_input("pos", TensorType.of("i64", ["s"]))
    new = f.add_input("new", TensorType.of("f32", [1, 2, "s", 8]))
    mask = f.add_input("mask", TensorType.of("bool", [1, 1, "s", 16]))
    kv = f.add_op("index_copy", [cache, pos, new], {"axis": 2}, names=["kv"]).result
    a = f.add_op("attention", [q, kv, kv, mask], names=["a"]).result
    c = f.add_op("attention", [q, new, new], {"causal": True}, names=["c"]).result
    f.set_outputs([a, c, kv])
    feeds = [rng.standard_normal((1, 4, 3, 8)).astype(np.float32), rng.standard_normal((1, 2, 16, 8)).astype(np.float32),
             np.array([5, 6, 7], np.int64), rng.standard_normal((1, 2, 3, 8)).astype(np.float32),
             np.zeros((1, 1, 3, 16), bool)]
    feeds[4][0, 0, 0, :6] = True
    feeds[4][0, 0, 1, 3:7] = True  # row 2 attends nothing: the output is 0, not NaN
    refs = run(m, feeds, function="decode")
    built = build(m, load_target("tvm-llvm"), use_kernels=False)
    assert built.lowered.inplace["decode"] == {2: 1}  # output kv is input cache, updated in place
    outs = built.run(feeds, function="decode")
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)
    assert not np.isnan(outs[0]).any()


def test_unsupported_op_is_refused_by_name() -> None:
    from qir.ops.registry import OpDef, register_op, unregister_op

    m = _mlp(None, "i8", axis=0)
    f = m.function("main")
    register_op(OpDef("frobnicate", ("x",), (), lambda t, a, d: [t[0]], lambda c, a, at, rt: [a[0]], "test", "test"))
    try:
        y = f.add_op("frobnicate", [f.outputs[0]], names=["fz"]).result
        f.set_outputs([y])
        with pytest.raises(CompileError, match=r"cannot lower op frobnicate \(result %fz\)"):
            build(m, load_target("tvm-llvm"))
    finally:
        unregister_op("frobnicate")
