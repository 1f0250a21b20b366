"""The ``merge-siblings`` pass: linears/qmatmuls on one input stacked into one op, results sliced back, exactly."""

from __future__ import annotations

import numpy as np
import pytest

import qir
from qir.graph import Module
from qir.passes import PassFailedError, run_pipeline
from qir.passes.merge_siblings import StackedRows, merged_name, stacked_sources
from qir.quant import QTensor
from qir.types import TensorType

K = 64


def out(m: Module, feed: dict[str, np.ndarray], function: str | None = None) -> list[np.ndarray]:
    return [np.asarray(o.dequantize() if isinstance(o, QTensor) else o) for o in qir.run(m, feed, function=function)]


def attention_like(*, bias: bool = False, tied: bool = False, two_functions: bool = False) -> Module:
    """x -> q (96 rows), k, v (32 rows each) -> outputs; optionally biases, a tied k weight, a second function."""
    rng = np.random.default_rng(0)
    m = Module("siblings")
    ws = {n: m.add_constant(f"layer.{n}_proj.weight", (rng.standard_normal((r, K)) / 8).astype(np.float32))
          for n, r in (("q", 96), ("k", 32), ("v", 32))}
    bs = {n: m.add_constant(f"layer.{n}_proj.bias", rng.standard_normal(int(w.type.shape[0])).astype(np.float32))
          for n, w in ws.items()} if bias else {}
    for fname in ("prefill", "decode") if two_functions else ("main",):
        f = m.add_function(fname)
        x = f.add_input("x", TensorType.of("f32", [1, "seq" if fname != "decode" else 1, K]))
        ys = [f.add_op("linear", [x, ws[n], *([bs[n]] if bias else [])], names=[n]).result for n in ws]
        if tied:  # the k weight also read as an embedding table: stacking it would store it twice
            ids = f.add_input("ids", TensorType.of("i64", [1, 1]))
            ys.append(f.add_op("embedding", [ws["k"], ids], names=["e"]).result)
        f.set_outputs(ys)
    qir.verify(m)
    return m


def feed(function: str = "main", seq: int = 5) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((1, 1 if function == "decode" else seq, K)).astype(np.float32)
    return {"x": x}


def opcodes(m: Module, function: str = "main") -> list[str]:
    return [op.opcode for op in m.function(function).ops]


@pytest.mark.parametrize("pipeline", [
    "quantize{scheme=w8a16}", "quantize{scheme=w8a8}", "quantize{scheme=w4a16,group=32,zero=float}",
    "quantize{scheme=w4a16,group=32,zero=float},compress-scales", "quantize{scheme=w4a8,group=32,zero=float}",
    "quantize{scheme=w4a8,group=32,zero=float},compress-scales", "quantize{scheme=w4a16,group=32}",
])
def test_quantized_siblings_merge_into_one_qmatmul_with_the_same_results(pipeline: str) -> None:
    src = run_pipeline(attention_like(), pipeline)
    merged = run_pipeline(src, "merge-siblings{single_token=false}", verify_each=True)
    assert opcodes(merged).count("qmatmul") == 1 and opcodes(merged).count("slice") == 3
    assert [v.name for v in merged.function().outputs] == ["q", "k", "v"]  # the old values keep their names
    w = merged.constant("layer.q_proj_k_proj_v_proj.weight")
    assert w.type.shape == (160, K) and w.type.quant is not None
    assert not any(n.startswith(("layer.q_proj.", "layer.k_proj.", "layer.v_proj.")) for n in merged.constants)
    # every parameter constant of the stacked weight is stacked too, and only those remain
    refs = merged.spec_references()
    assert all(refs.get(n) for n in merged.constants if n != w.name)
    for a, b in zip(out(merged, feed()), out(src, feed())):
        np.testing.assert_array_equal(a, b)  # each output row depends only on its own weight row: exact


