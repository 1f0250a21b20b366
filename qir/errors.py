"""Exception types of qir.

Every failure a user can cause ends in one of these, with a message that says
what was wrong, where, and what was expected. Library code never lets a bare
``KeyError`` or ``IndexError`` from deep inside escape to the user.
"""

from __future__ import annotations


class QirError(Exception):
    """Base class of every error qir raises on purpose."""


class ParseError(QirError):
    """Malformed ``.qir`` text: carries ``file:line:col``, the offending text and what was expected."""

    def __init__(self, message: str, *, file: str = "<text>", line: int = 0, col: int = 0,
                 source_line: str | None = None) -> None:
        self.file = file
        self.line = line
        self.col = col
        self.source_line = source_line
        self.reason = message
        text = f"{file}:{line}:{col}: error: {message}"
        if source_line is not None:
            caret = " " * max(col - 1, 0) + "^"
            text += f"\n  {source_line}\n  {caret}"
        super().__init__(text)


class VerifyError(QirError):
    """An IR that breaks a structural, type or quantization rule.

    ``rule`` is a short kebab-case name of the broken rule (``use-before-def``,
    ``result-type``, ``quant-scale-shape``, ...) so tests and tools can match on it.
    """

    def __init__(self, message: str, *, rule: str, op_text: str | None = None,
                 func: str | None = None) -> None:
        self.rule = rule
        self.reason = message
        self.op_text = op_text
        self.func = func
        where = f" in func @{func}" if func else ""
        text = f"verify error [{rule}]{where}: {message}"
        if op_text:
            text += f"\n  at: {op_text}"
        super().__init__(text)


class QuantError(QirError, ValueError):
    """An impossible or inconsistent quantization request (says why)."""


class InterpretError(QirError):
    """The reference interpreter could not run an op (names the op and the reason)."""


class SerializationError(QirError):
    """A ``.qir``/``.safetensors`` pair that cannot be read or written (names the file)."""
