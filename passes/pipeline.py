"""Pipeline strings in MLIR style: ``"calibrate{method=percentile,percentile=99.99},quantize{scheme=w8a8},dce"``.

:func:`parse_pipeline` turns a string into pass instances, checking every pass
name and every option (name, type, allowed values) before anything runs; an
error lists what would have been valid. :func:`format_pipeline` writes the
instances back (only options that differ from their defaults).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from qir.errors import QirError
from qir.passes.base import Pass
from qir.passes.registry import get_pass


class PipelineError(QirError):
    """A pipeline string that names an unknown pass or option, or gives a bad value."""


def _split_top(text: str, sep: str) -> list[tuple[str, int]]:
    """Split on ``sep`` outside braces and quotes; returns (piece, offset) pairs."""
    parts: list[tuple[str, int]] = []
    depth, start, quote = 0, 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quote = not quote
        elif quote:
            continue
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline: unbalanced '}}' at column {i + 1}: {text!r}")
        elif ch == sep and depth == 0:
            parts.append((text[start:i], start))
            start = i + 1
    if depth != 0 or quote:
        raise PipelineError(f"pipeline: missing {'closing quote' if quote else repr('}')} in {text!r}")
    parts.append((text[start:], start))
    return parts


def parse_pipeline(text: str) -> list[Pass]:
    """Pass instances for ``text`` (empty or whitespace: no passes)."""
    if not text.strip():
        return []
    passes: list[Pass] = []
    for piece, offset in _split_top(text, ","):
        piece = piece.strip()
        if not piece:
            raise PipelineError(f"pipeline: empty pass name at column {offset + 1} of {text!r}")
        if "{" in piece:
            name, _, rest = piece.partition("{")
            if not rest.endswith("}"):
                raise PipelineError(f"pipeline: options of {name.strip()!r} must end with '}}': {piece!r}")
            options = _parse_options(name.strip(), rest[:-1])
        else:
            name, options = piece, {}
        passes.append(make_pass(name.strip(), options))
    return passes


def _parse_options(pass_name: str, body: str) -> dict[str, str]:
    options: dict[str, str] = {}
    if not body.strip():
        return options
    for item, _ in _split_top(body, ","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PipelineError(f"pipeline: option {item.strip()!r} of pass {pass_name!r} must be key=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key in options:
            raise PipelineError(f"pipeline: option {key!r} of pass {pass_name!r} is given twice")
        options[key] = value
    return options


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """Instantiate pass ``name`` with options given as strings (from a pipeline) or typed values."""
    cls = get_pass(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in cls.options()}
    kwargs: dict[str, Any] = {}
    for key, raw in (options or {}).items():
        if key not in fields:
            valid = ", ".join(_describe(f, hints.get(f.name)) for f in fields.values()) or "none"
            raise PipelineError(f"pass {name!r} has no option {key!r}; its options: {valid}")
        kwargs[key] = convert_option(name, key, raw, hints.get(key, str))
    try:
        return cls(**kwargs)
    except QirError:
        raise
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass {name!r}: {exc}") from None


def _describe(f: dataclasses.Field[Any], hint: Any) -> str:
    default = f.default if f.default is not dataclasses.MISSING else "?"
    return f"{f.name}: {_type_name(hint)} = {default}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def convert_option(pass_name: str, key: str, raw: Any, hint: Any) -> Any:
    """Convert ``raw`` (a pipeline string or a typed value) to the option's declared type."""
    origin = typing.get_origin(hint)
    where = f"pass {pass_name!r} option {key!r}"
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if raw is None or (isinstance(raw, str) and raw.lower() == "none" and type(None) in args):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_option(pass_name, key, raw, a)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(f"{where}: {raw!r} is not a {_type_name(hint)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        for c in choices:
            if str(c) == str(raw):
                return c
        raise PipelineError(f"{where}: {raw!r} is not one of {', '.join(map(str, choices))}")
    if not isinstance(raw, str):
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(hint, type) and isinstance(raw, hint):
            return raw
        raise PipelineError(f"{where}: {raw!r} is not a {_type_name(hint)}")
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
    except ValueError:
        raise PipelineError(f"{where}: {raw!r} is not a {_type_name(hint)}") from None
    raise PipelineError(f"{where}: options of type {_type_name(hint)} cannot be given in a pipeline string")


def format_pipeline(passes: list[Pass]) -> str:
    """The pipeline string that :func:`parse_pipeline` turns back into ``passes``."""
    return ",".join(p.spelling() for p in passes)
