"""Random graphs of real ops print, parse back to the same text, verify, and run the same (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qir
from qir import quant
from qir.graph import Module, Value
from qir.quantspec import QuantSpec
from qir.types import TensorType

UNARY = ("neg", "abs", "exp", "tanh", "erf", "gelu", "silu", "relu", "sigmoid", "sin", "cos")
BINARY = ("add", "sub", "mul", "maximum", "minimum")


@st.composite
def graphs(draw: st.DrawFn) -> tuple[Module, int, int]:
    """A module with a symbolic ``seq``: a random chain of unary/binary/linear/quantized/shape ops."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    hidden = draw(st.sampled_from([4, 8, 12, 16]))
    m = Module("random")
    f = m.add_function("main")
    x = f.add_input("x", TensorType.of("f32", [1, "seq", hidden]))
    live: list[Value] = [x]
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "linear", "qmatmul", "w8a8", "norm", "softmax", "reshape"]))
        a = live[draw(st.integers(0, len(live) - 1))]
        width = a.type.shape[-1]
        name = f"v{i}"
        if kind == "unary":
            v = f.add_op(draw(st.sampled_from(UNARY)), [a], names=[name]).result
        elif kind == "binary":
            same = [v for v in live if v.type == a.type]
            b = same[draw(st.integers(0, len(same) - 1))]
            v = f.add_op(draw(st.sampled_from(BINARY)), [a, b], names=[name]).result
        elif kind in ("linear", "qmatmul", "w8a8"):
            out = draw(st.sampled_from([4, 8, 16]))
            w = (rng.standard_normal((out, width)) / np.sqrt(width)).astype(np.float32)
            if kind == "linear":
                v = f.add_op("linear", [a, m.add_constant(f"w{i}", w)], names=[name]).result
            else:
                bits = draw(st.sampled_from(["i8", "i4", "u4"])) if kind == "qmatmul" else "i8"
                group = draw(st.sampled_from([None, 4])) if kind == "qmatmul" else None
                sym = bits != "u4"
                spec, s, z = quant.choose_params(w, bits, symmetric=sym, axis=1 if group else 0, group_size=group,
                                                 scale_name=f"w{i}.scale", zero_point_name=f"w{i}.zp")
                m.add_constant(f"w{i}.scale", s)
                if z is not None:
                    m.add_constant(f"w{i}.zp", z.astype(np.dtype(qir.dtype(bits).numpy)))
                codes = quant.quantize_spec(w, spec, bits, s, z).codes
                wq = m.add_constant(f"w{i}", codes, type=TensorType.of(bits, codes.shape, spec))
                if kind == "w8a8":
                    t = TensorType.of("i8", a.type.shape, QuantSpec.dynamic_spec(axis=2, group_size=width))
                    a = f.add_op("quantize", [a], result_types=[t], names=[name + ".q"]).result
                v = f.add_op("qmatmul", [a, wq], names=[name]).result
        elif kind == "norm":
            g = m.add_constant(f"g{i}", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))
            v = f.add_op(draw(st.sampled_from(["rms_norm", "layer_norm"])), [a, g], names=[name]).result
        elif kind == "softmax":
            v = f.add_op("softmax", [a], names=[name]).result
        else:
            if width % 4:
                continue
            r = f.add_op("reshape", [a], {"shape": [1, "seq", 4, width // 4]}, names=[name + ".r"]).result
            t = f.add_op("transpose", [r], {"perm": [0, 2, 1, 3]}, names=[name + ".t"]).result
            t = f.add_op("transpose", [t], {"perm": [0, 2, 1, 3]}, names=[name + ".u"]).result
            v = f.add_op("reshape", [t], {"shape": [1, "seq", width]}, names=[name]).result
        live.append(v)
    f.set_outputs([live[-1]])
    return m, hidden, draw(st.integers(1, 6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_print_parse_verify_and_run_the_same(case: tuple[Module, int, int]) -> None:
    m, hidden, seq = case
    qir.verify(m)
    text = qir.print_module(m)
    blobs = {name: c.numpy() for name, c in m.constants.items()}
    back = qir.parse(text, blobs=blobs)
    assert qir.print_module(back) == text
    qir.verify(back)
    x = np.random.default_rng(seq).standard_normal((1, seq, hidden)).astype(np.float32)
    (a,) = qir.run(m, [x])
    (b,) = qir.run(back, [x])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
