"""Mutation fuzzing of the ``.qir`` parser and verifier (hypothesis), and replay of the atheris regressions.

Valid texts (every golden ``.qir`` file) are mutated at the byte level -- bit flips, byte insertions and
deletions, token deletions and duplications, line duplications, truncation -- and each result goes through
the oracle of ``tests/fuzz/fuzz_parser.py``: it parses and verifies, or fails with a ``ParseError`` carrying
``file:line:col`` (not the parser's internal-error wrapper) or a ``VerifyError`` naming a rule and a place.
``tests/test_printer_parser.py`` fuzzes at the character level; this file works on bytes (invalid UTF-8
included) and runs the verifier on whatever parses.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("fuzz_parser", HERE / "fuzz" / "fuzz_parser.py")
assert _spec is not None and _spec.loader is not None
fuzz_parser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_parser)
check_input = fuzz_parser.check_input

SEEDS = [p.read_bytes() for p in fuzz_parser.SEEDS]
REGRESSIONS = sorted((HERE / "fuzz" / "regressions").glob("*.qir"))
_TOKEN = re.compile(rb"[A-Za-z0-9_.]+|[^\sA-Za-z0-9_.]")


def test_seeds_are_valid() -> None:
    assert len(SEEDS) >= 3
    for seed in SEEDS:
        assert check_input(seed) == "ok"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "token_del", "token_dup", "line_dup", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind in ("token_del", "token_dup"):
            tokens = list(_TOKEN.finditer(bytes(data)))
            if tokens:
                m = tokens[draw(st.integers(0, len(tokens) - 1))]
                piece = b"" if kind == "token_del" else m.group(0) * 2
                data[m.start():m.end()] = piece
        elif kind == "line_dup":
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
            data = bytearray(b"\n".join(lines))
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_texts_fail_only_with_located_errors(data: bytes) -> None:
    assert check_input(data) in ("ok", "parse-error", "verify-error")


def test_every_truncation_of_a_seed() -> None:
    """Cutting a valid file anywhere (a crash mid-write without atomic output) is always a located error or a
    valid prefix, never a crash. Every 7th byte of the smallest seeds keeps this under a second."""
    outcomes: set[str] = set()
    for seed in sorted(SEEDS, key=len)[:3]:
        for cut in range(0, len(seed), 7):
            outcomes.add(check_input(seed[:cut]))
    assert "parse-error" in outcomes


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_inputs(path: Path) -> None:
    """Inputs found by the atheris harness (``tests/fuzz/regressions/``) keep to the contract and the outcome
    their name records (``crash-*`` files only have to keep to the contract)."""
    outcome = check_input(path.read_bytes())
    expected = next((o for o in ("ok", "parse-error", "verify-error") if path.name.startswith(o + "-")), None)
    assert outcome == expected if expected else outcome in ("ok", "parse-error", "verify-error")
