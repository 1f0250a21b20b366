"""Pass infrastructure: registry, pipeline strings, pass manager, instruments, rewrites, clean-up passes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import qir
from qir.errors import QirError
from qir.graph import Module
from qir.parser import parse
from qir.passes import (
    PASSES,
    DumpDir,
    Pass,
    PassFailedError,
    PassManager,
    PipelineError,
    PrintAfter,
    PrintAfterAll,
    PrintChanged,
    RewriteDidNotConvergeError,
    RewritePattern,
    Timing,
    apply_patterns,
    format_pipeline,
    function_pass,
    load_pass_file,
    parse_pipeline,
    register_pass,
    run_pipeline,
    unregister_pass,
)
from qir.printer import print_module

GOLDEN = Path(__file__).parent / "golden" / "passes"


def outputs(m: Module, seq: int = 6) -> list[np.ndarray]:
    ids = np.arange(seq, dtype=np.int64).reshape(1, seq) % 32
    return [np.asarray(o.dequantize() if hasattr(o, "dequantize") else o) for o in qir.run(m, [ids])]


# -- pipeline strings -----------------------------------------------------------------------------------------
def test_pipeline_round_trip_and_typed_options() -> None:
    passes = parse_pipeline("dce{constants=false}, cse ,fold-constants{max_elements=10},fold-qdq")
    assert [p.name for p in passes] == ["dce", "cse", "fold-constants", "fold-qdq"]
    assert passes[0].constants is False and passes[2].max_elements == 10
    assert format_pipeline(passes) == "dce{constants=false},cse,fold-constants{max_elements=10},fold-qdq"
    assert parse_pipeline("  ") == []


@pytest.mark.parametrize("text, expected", [
    ("dcee", "unknown pass 'dcee' (did you mean dce?)"),
    ("dce{foo=1}", "pass 'dce' has no option 'foo'; its options: constants: bool = True"),
    ("fold-constants{max_elements=lots}", "'lots' is not a int"),
    ("dce{constants}", "must be key=value"),
    ("dce{constants=true", "missing '}'"),
    ("dce,,cse", "empty pass name"),
])
def test_bad_pipelines_are_rejected_before_running(text: str, expected: str) -> None:
    with pytest.raises(QirError) as info:
        parse_pipeline(text)
    assert isinstance(info.value, PipelineError) or "unknown pass" in str(info.value)
    assert expected in str(info.value)


# -- user passes ----------------------------------------------------------------------------------------------
def test_custom_pass_class_in_a_few_lines(block_module: Module) -> None:
    @register_pass
    @dataclass
    class RenameOutputs(Pass):
        """Prefix every function output's name."""

        name = "test-rename-outputs"
        prefix: str = "out"

        def run(self, module: Module) -> None:
            for f in module.functions.values():
                for i, v in enumerate(f.outputs):
                    f.rename(v, f"{self.prefix}{i}")

    try:
        out = run_pipeline(block_module, "test-rename-outputs{prefix=y},dce")
        assert out.main.outputs[0].name == "y0"
        assert block_module.main.outputs[0].name == "out"  # the input is untouched
    finally:
        unregister_pass("test-rename-outputs")


def test_custom_function_pass(block_module: Module) -> None:
    @function_pass("test-scale-norm")
    def scale_norm(module: Module, *, factor: float = 2.0) -> None:
        """Multiply the RMSNorm weight by ``factor``."""
        c = module.constants["norm"]
        c.data = c.numpy() * np.float32(factor)

    try:
        pm = PassManager("test-scale-norm{factor=1.0}")
        pm.run(block_module)
        # Same values but new data: change detection compares data identity as well as text.
        assert pm.records[0].changed
        assert PASSES["test-scale-norm"].summary() == "Multiply the RMSNorm weight by ``factor``."
    finally:
        unregister_pass("test-scale-norm")


def test_load_pass_file(tmp_path: Path, block_module: Module) -> None:
    src = tmp_path / "mypasses.py"
    src.write_text(
        "from qir.passes import function_pass\n\n"
        "@function_pass('test-count-ops')\n"
        "def count(module, *, limit: int = 1000):\n"
        "    '''Fail when a function has more than limit ops.'''\n"
        "    for f in module.functions.values():\n"
        "        assert len(f.ops) <= limit, f'{len(f.ops)} ops'\n")
    try:
        assert load_pass_file(src) == ["test-count-ops"]
        run_pipeline(block_module, "test-count-ops")
        with pytest.raises(PassFailedError, match="test-count-ops{limit=3} crashed: AssertionError"):
            run_pipeline(block_module, "cse,test-count-ops{limit=3}")
    finally:
        unregister_pass("test-count-ops")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(QirError, match="registered no pass"):
        load_pass_file(empty)
    with pytest.raises(QirError, match="no such file"):
        load_pass_file(tmp_path / "missing.py")


