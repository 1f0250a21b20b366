"""Coverage-guided fuzzing of the ``.qir`` parser and verifier with atheris (run by hand, not by pytest).

The oracle (:func:`check_input`) is the contract of the text format: any byte string either parses and
verifies, or fails with a :class:`~qir.errors.ParseError` that carries ``file:line:col`` (and is not the
parser's "internal parser error" wrapper around a bug) or a :class:`~qir.errors.VerifyError` that names a rule
and where it broke. A text that parses must print to canonical text that parses back to the same text.
Anything else is a crash: atheris stops and writes the input to ``crash-<sha1>``; copy it to
``tests/fuzz/regressions/`` (``tests/test_fuzz.py`` replays every file there).

    pip install atheris                      # into the venv that has qir installed
    python tests/fuzz/fuzz_parser.py -atheris_runs=200000 tests/fuzz/corpus   # seeds: tests/golden/*.qir
    python tests/fuzz/fuzz_parser.py -max_total_time=600 -jobs=1 tests/fuzz/corpus

The corpus folder is a working folder that atheris grows; it is seeded from the golden files on start.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# test_ops.qir uses the test.* ops that only tests/test_printer_parser.py registers.
SEEDS = sorted(p for p in (ROOT / "tests" / "golden").rglob("*.qir") if p.name != "test_ops.qir")
FILENAME = "fuzz.qir"


class OracleFailure(AssertionError):
    """The parser or verifier broke its contract on an input (the message says how)."""


def check_input(data: bytes) -> str:
    """Run one input through parse, verify and print; return ``"ok"``, ``"parse-error"`` or ``"verify-error"``.

    Raises :class:`OracleFailure` (or lets an unexpected exception escape) when the contract is broken.
    """
    from qir.errors import ParseError, VerifyError
    from qir.parser import parse
    from qir.printer import print_module
    from qir.verifier import verify

    try:
        module = parse(data, filename=FILENAME)
    except ParseError as exc:
        if "internal parser error" in exc.reason:
            raise OracleFailure(f"parser bug: {exc}") from exc
        if exc.file != FILENAME or exc.line < 1 or exc.col < 1:
            raise OracleFailure(f"ParseError without a location: {exc!r}") from exc
        return "parse-error"
    try:
        verify(module)
    except VerifyError as exc:
        if not exc.rule or not (exc.op_text or "@" in exc.reason or "%" in exc.reason):
            raise OracleFailure(f"VerifyError that names no op, constant or value: {exc}") from exc
        return "verify-error"
    text = print_module(module)
    again = print_module(parse(text, filename=FILENAME))
    if again != text:
        raise OracleFailure("printed text does not parse back to itself")
    return "ok"


def _one_input(data: bytes) -> None:
    try:
        check_input(data)
    except RecursionError:  # a crash too, but give atheris a clear name for it
        raise OracleFailure("RecursionError") from None


def main() -> None:
    import atheris

    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for folder in corpus:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for seed in SEEDS:
            target = Path(folder) / f"seed-{seed.parent.name}-{seed.name}"
            if not target.exists():
                shutil.copyfile(seed, target)
    # Only qir's own modules are instrumented (numpy and the rest would slow every run for no feedback);
    # nothing of qir may be imported before this block.
    with atheris.instrument_imports(include=["qir"]):
        import qir.parser  # noqa: F401 - instrumented for coverage feedback
        import qir.printer  # noqa: F401
        import qir.verifier  # noqa: F401
    atheris.Setup(sys.argv, _one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
