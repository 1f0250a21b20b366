"""The ``mixed-precision`` pass: golden, candidates, allocation under the budget, sizes, meaning, composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quantize import feeds, rel_err, run_out, tiny_lm

import qir
from qir.errors import QirError
from qir.passes import PassContext, PassFailedError, PassManager, run_pipeline
from qir.passes.mixed_precision import Candidate, allocate, parse_candidates
from qir.printer import print_module

GOLDEN = Path(__file__).parent / "golden" / "passes"


def golden_ctx() -> PassContext:
    return PassContext(calibration=[{"x": np.random.default_rng(0).standard_normal((1, 6, 8)).astype(np.float32)}])


def run_mp(pipeline: str, module: qir.Module | None = None, ctx: PassContext | None = None):  # type: ignore[no-untyped-def]
    pm = PassManager(pipeline, context=ctx or PassContext(calibration=feeds()))
    out = pm.run(module if module is not None else tiny_lm())
    return out, pm.passes[0]


def test_golden() -> None:
    src = qir.parse((GOLDEN / "mixed_precision.input.qir").read_text())
    out = run_pipeline(src, 'mixed-precision{budget=14,candidates="8,4g4,2g4"}', context=golden_ctx())
    assert print_module(out) == (GOLDEN / "mixed_precision.b14.expected.qir").read_text()


def test_parse_candidates() -> None:
    assert parse_candidates("8, 4,4g32,2g32") == [Candidate(8, None), Candidate(4, None), Candidate(4, 32),
                                                  Candidate(2, 32)]
    assert str(Candidate(4, 32)) == "4g32" and str(Candidate(8, None)) == "8"
    assert parse_candidates("4g32m,4g32") == [Candidate(4, 32, True), Candidate(4, 32)]
    assert str(Candidate(4, 32, True)) == "4g32m"
    for bad in ("3", "4g0", "x", "", "4m", "4g32mm"):
        with pytest.raises(QirError, match="candidate"):
            parse_candidates(bad)


def test_allocate_greedy() -> None:
    # a: big drop for few bytes; b: small drop for many bytes
    lo, hi = Candidate(4, None), Candidate(8, None)
    opts = {"a": {lo: (10, 5.0), hi: (20, 1.0)}, "b": {lo: (100, 2.0), hi: (200, 1.9)}}
    assert allocate(opts, 110) == {"a": lo, "b": lo}
    assert allocate(opts, 120) == {"a": hi, "b": lo}
    assert allocate(opts, 1000) == {"a": hi, "b": hi}
    with pytest.raises(QirError, match="below the smallest assignment"):
        allocate(opts, 100)


def test_sizes_match_stored_bytes_and_budget() -> None:
    src = tiny_lm()
    for budget in (4.5, 6, 9):
        out, mp = run_mp(f'mixed-precision{{budget={budget},candidates="8,4,4g16,2g16"}}', src)
        qir.verify(out)
        nbytes = sum(a.nbytes for a in mp.assignment)
        params = sum(a.params for a in mp.assignment)
        assert 8 * nbytes / params <= budget
        # every tensor was assigned (7 linears + the tied table); bytes are what qir.stored_bytes counts
        assert len(mp.assignment) == 8
        quantized = sum(c.type.nbytes() for c in out.constants.values() if c.name != "norm")
        assert quantized == nbytes
        assert "total: 8 tensors" in mp.table()


def test_more_budget_less_error() -> None:
    src = tiny_lm()
    feed = feeds(1, seed=5)[0]
    ref = run_out(src, feed)
    errs, sens = [], []
    for budget in (4.2, 5, 6, 9):
        out, mp = run_mp(f'mixed-precision{{budget={budget},candidates="8,4,4g16,2g16"}}', src)
        errs.append(rel_err(run_out(out, feed), ref))
        sens.append(sum(a.sensitivity for a in mp.assignment))
    assert sens == sorted(sens, reverse=True) and sens[0] > sens[-1]
    assert errs[0] > errs[-1] and errs[-1] < 0.02


@settings(max_examples=6, deadline=None)
@given(budget=st.floats(4.6, 12.0), seed=st.integers(0, 3), symmetric=st.booleans())
def test_property_valid_and_rounding_bound(budget: float, seed: int, symmetric: bool) -> None:
    """Valid module; each weight is within half a step of its float value (RTN) in the format chosen."""
    src = tiny_lm(seed)
    sym = str(symmetric).lower()
    out, mp = run_mp(f'mixed-precision{{budget={budget},candidates="8,4,4g16,2g16",symmetric={sym}}}', src)
    qir.verify(out)
    for a in mp.assignment:
        w = src.constant(a.weight).numpy()
        c = out.constant(a.weight)
        assert c.type.dtype.bits == a.fmt.bits and (c.type.quant.group_size == a.fmt.group)
        scale = out.constant(c.type.quant.scale).numpy()
        zp = None if symmetric else out.constant(c.type.quant.zero_point).numpy().astype(np.float32)
        codes = c.numpy().astype(np.float32)
        if a.fmt.group is None:
            s = scale[:, None]
            z = 0 if zp is None else zp[:, None]
        else:
            s = np.repeat(scale, a.fmt.group, axis=1)[:, : w.shape[1]]
            z = 0 if zp is None else np.repeat(zp, a.fmt.group, axis=1)[:, : w.shape[1]]
        assert np.all(np.abs(s * (codes - z) - w) <= s / 2 + 1e-6)


def test_composes_with_quantize_and_dce() -> None:
    """``tables=false`` leaves the tied table to ``quantize``; already quantized weights are not touched again."""
    out, mp = run_mp('mixed-precision{budget=7,candidates="8,4g16",tables=false},quantize{scheme=w8a16},dce')
    qir.verify(out)
    assert {a.weight for a in mp.assignment} == {n for n in tiny_lm().constants if n.startswith("layer.")}
    assert str(out.constant("embed").type).startswith("i8[40,48] q(axis=0")  # quantize's default i8 table
    for a in mp.assignment:
        assert out.constant(a.weight).type.dtype.bits == a.fmt.bits
    assert "linear" not in print_module(out)


def test_decode_uses_prefill_moments() -> None:
    src = tiny_lm(two_functions=True)
    out, mp = run_mp('mixed-precision{budget=6,candidates="8,4,4g16"}', src, PassContext(calibration=feeds(),
                                                                                       function="prefill"))
    qir.verify(out)
    text = print_module(out)
    assert "linear" not in text and text.count("qembedding") == 2
    feed = feeds(1, seed=3)[0]
    assert rel_err(run_out(out, feed, "prefill"), run_out(src, feed, "prefill")) < 0.2


def test_errors() -> None:
    with pytest.raises(PassFailedError, match="calibration data"):
        run_pipeline(tiny_lm(), "mixed-precision")
    with pytest.raises(PassFailedError, match=r"below the smallest assignment .* bits/param"):
        run_mp('mixed-precision{budget=2,candidates="8,4"}')
    with pytest.raises(PassFailedError, match="candidate '5'"):
        run_mp('mixed-precision{candidates="8,5"}')


# -- rounding=gptq, clip=mse (issue #6's MiniLM size goal) ----------------------------------------------------------
def test_gptq_rounding_lowers_sensitivity_and_output_error() -> None:
    """GPTQ inside the assignment: the stored codes are the ones measured (not a second, different rounding), and
    they are not simply nearest rounding."""
    src = tiny_lm(2)
    feed = feeds(1, seed=7)[0]
    ref = run_out(src, feed)
    pipe = 'mixed-precision{{budget=5.2,candidates="8,4",symmetric=false,windows=3{}}}'
    out_rtn, _ = run_mp(pipe.format(""), src)
    out_gptq, mp = run_mp(pipe.format(",rounding=gptq"), src)
    qir.verify(out_gptq)
    linears = [a for a in mp.assignment if a.weight.startswith("layer.")]
    assert sum(a.fmt == Candidate(4, None) for a in linears) >= 3
    for a in linears:
        w = src.constant(a.weight).numpy()
        # the codes written are the GPTQ codes measure() produced (no second, different rounding)
        cached = mp._qcache[(a.weight, a.fmt)][1]
        assert np.array_equal(out_gptq.constant(a.weight).numpy(), cached.codes)
        # GPTQ moves codes away from nearest rounding: some codes differ from RTN's
        rtn = out_rtn.constant(a.weight).numpy() if a.fmt == Candidate(4, None) else None
        if rtn is not None:
            assert np.mean(rtn != cached.codes) > 0.01
        assert cached.dequantize().shape == w.shape
    assert rel_err(run_out(out_gptq, feed), ref) < 0.3


def test_gptq_sensitivity_is_the_output_error() -> None:
    """The sensitivity of a GPTQ-rounded linear is E|dW x|^2 per token on the calibration inputs (measured here by
    running the layer's input through both weights), and below nearest rounding's on the same inputs."""
    src = tiny_lm(3)
    ctx = PassContext(calibration=feeds())
    _, mp = run_mp('mixed-precision{budget=4.65,candidates="8,4",windows=3,rounding=gptq}', src, ctx)
    name = "layer.gate_proj.weight"
    w = src.constant(name).numpy().astype(np.float64)
    a = next(a for a in mp.assignment if a.weight == name)
    dw = mp._qcache[(name, a.fmt)][1].dequantize().astype(np.float64) - w
    xs = []
    (op,) = [op for op, _ in src.constant(name).uses]
    x_name = op.operands[0].name

    def observe(value: object, data: object) -> None:
        if getattr(value, "name", None) == x_name:
            xs.append(np.asarray(data, np.float64).reshape(-1, w.shape[1]))

    from qir.interpreter import Interpreter

    for feed in ctx.calibration:
        Interpreter(src).run(feed, observer=observe)
    x = np.concatenate(xs)
    want = float(np.mean(np.square(x @ dw.T).sum(axis=1)))
    assert a.sensitivity == pytest.approx(want, rel=1e-6)
    from qir.passes.gptq import rtn_quantize

    codes, scale, _ = rtn_quantize(w.astype(np.float32), f"i{a.fmt.bits}", group=a.fmt.group, symmetric=True)
    assert a.fmt.group is None
    dw_rtn = codes.astype(np.float64) * scale[:, None] - w
    assert want < 0.9 * float(np.mean(np.square(x @ dw_rtn.T).sum(axis=1)))


def test_clip_mse_lowers_table_error() -> None:
    """clip=mse: every tensor's weight error is at most min/max rounding's, and below it in total."""
    src = tiny_lm(4)
    errs = {}
    for clip in ("minmax", "mse"):
        out, mp = run_mp(f'mixed-precision{{budget=4.65,candidates="8,4",clip={clip}}}', src)
        errs[clip] = {}
        for a in mp.assignment:
            deq = mp._qcache[(a.weight, a.fmt)][1].dequantize()
            errs[clip][(a.weight, a.fmt)] = float(np.square(deq - src.constant(a.weight).numpy()).sum())
    common = set(errs["minmax"]) & set(errs["mse"])
    assert common
    assert all(errs["mse"][k] <= errs["minmax"][k] * (1 + 1e-6) for k in common)
    assert sum(errs["mse"][k] for k in common) < 0.97 * sum(errs["minmax"][k] for k in common)


def test_rounding_and_clip_options_checked() -> None:
    from qir.passes.pipeline import PipelineError

    with pytest.raises(PipelineError, match="'max' is not one of minmax, mse"):
        run_mp('mixed-precision{clip=max}')
    from qir.passes.mixed_precision import MixedPrecision

    mp = MixedPrecision(rounding="nearest")  # type: ignore[arg-type]  # Python callers bypass the pipeline parser
    mp.context = PassContext(calibration=feeds())
    with pytest.raises(QirError, match="rounding must be rtn or gptq"):
        mp.run(tiny_lm())


def test_output_sensitivity_is_the_function_output_error() -> None:
    """sensitivity=output: each option's sensitivity is the model output's MSE with only that tensor quantized (as
    stored), so the tied table's entry includes both the lookup and the head; the data of the module is restored."""
    src = tiny_lm(5)
    ctx = PassContext(calibration=feeds(2))
    before = {n: c.numpy().copy() for n, c in src.constants.items()}
    pipe = 'mixed-precision{budget=6,candidates="8,4",windows=2,sensitivity=output,probe=2}'
    out, mp = run_mp(pipe, src.clone(), ctx)
    qir.verify(out)
    for name in ("layer.down_proj.weight", "embed"):
        a = next(a for a in mp.assignment if a.weight == name)
        for cand, (_nbytes, sens) in a.options.items():
            probe = src.clone()
            probe.constant(name).data = mp._qcache[(name, cand)][1].dequantize()
            want = np.mean([np.mean(np.square(run_out(probe, f).astype(np.float64) - run_out(src, f)))
                            for f in ctx.calibration])
            assert sens == pytest.approx(want, rel=1e-5)
    assert all(np.array_equal(src.constant(n).numpy(), v) for n, v in before.items())
    # 4-bit costs more output error than 8-bit for every tensor
    assert all(a.options[Candidate(4, None)][1] > a.options[Candidate(8, None)][1] for a in mp.assignment)


def test_gptq_clip_mse_refuses_minimum_and_bad_names() -> None:
    from qir.passes.gptq import gptq_quantize, rtn_quantize

    w = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    with pytest.raises(QirError, match="does not combine with minimum"):
        rtn_quantize(w, "u4", group=8, symmetric=False, minimum=True, clip="mse")
    with pytest.raises(QirError, match="clip must be 'minmax' or 'mse'"):
        gptq_quantize(w, np.eye(16), "i4", group=None, symmetric=True, clip="percentile")


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_minimum_candidates_and_compressed_scales_are_counted_as_stored(rounding: str) -> None:
    """``4g16m`` stores a float minimum per group; ``scales=u8`` compresses block parameters and counts them so:
    the assignment's bytes are the stored bytes and its sensitivities are those of the stored (compressed) values."""
    src = tiny_lm()
    pipe = (f'mixed-precision{{budget=7,candidates="8,4g16m,4g16",symmetric=false,scales=u8,rounding={rounding},'
            'sensitivity=output}')
    out, mp = run_mp(pipe, src)
    qir.verify(out)
    fmts = {str(a.fmt) for a in mp.assignment}
    assert "4g16m" in fmts, mp.table()
    quantized = sum(c.type.nbytes() for c in out.constants.values() if c.name != "norm")
    assert quantized == sum(a.nbytes for a in mp.assignment)
    grouped = [a for a in mp.assignment if a.fmt.group is not None]
    for a in grouped:
        spec = out.constant(a.weight).type.quant
        assert spec is not None and isinstance(spec.scale, str)
        assert out.constant(spec.scale).type.quant is not None  # two-level: compressed in place
        assert (spec.offset is not None) == a.fmt.minimum
    # u8 block parameters make a grouped format cheaper than f32 ones, by the stated amount
    c = Candidate(4, 16, True)
    assert c.nbytes(32, 64, False, "u8") == 32 * 64 // 2 + 32 * 4 * 2 + 32 * 2 * 4
    assert c.nbytes(32, 64, False, "f32") == 32 * 64 // 2 + 32 * 4 * 2 * 4
    # the output sensitivity was measured on what is stored: swapping in the stored weights reproduces it
    from qir.interpreter import RunContext
    from qir.passes.calibrate import calibration_function
    from qir.passes.mixed_precision import _OutputProbe

    ctx = RunContext(out)
    func = calibration_function(src)
    probe = _OutputProbe(src, src.function(func.name), feeds()[:1])
    for a in grouped[:3]:
        stored = np.asarray(ctx.constant(a.weight).dequantize())
        assert probe.error(src.constant(a.weight), stored) == pytest.approx(a.sensitivity, rel=1e-6)
