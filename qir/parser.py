"""The parser of the ``.qir`` text format (the inverse of :mod:`qir.printer`).

``parse(text)`` rebuilds a :class:`~qir.graph.Module` through the graph API, so
use-def lists are right. It checks what the text alone decides — syntax, names
defined once and before use, known opcodes and attributes, types (including
quantization specs), ``dense`` element counts, declared result types of
functions — and leaves type inference to the verifier.

Every problem raises :class:`~qir.errors.ParseError` with ``file:line:col``, the
offending source line with a caret, and what was expected; no other exception
escapes for any input string. The grammar is written down in
``docs/text-format.md``.

The parser is a hand-written recursive descent over characters: lines are
significant (one op per line), spaces and ``#`` comments between tokens are not.
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from qir.dtypes import ALL_DTYPES, DType
from qir.errors import ParseError, QirError, SerializationError
from qir.graph import Function, Module, Value, check_name
from qir.limits import MAX_TEXT_BYTES, text_size_problem
from qir.ops.registry import OpDef, all_ops, get_op, has_op
from qir.quantspec import QuantSpec
from qir.shapes import Dim, dim
from qir.types import TensorType

__all__ = ["parse", "parse_file"]

_SPACE = re.compile(r"(?:[ \t\r\f\v]+|#[^\n]*)*")
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
_OPCODE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DTYPE = re.compile(r"[A-Za-z0-9_]+")
_NUMBER = re.compile(
    r"[-+]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf(?![A-Za-z0-9_])|nan(?![A-Za-z0-9_]))")
_TOKEN = re.compile(r"[A-Za-z0-9_.]+|\S")
_SHAPE_BODY = re.compile(r"[A-Za-z0-9_+\-* \t,]*")
_STRING_STOP = re.compile(r'"|\\.|\n')
_QUANT_START = re.compile(r"q[ \t]*\(")
_MAX_NESTING = 64
_MAX_DIGITS = 4000  # Python refuses to convert longer digit strings to int
_DTYPES: dict[str, DType] = {d.name: d for d in ALL_DTYPES}


def parse(text: str, *, filename: str = "<text>", blobs: Mapping[str, Any] | None = None) -> Module:
    """Parse ``.qir`` text into a :class:`Module`.

    ``blobs`` maps constant names to their data (numpy arrays or lazy arrays, e.g. the
    entries of the ``.safetensors`` file beside the text); a ``blob`` constant whose
    name it lacks (or every one, when ``blobs`` is None) gets ``data=None``.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _decode_error(bytes(text), exc, filename) from None
    if not isinstance(text, str):
        raise TypeError(f"parse() takes the IR text as a str, not {type(text).__name__}")
    parser = _Parser(text, filename, blobs)
    # Overflow to inf in a float cast is what the text asks for (e.g. dense(1e300) in f16); no warning needed.
    with np.errstate(all="ignore"):
        try:
            return parser.parse_module()
        except ParseError:
            raise
        except QirError as exc:
            message = str(exc)
        except Exception as exc:  # the contract is "only ParseError escapes", even for a bug in this module
            message = f"internal parser error ({type(exc).__name__}: {exc}); please report this input"
    parser.error(message)


