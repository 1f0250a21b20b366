"""The ``Pass`` base class: a named, option-carrying rewrite of a module.

A pass is a dataclass whose fields are its options (they double as pipeline
options: ``quantize{scheme=w8a8}``) with a kebab-case ``name`` and a docstring
that shows a small Before/After. ``run(module)`` changes the module in place; the
pass manager hands it a copy, so a pass that fails never damages its input.

A user pass is a few lines::

    from dataclasses import dataclass
    from qir.passes import Pass, register_pass

    @register_pass
    @dataclass
    class DropAsserts(Pass):
        '''Remove ``test.assert`` ops.'''
        name = "drop-asserts"
        verbose: bool = False

        def run(self, module):
            for f in module.functions.values():
                for op in list(f.ops):
                    if op.opcode == "test.assert":
                        f.erase_op(op)

Functions work too (see :func:`qir.passes.registry.function_pass`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from qir.graph import Module
from qir.passes.context import PassContext


class Pass:
    """Base of every pass. Subclasses are dataclasses; their fields are the options.

    ``self.context`` (a :class:`~qir.passes.context.PassContext`) is set by the pass
    manager before ``run``: calibration data and other inputs that are not options.
    """

    name: ClassVar[str] = ""
    context: PassContext

    def run(self, module: Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run()")

    @classmethod
    def options(cls) -> list[dataclasses.Field[Any]]:
        """The option fields, in declaration order (empty for a pass without options)."""
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def option_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.options()}

    def spelling(self) -> str:
        """How this pass with its current options is written in a pipeline string (non-defaults only)."""
        parts = []
        for f in self.options():
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                parts.append(f"{f.name}={format_option(value)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ":".join(format_option(v) for v in value)
    return str(value)
