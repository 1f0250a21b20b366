"""The pass registry: one visible table from kebab-case name to pass class.

Built-in passes register when :mod:`qir.passes` is imported. A user's pass
registers with one call (:func:`register_pass`, usable as a decorator), from a
file loaded with ``--load-pass FILE`` (:func:`load_pass_file`) or from a package
that declares an entry point in the group ``qir.passes``
(:func:`load_entry_points`). Plain functions become passes with
:func:`function_pass`: their keyword-only parameters are the options.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qir.errors import QirError
from qir.graph import Module
from qir.passes.base import Pass

PASSES: dict[str, type[Pass]] = {}
"""Every registered pass by name. Read it; change it only through :func:`register_pass`."""

_KEBAB = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def register_pass(cls: type[Pass], *, replace: bool = False) -> type[Pass]:
    """Register a pass class (a dataclass subclass of :class:`Pass` with a kebab-case ``name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise QirError(f"{cls!r} is not a Pass subclass; use function_pass() for functions")
    name = cls.name
    if not _KEBAB.fullmatch(name or ""):
        raise QirError(f"pass {cls.__name__}: name {name!r} must be kebab-case (e.g. 'fold-scales')")
    if not dataclasses.is_dataclass(cls):
        cls = dataclasses.dataclass(cls)
    if name in PASSES and PASSES[name] is not cls and not replace:
        raise QirError(f"a pass named {name!r} is already registered ({PASSES[name].__module__}."
                       f"{PASSES[name].__name__}); pick another name or pass replace=True")
    PASSES[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    if name not in PASSES:
        raise QirError(f"no pass named {name!r}")
    del PASSES[name]


def function_pass(name: str, *, replace: bool = False) -> Callable[[Callable[..., None]], type[Pass]]:
    """Decorator: turn ``fn(module, *, opt=default, ...)`` into a registered pass named ``name``."""

    def wrap(fn: Callable[..., None]) -> type[Pass]:
        sig = inspect.signature(fn)
        hints = getattr(fn, "__annotations__", {})
        fields = []
        for p in list(sig.parameters.values())[1:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise QirError(f"function pass {name!r}: option {p.name!r} must be keyword-only with a default")
            fields.append((p.name, hints.get(p.name, type(p.default)), dataclasses.field(default=p.default)))

        def run(self: Pass, module: Module) -> None:
            fn(module, **self.option_values())

        cls = dataclasses.make_dataclass(
            "".join(part.title() for part in name.split("-")) + "Pass", fields, bases=(Pass,),
            namespace={"name": name, "run": run, "__doc__": fn.__doc__, "__module__": fn.__module__})
        return register_pass(cls, replace=replace)

    return wrap


def get_pass(name: str) -> type[Pass]:
    try:
        return PASSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PASSES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise QirError(f"unknown pass {name!r}{hint}; registered passes: {', '.join(sorted(PASSES))}") from None


def load_pass_file(path: str | Path) -> list[str]:
    """Import a user's Python file so its passes register; returns the names it added."""
    p = Path(path)
    if not p.is_file():
        raise QirError(f"--load-pass {path}: no such file")
    before = set(PASSES)
    mod_name = f"qir_user_passes_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise QirError(f"--load-pass {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except QirError:
        raise
    except Exception as exc:  # the user's code: report it as theirs, with its own message
        raise QirError(f"--load-pass {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    added = sorted(set(PASSES) - before)
    if not added:
        raise QirError(f"--load-pass {path}: the file registered no pass (call qir.passes.register_pass)")
    return added


def load_entry_points() -> list[str]:
    """Load passes that installed packages declare in the entry point group ``qir.passes``."""
    from importlib.metadata import entry_points

    before = set(PASSES)
    for ep in entry_points(group="qir.passes"):
        obj: Any = ep.load()
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in PASSES:
            register_pass(obj)
    return sorted(set(PASSES) - before)