def test_float_linears_with_biases_merge() -> None:
    src = attention_like(bias=True)
    merged = run_pipeline(src, "merge-siblings{single_token=false}", verify_each=True)
    assert opcodes(merged) == ["linear", "slice", "slice", "slice"]
    assert merged.constant("layer.q_proj_k_proj_v_proj.bias").type.shape == (160,)
    for a, b in zip(out(merged, feed()), out(src, feed())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_prefill_and_decode_share_one_stacked_weight() -> None:
    src = run_pipeline(attention_like(two_functions=True), "quantize{scheme=w4a8,group=32,zero=float},compress-scales")
    merged = run_pipeline(src, "merge-siblings{single_token=false}", verify_each=True)
    for fname in ("prefill", "decode"):
        (op,) = [o for o in merged.function(fname).ops if o.opcode == "qmatmul"]
        assert op.operands[1].name == "layer.q_proj_k_proj_v_proj.weight"
        for a, b in zip(out(merged, feed(fname), fname), out(src, feed(fname), fname)):
            np.testing.assert_array_equal(a, b)
    assert sum(1 for n in merged.constants if n.endswith(".weight")) == 1


def test_by_default_only_siblings_that_run_on_one_token_merge() -> None:
    # many rows only (an encoder, a prefill alone): each projection is a GEMM already, nothing to gain
    assert opcodes(run_pipeline(attention_like(), "merge-siblings")).count("linear") == 3
    # a decode function runs them on one token: merged, and prefill shares the stacked weight
    both = run_pipeline(attention_like(two_functions=True), "merge-siblings")
    assert opcodes(both, "decode").count("linear") == 1 and opcodes(both, "prefill").count("linear") == 1


def test_what_cannot_be_stacked_keeps_its_own_op() -> None:
    # a weight that an embedding also reads: q and v still merge, k stays alone
    tied = run_pipeline(attention_like(tied=True), "merge-siblings{single_token=false}")
    assert opcodes(tied).count("linear") == 2
    assert "layer.k_proj.weight" in tied.constants and "layer.q_proj_v_proj.weight" in tied.constants
    # different weight dtypes (a mixed-precision choice) never share an op
    mixed = run_pipeline(attention_like(), 'quantize{scheme=w8a16,overrides="layer.k_proj.weight=w4a16"}')
    merged = run_pipeline(mixed, "merge-siblings{single_token=false}")
    assert opcodes(merged).count("qmatmul") == 2
    for a, b in zip(out(merged, feed()), out(mixed, feed())):
        np.testing.assert_array_equal(a, b)


def test_per_tensor_weights_merge_only_with_equal_scales() -> None:
    m = Module("pt")
    rng = np.random.default_rng(0)
    for name, scale in (("a", 0.5), ("b", 0.5), ("c", 0.25)):
        m.add_constant(name, rng.integers(-8, 8, (4, K)).astype(np.int8),
                       type=TensorType.of("i8", [4, K], qir.QuantSpec.per_tensor(scale)))
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, 3, K]))
    f.set_outputs([f.add_op("qmatmul", [x, m.constant(n)], names=[n + "y"]).result for n in "abc"])
    merged = run_pipeline(m, "merge-siblings{single_token=false}", verify_each=True)
    assert [op.operands[1].name for op in merged.function().ops if op.opcode == "qmatmul"] == ["a_b", "c"]
    x = {"x": rng.standard_normal((1, 3, K)).astype(np.float32)}
    for u, v in zip(out(merged, x), out(m, x)):
        np.testing.assert_array_equal(u, v)


def test_min_count_and_bad_option() -> None:
    src = attention_like()
    assert opcodes(run_pipeline(src, "merge-siblings{min_count=4,single_token=false}")).count("linear") == 3
    with pytest.raises(PassFailedError, match="min_count must be at least 2"):
        run_pipeline(src, "merge-siblings{min_count=1,single_token=false}")


def test_merged_name() -> None:
    assert merged_name(["m.l0.q_proj.weight", "m.l0.k_proj.weight"]) == "m.l0.q_proj_k_proj.weight"
    assert merged_name(["a", "b"]) == "a_b"
    assert merged_name(["w.x.1", "w.y.1", "w.z.2"]) == "w.x.1_y.1_z.2"


def test_stacked_sources_finds_each_float_weight_in_its_stack() -> None:
    float_module = attention_like(two_functions=True)
    merged = run_pipeline(float_module, "quantize{scheme=w8a16},merge-siblings{single_token=false}")
    rows = stacked_sources(float_module, merged)
    stack = "layer.q_proj_k_proj_v_proj.weight"
    assert rows == {"layer.q_proj.weight": StackedRows(stack, 0, 96),
                    "layer.k_proj.weight": StackedRows(stack, 96, 128),
                    "layer.v_proj.weight": StackedRows(stack, 128, 160)}
    assert stacked_sources(float_module, run_pipeline(float_module, "quantize{scheme=w8a16}")) == {}