def parse_file(path: str | os.PathLike[str]) -> Module:
    """Read and parse a ``.qir`` file (constant data is not loaded: use ``qir.serialize.load`` for that).

    Raises ``ParseError`` (with ``file`` = ``path``) for bad text and ``SerializationError`` when the
    file cannot be read.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            problem = text_size_problem(os.fstat(fh.fileno()).st_size)
            if problem:
                raise SerializationError(f"{name}: {problem}")
            raw = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise SerializationError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise SerializationError(f"{name}: {text_size_problem(len(raw))}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(raw, exc, name) from None
    return parse(text, filename=name)


def _decode_error(raw: bytes, exc: UnicodeDecodeError, filename: str) -> ParseError:
    before = raw[:exc.start]
    line = before.count(b"\n") + 1
    start = before.rfind(b"\n") + 1
    col = len(raw[start:exc.start].decode("utf-8", errors="replace")) + 1
    end = raw.find(b"\n", exc.start)
    source = raw[start:end if end >= 0 else len(raw)].decode("utf-8", errors="replace")
    return ParseError(f"the file is not valid UTF-8 text ({exc.reason})", file=filename, line=line, col=col,
                      source_line=source)


class _Parser:
    """Cursor over the text plus the symbol tables of the module being built."""

    def __init__(self, text: str, filename: str, blobs: Mapping[str, Any] | None) -> None:
        self.text = text
        self.filename = filename
        self.blobs = blobs
        self.pos = 0
        self.line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.module: Module | None = None
        self.const_pos: dict[str, int] = {}

    # -- errors -----------------------------------------------------------------------------------------------------
    def location(self, pos: int) -> tuple[int, int, str]:
        index = bisect.bisect_right(self.line_starts, pos) - 1
        start = self.line_starts[index]
        end = self.text.find("\n", start)
        line = self.text[start:end if end >= 0 else len(self.text)]
        return index + 1, pos - start + 1, line.rstrip("\r")

    def error(self, message: str, pos: int | None = None) -> NoReturn:
        line, col, source = self.location(self.pos if pos is None else pos)
        raise ParseError(message, file=self.filename, line=line, col=col, source_line=source)

    def found(self) -> str:
        """How the text at the cursor reads in an error message: ``'{'``, ``'foo'``, end of line/file."""
        if self.pos >= len(self.text):
            return "end of file"
        if self.text[self.pos] == "\n":
            return "end of line"
        m = _TOKEN.match(self.text, self.pos)
        token = m.group(0) if m else self.text[self.pos]
        return repr(token[:40])

    def expected(self, what: str) -> NoReturn:
        self.error(f"expected {what}, found {self.found()}")

    # -- scanning ---------------------------------------------------------------------------------------------------
    def skip(self) -> None:
        """Skip spaces and a comment on the current line (never the newline)."""
        self.pos = _SPACE.match(self.text, self.pos).end()

    def skip_blank_lines(self) -> None:
        while True:
            self.skip()
            if self.pos < len(self.text) and self.text[self.pos] == "\n":
                self.pos += 1
            else:
                return

    def at(self, s: str) -> bool:
        self.skip()
        return self.text.startswith(s, self.pos)

    def accept(self, s: str) -> bool:
        if self.at(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str, context: str) -> int:
        if not self.at(s):
            self.expected(f"'{s}' {context}")
        start = self.pos
        self.pos += len(s)
        return start

    def at_word(self, word: str) -> bool:
        self.skip()
        m = _WORD.match(self.text, self.pos)
        return bool(m) and m.group(0) == word

    def expect_word(self, word: str, context: str) -> int:
        if not self.at_word(word):
            self.expected(f"'{word}' {context}")
        start = self.pos
        self.pos += len(word)
        return start

    def expect_eol(self, context: str) -> None:
        self.skip()
        if self.pos < len(self.text):
            if self.text[self.pos] != "\n":
                self.expected(f"end of line {context}")
            self.pos += 1

    def at_eol(self) -> bool:
        self.skip()
        return self.pos >= len(self.text) or self.text[self.pos] == "\n"

    def name(self, sigil: str, what: str) -> tuple[str, int]:
        """``%name`` or ``@name``; returns the name without its sigil and the sigil's position."""
        start = self.expect(sigil, f"to start {what}")
        m = _NAME.match(self.text, self.pos)
        name = m.group(0)
        try:
            check_name(name, what)
        except QirError as exc:
            self.error(str(exc), self.pos)
        self.pos = m.end()
        return name, start

    def string(self, context: str) -> str:
        start = self.expect('"', context)
        try:
            value, end = json.decoder.scanstring(self.text, start + 1, True)
        except ValueError as exc:
            # JSON reports a missing quote as a bad character somewhere later; name the real problem instead.
            pos, closed = start + 1, False
            while (m := _STRING_STOP.search(self.text, pos)) and m.group(0) != "\n":
                if m.group(0) == '"':
                    closed = True
                    break
                pos = m.end()
            if not closed:
                self.error("unterminated string: expected a closing '\"' on the same line", start)
            self.error(f"bad string literal: {getattr(exc, 'msg', exc)}", getattr(exc, "pos", start))
        self.pos = end
        return value

    def number(self, what: str) -> tuple[int | float, int]:
        self.skip()
        m = _NUMBER.match(self.text, self.pos)
        if not m:
            self.expected(what)
        start = self.pos
        self.pos = m.end()
        if self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "_."):
            self.pos = start
            self.expected(what)
        text = m.group(0)
        if len(text) > _MAX_DIGITS:
            self.error(f"number with {len(text)} characters is too long", start)
        if re.fullmatch(r"[-+]?\d+", text):
            return int(text), start
        return float(text), start

    def integer(self, what: str) -> tuple[int, int]:
        value, start = self.number(what)
        if not isinstance(value, int):
            self.error(f"expected {what}, found the float {self.text[start:self.pos]!r}", start)
        return value, start

    # -- module -----------------------------------------------------------------------------------------------------
    def parse_module(self) -> Module:
        self.skip_blank_lines()
        self.expect_word("module", "at the start of the file (the first line is 'module @NAME')")
        name, _ = self.name("@", "module name")
        self.module = Module(name)
        self.expect_eol("after the module name")
        while True:
            self.skip_blank_lines()
            if self.pos >= len(self.text):
                return self.module
            if self.at_word("const"):
                self.parse_const()
            elif self.at_word("func"):
                self.parse_func()
            else:
                self.expected("'const' or 'func' at the start of a top-level line")

    def parse_const(self) -> None:
        assert self.module is not None
        self.expect_word("const", "")
        name, start = self.name("@", "constant name")
        if name in self.module.constants:
            line, _, _ = self.location(self.const_pos[name])
            self.error(f"duplicate constant @{name} (first defined on line {line})", start)
        self.expect(":", f"after the constant name @{name}")
        ctype = self.parse_type()
        self.expect("=", f"after the type of @{name}")
        data: Any = None
        if self.at_word("blob"):
            self.pos += len("blob")
            if self.blobs is not None and name in self.blobs:
                data = self.blobs[name]
        elif self.at_word("dense"):
            data = self.parse_dense(name, ctype)
        else:
            self.expected(f"'blob' or 'dense(...)' as the value of @{name}")
        self.expect_eol(f"after the value of @{name}")
        try:
            self.module.add_constant(name, data, type=ctype)
        except QirError as exc:
            self.error(str(exc), start)
        self.const_pos[name] = start

    def parse_dense(self, name: str, ctype: TensorType) -> np.ndarray:
        start = self.pos
        self.pos += len("dense")
        self.expect("(", "after 'dense'")
        items: list[tuple[Any, int]] = []
        if not self.accept(")"):
            while True:
                items.append(self.dense_element(ctype.dtype))
                if self.accept(")"):
                    break
                self.expect(",", "or ')' between dense elements")
        if not ctype.is_static:
            self.error(f"constant @{name} has the symbolic type {ctype}: dense data needs a static shape", start)
        count = ctype.numel()
        if len(items) != count:
            self.error(f"dense value of @{name} has {len(items)} elements but its type {ctype} holds {count}",
                       start)
        dt = ctype.dtype
        values = [v for v, _ in items]
        if dt.kind == "bool":
            arr = np.array(values, dtype=np.bool_)
        elif dt.is_float:
            arr = np.array(values, dtype=np.float64).astype(dt.numpy)
        else:
            for v, pos in items:
                if not dt.qmin <= v <= dt.qmax:
                    self.error(f"dense element {v} of @{name} is outside the {dt} range [{dt.qmin}, {dt.qmax}]",
                               pos)
            arr = np.array(values, dtype=np.int64).astype(dt.numpy)
        return arr.reshape(tuple(int(d) for d in ctype.shape))

    def dense_element(self, dt: DType) -> tuple[Any, int]:
        self.skip()
        start = self.pos
        if dt.kind == "bool":
            for word, value in (("true", True), ("false", False)):
                if self.at_word(word):
                    self.pos += len(word)
                    return value, start
            self.expected("'true' or 'false' (a bool element)")
        if dt.is_float:
            value, start = self.number(f"a number (an {dt} element)")
            return float(value), start
        value, start = self.integer(f"an integer (an {dt} element)")
        return value, start

    # -- types ------------------------------------------------------------------------------------------------------
    def parse_type(self) -> TensorType:
        self.skip()
        start = self.pos
        m = _DTYPE.match(self.text, self.pos)
        if not m:
            self.expected("a type such as f32[1,seq,64]")
        dt = _DTYPES.get(m.group(0))
        if dt is None:
            self.error(f"unknown dtype {m.group(0)!r}; known dtypes: {', '.join(_DTYPES)}", start)
        self.pos = m.end()
        shape = self.parse_shape(dt)
        quant: QuantSpec | None = None
        qpos = -1
        self.skip()
        if _QUANT_START.match(self.text, self.pos):
            qpos = self.pos
            quant = self.parse_quant()
        try:
            return TensorType(dt, shape, quant)
        except QirError as exc:
            self.error(str(exc), qpos if quant is not None else start)

    def parse_shape(self, dt: DType) -> tuple[Dim, ...]:
        self.expect("[", f"after the dtype {dt} (a shape such as [1,seq,64]; scalars are [])")
        body_start = self.pos
        body_end = _SHAPE_BODY.match(self.text, self.pos).end()
        self.pos = body_end
        if not self.text.startswith("]", self.pos):
            self.expected("']' to close the shape (dimensions are ints or sizes such as seq, past+1, 2*seq-1)")
        self.pos += 1
        if not self.text[body_start:body_end].strip():
            return ()
        dims: list[Dim] = []
        piece_start = body_start
        for piece in self.text[body_start:body_end].split(","):
            pos = piece_start + len(piece) - len(piece.lstrip())
            piece_start += len(piece) + 1
            if not piece.strip():
                self.error("expected a dimension (an int or a symbolic size such as seq or past+1)", pos)
            if len(piece) > _MAX_DIGITS:
                self.error(f"dimension with {len(piece)} characters is too long", pos)
            try:
                d = dim(piece)
            except QirError as exc:
                self.error(str(exc), pos)
            if isinstance(d, int) and d < 0:
                self.error(f"bad dimension {piece.strip()!r}: sizes must be >= 0", pos)
            dims.append(d)
        return tuple(dims)

    def parse_quant(self) -> QuantSpec:
        qpos = self.pos
        self.pos += 1
        self.expect("(", "after 'q'")
        seen: dict[str, Any] = {}
        if not self.accept(")"):
            while True:
                self.skip()
                kpos = self.pos
                m = _WORD.match(self.text, self.pos)
                key = m.group(0) if m else ""
                if key not in ("axis", "group", "scale", "zp", "offset", "dynamic", "asym"):
                    self.expected("a quantization parameter (axis=, group=, scale=, zp=, offset=, dynamic, asym)")
                if key in seen:
                    self.error(f"quantization parameter {key!r} given twice", kpos)
                self.pos = m.end()
                if key in ("dynamic", "asym"):
                    seen[key] = True
                else:
                    self.expect("=", f"after {key!r}")
                    seen[key] = self.quant_value(key)
                if self.accept(")"):
                    break
                self.expect(",", "or ')' between quantization parameters")
        dynamic = bool(seen.get("dynamic"))
        if seen.get("asym") and not dynamic:
            self.error("'asym' is written only on dynamic specs; a static spec is asymmetric when it has zp=", qpos)
        try:
            return QuantSpec(axis=seen.get("axis"), group_size=seen.get("group"), scale=seen.get("scale"),
                             zero_point=seen.get("zp"), offset=seen.get("offset"),
                             symmetric=not seen.get("asym") if dynamic else "zp" not in seen, dynamic=dynamic)
        except QirError as exc:
            self.error(str(exc), qpos)

    def quant_value(self, key: str) -> Any:
        if key == "offset":
            name, _ = self.name("@", "offset constant name (offset=@w.min)")
            return name
        if key in ("scale", "zp") and self.at("@"):
            name, _ = self.name("@", f"{key} constant name")
            return name
        if key == "scale":
            value, _ = self.number("a float or @constant after 'scale='")
            return float(value)
        what = "an integer or @constant after 'zp='" if key == "zp" else f"an integer after '{key}='"
        value, _ = self.integer(what)
        return value

    # -- functions --------------------------------------------------------------------------------------------------
    def parse_func(self) -> None:
        assert self.module is not None
        self.expect_word("func", "")
        fname, fpos = self.name("@", "function name")
        if fname in self.module.functions:
            self.error(f"duplicate function @{fname}", fpos)
        func = self.module.add_function(fname)
        values: dict[str, tuple[Value, int]] = {}
        self.expect("(", f"after the function name @{fname}")
        if not self.accept(")"):
            while True:
                vname, vpos = self.name("%", "input name")
                self.define(values, vname, vpos)
                self.expect(":", f"after the input %{vname}")
                values[vname] = (func.add_input(vname, self.parse_type()), vpos)
                if self.accept(")"):
                    break
                self.expect(",", "or ')' between function inputs")
        self.expect("->", "after the function inputs")
        self.expect("(", "to open the result types (write '-> ()' for none)")
        declared: list[TensorType] = []
        if not self.accept(")"):
            while True:
                declared.append(self.parse_type())
                if self.accept(")"):
                    break
                self.expect(",", "or ')' between result types")
        self.expect("{", "to open the function body")
        self.expect_eol("after '{'")
        while True:
            self.skip_blank_lines()
            if self.pos >= len(self.text):
                self.expected(f"'return' and '}}' to close func @{fname}")
            if self.at_word("return"):
                self.parse_return(func, values, declared)
                break
            if self.at("}"):
                self.expected(f"'return' before '}}' in func @{fname} (write 'return' alone for no results)")
            self.parse_op(func, values)
        self.skip_blank_lines()
        if not self.at("}"):
            self.expected(f"'}}' after return to close func @{fname}")
        self.pos += 1
        self.expect_eol(f"after '}}' closing func @{fname}")

    def define(self, values: dict[str, tuple[Value, int]], name: str, pos: int) -> None:
        if name in values:
            line, _, _ = self.location(values[name][1])
            self.error(f"value %{name} defined twice (first defined on line {line})", pos)

    def operand(self, values: dict[str, tuple[Value, int]]) -> Value:
        assert self.module is not None
        self.skip()
        if self.at("@"):
            name, pos = self.name("@", "constant name")
            const = self.module.constants.get(name)
            if const is None:
                self.error(f"use of undefined constant @{name} (constants are declared before the functions)", pos)
            return const
        if not self.at("%"):
            self.expected("an operand (%value or @constant)")
        name, pos = self.name("%", "value name")
        if name not in values:
            self.error(f"use of undefined value %{name}", pos)
        return values[name][0]

    def parse_op(self, func: Function, values: dict[str, tuple[Value, int]]) -> None:
        self.skip()
        line_start = self.pos
        if not self.at("%"):
            m = _OPCODE.match(self.text, self.pos)
            if m and has_op(m.group(0)):
                self.error(f"op {m.group(0)} has no results: expected '%result = {m.group(0)} ...' "
                           "(ops without results are not allowed)")
            self.expected("an op ('%result = opcode ...'), 'return' or '}'")
        results: list[tuple[str, int]] = []
        while True:
            rname, rpos = self.name("%", "result name")
            self.define(values, rname, rpos)
            if any(r == rname for r, _ in results):
                self.error(f"value %{rname} defined twice in the same op", rpos)
            results.append((rname, rpos))
            if not self.accept(","):
                break
        self.expect("=", "after the op results")
        self.skip()
        opos = self.pos
        m = _OPCODE.match(self.text, self.pos)
        if not m:
            self.expected("an opcode after '='")
        opcode = m.group(0)
        self.pos = m.end()
        if not has_op(opcode):
            close = difflib.get_close_matches(opcode, list(all_ops()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known ops: {', '.join(sorted(all_ops()))}"
            self.error(f"unknown op {opcode!r}{hint}", opos)
        opdef = get_op(opcode)
        operands: list[Value] = []
        self.skip()
        if not (self.at("{") or self.at(":") or self.at_eol()):
            while True:
                operands.append(self.operand(values))
                if not self.accept(","):
                    break
        attrs: dict[str, Any] = {}
        if self.at("{"):
            attrs = self.parse_attrs(opdef)
            self.expect(":", "after the attributes")
        else:
            self.expect(":", "after operands")
        self.skip()
        tpos = self.pos
        types = [self.parse_type()]
        while self.accept(","):
            types.append(self.parse_type())
        if len(types) != len(results):
            self.error(f"op {opcode} has {len(results)} result{'s' if len(results) != 1 else ''} "
                       f"but {len(types)} type{'s' if len(types) != 1 else ''} after ':'", tpos)
        loc: str | None = None
        if self.at_word("loc"):
            self.pos += len("loc")
            self.expect("(", "after 'loc'")
            loc = self.string("(the source location string)")
            self.expect(")", "after the location string")
        self.expect_eol("after the op (attributes go before ':', loc(...) after the types)")
        try:
            op = func.add_op(opcode, operands, attrs, result_types=types, names=[r for r, _ in results], loc=loc)
        except QirError as exc:
            self.error(str(exc), line_start)
        for (rname, rpos), value in zip(results, op.results):
            values[rname] = (value, rpos)

    def parse_attrs(self, opdef: OpDef) -> dict[str, Any]:
        open_pos = self.expect("{", "")
        raw: dict[str, Any] = {}
        valid = [a.name for a in opdef.attrs]
        if not self.accept("}"):
            while True:
                self.skip()
                kpos = self.pos
                m = _WORD.match(self.text, self.pos)
                if not m:
                    self.expected("an attribute name")
                key = m.group(0)
                if key not in valid:
                    close = difflib.get_close_matches(key, valid, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    self.error(f"op {opdef.name} has no attribute {key!r} (attributes: "
                               f"{', '.join(valid) or 'none'}){hint}", kpos)
                if key in raw:
                    self.error(f"attribute {key!r} given twice", kpos)
                self.pos = m.end()
                self.expect("=", f"after the attribute name {key!r}")
                self.skip()
                vpos = self.pos
                value = self.attr_value(0)
                try:
                    raw[key] = opdef.attr(key).check(opdef.name, value)
                except QirError as exc:
                    self.error(str(exc), vpos)
                if self.accept("}"):
                    break
                self.expect(",", "or '}' between attributes")
        try:
            return opdef.complete_attrs(raw)
        except QirError as exc:
            self.error(str(exc), open_pos)

    def attr_value(self, depth: int) -> Any:
        self.skip()
        if depth > _MAX_NESTING:
            self.error(f"attribute value nested more than {_MAX_NESTING} lists deep")
        if self.at('"'):
            return self.string("")
        if self.accept("["):
            items: list[Any] = []
            if not self.accept("]"):
                while True:
                    items.append(self.attr_value(depth + 1))
                    if self.accept("]"):
                        break
                    self.expect(",", "or ']' between list items")
            return tuple(items)
        for word, value in (("true", True), ("false", False), ("none", None)):
            if self.at_word(word):
                self.pos += len(word)
                return value
        if _NUMBER.match(self.text, self.pos):
            value, _ = self.number("a number")
            return value
        self.expected("an attribute value (int, float, true/false, none, \"string\" or [list])")

    def parse_return(self, func: Function, values: dict[str, tuple[Value, int]], declared: list[TensorType]) -> None:
        rpos = self.expect_word("return", "")
        outputs: list[Value] = []
        if not self.at_eol():
            while True:
                outputs.append(self.operand(values))
                if not self.accept(","):
                    break
        self.expect_eol("after the returned values")
        got = [v.type for v in outputs]
        if got != declared:
            want = ", ".join(str(t) for t in declared)
            have = ", ".join(f"{v.ref}: {v.type}" for v in outputs) or "nothing"
            self.error(f"func @{func.name} declares result types ({want}) but returns {have}", rpos)
        try:
            func.set_outputs(outputs)
        except QirError as exc:
            self.error(str(exc), rpos)