# -- the manager ------------------------------------------------------------------------------------------------
def test_failing_pass_leaves_input_untouched_and_names_pipeline(block_module: Module) -> None:
    @function_pass("test-break")
    def breaker(module: Module) -> None:
        """Erase an op whose result is still used (then the core refuses), after editing something."""
        f = module.main
        f.rename(f.inputs[0], "changed")
        f.erase_op(f.ops[0])

    before = print_module(block_module)
    try:
        with pytest.raises(PassFailedError) as info:
            run_pipeline(block_module, "cse,test-break")
        assert info.value.pass_name == "test-break"
        assert info.value.pipeline_so_far == "cse,test-break"
        assert "still used" in str(info.value)
    finally:
        unregister_pass("test-break")
    assert print_module(block_module) == before


def test_verify_each_catches_a_pass_that_breaks_types(block_module: Module) -> None:
    @function_pass("test-bad-type")
    def bad(module: Module) -> None:
        """Change a result type behind the op's back."""
        op = module.main.find_ops("add")[0]
        op.result.type = op.result.type.with_dtype("f16")

    try:
        with pytest.raises(PassFailedError, match="left an invalid module") as info:
            run_pipeline(block_module, "test-bad-type")
        assert "result-type" in str(info.value) or "type-check" in str(info.value)
        run_pipeline(block_module, "test-bad-type", verify_each=False)  # off: no check
    finally:
        unregister_pass("test-bad-type")


def test_instruments(block_module: Module, tmp_path: Path) -> None:
    out = io.StringIO()
    block_module.main.add_op("exp", [block_module.main.value("x")], names=["unused"])
    pm = PassManager("cse,dce", instruments=[PrintAfterAll(out=out), PrintAfter(("dce",), out=out),
                                             PrintChanged(out=out), DumpDir(tmp_path / "dump"), Timing(out=out)])
    result = pm.run(block_module)
    text = out.getvalue()
    assert "// -----// IR after cse (unchanged)" in text
    assert "// -----// IR after dce (changed)" in text
    assert "// -----// dce changed the IR" in text and "-  %unused = exp %x : f32[1,seq,64]" in text
    assert "cse changed" not in text
    assert "// pass timing" in text and "total" in text
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00-input.qir", "01-cse.qir", "02-dce.qir"]
    assert (tmp_path / "dump" / "02-dce.qir").read_text() == print_module(result)
    assert [r.changed for r in pm.records] == [False, True]


# -- rewrites and clean-up passes -------------------------------------------------------------------------------
def test_cleanup_golden() -> None:
    src = parse((GOLDEN / "cleanup.input.qir").read_text())
    out = run_pipeline(src, "fold-constants,cse,fold-qdq,dce")
    assert print_module(out) == (GOLDEN / "cleanup.expected.qir").read_text()
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    q = qir.quant.QTensor(np.arange(-4, 4, dtype=np.int8).reshape(2, 4), np.float32(0.5), np.int32(3),
                          src.main.inputs[1].type.quant)
    for a, b in zip(qir.run(src, [x, q]), qir.run(out, [x, q])):
        a = a.codes if hasattr(a, "codes") else a
        b = b.codes if hasattr(b, "codes") else b
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pipeline", ["dce", "cse", "fold-constants", "fold-qdq", "cse,fold-qdq,dce"])
def test_cleanup_passes_keep_the_block_valid_and_its_meaning(block_module: Module, pipeline: str) -> None:
    out = run_pipeline(block_module, pipeline)
    qir.verify(out)
    for a, b in zip(outputs(block_module), outputs(out)):
        np.testing.assert_array_equal(a, b)


def test_rewrite_that_never_settles_raises() -> None:
    m = parse("module @m\n\nfunc @main(%x: f32[2]) -> (f32[2]) {\n  %y = neg %x : f32[2]\n  return %y\n}\n")

    class Flip(RewritePattern):
        opcode = "neg"

        def match_and_rewrite(self, op, rewriter) -> bool:  # type: ignore[no-untyped-def]
            new = rewriter.create("neg", [op.operands[0]], before=op)
            rewriter.replace_op(op, [new.result])
            return True

    with pytest.raises(RewriteDidNotConvergeError, match="still firing: Flip"):
        apply_patterns(m, [Flip()], max_sweeps=5)
