"""Pass instruments in the spirit of LLVM's and MLIR's: watch a pipeline without changing it.

* :class:`PrintAfterAll` — the IR after every pass (``--print-after-all``)
* :class:`PrintAfter` — the IR after the named passes (``--print-after=NAME``)
* :class:`PrintChanged` — a unified diff of the IR before/after each pass that changed it (``--print-changed``)
* :class:`DumpDir` — one numbered ``.qir`` per step into a folder (``--dump-dir DIR``)
* :class:`Timing` — seconds per pass, printed at the end (``--timing``)
* :class:`FloatSnapshot` — the float constants as the last float-only step left them (reports compare quantized
  weights with these, not with the imported ones, which exact float rewrites such as smoothing have changed)

The pass manager calls ``before_pipeline``, then ``after_pass`` for each pass with
a :class:`PassRecord`, then ``after_pipeline``; ``before_pipeline_module`` / ``after_pass_module`` hand over
the module as well, for instruments that measure it. Texts are printed once per step
by the manager and shared, so instruments add no printing cost of their own.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from qir.graph import Module


@dataclass(frozen=True)
class PassRecord:
    """What happened in one step of a pipeline."""

    index: int
    name: str
    spelling: str
    seconds: float
    changed: bool
    before: str
    after: str


class Instrument:
    """Base class: override the hooks you need."""

    def before_pipeline(self, text: str) -> None:
        pass

    def after_pass(self, record: PassRecord) -> None:
        pass

    def after_pipeline(self, records: list[PassRecord]) -> None:
        pass

    # Instruments that must look at the module itself (e.g. to run it: qir.debug.account) override these two;
    # the module passed is the pipeline's working copy and must not be modified.
    def before_pipeline_module(self, module: Module) -> None:
        pass

    def after_pass_module(self, record: PassRecord, module: Module) -> None:
        pass


@dataclass
class PrintAfterAll(Instrument):
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def after_pass(self, record: PassRecord) -> None:
        self.out.write(f"// -----// IR after {record.spelling} ({'changed' if record.changed else 'unchanged'})\n")
        self.out.write(record.after)


@dataclass
class PrintAfter(Instrument):
    names: tuple[str, ...] = ()
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def after_pass(self, record: PassRecord) -> None:
        if record.name in self.names:
            self.out.write(f"// -----// IR after {record.spelling}\n")
            self.out.write(record.after)


@dataclass
class PrintChanged(Instrument):
    context: int = 3
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def after_pass(self, record: PassRecord) -> None:
        if not record.changed:
            return
        self.out.write(f"// -----// {record.spelling} changed the IR\n")
        self.out.writelines(diff_texts(record.before, record.after, f"before {record.spelling}",
                                       f"after {record.spelling}", self.context))


@dataclass
class DumpDir(Instrument):
    """Writes ``00-input.qir``, ``01-<pass>.qir``, ... (text only; weights are not copied)."""

    directory: Path = Path("qir-dump")

    def before_pipeline(self, text: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "00-input.qir").write_text(text)

    def after_pass(self, record: PassRecord) -> None:
        (self.directory / f"{record.index + 1:02d}-{record.name}.qir").write_text(record.after)


@dataclass
class Timing(Instrument):
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def after_pipeline(self, records: list[PassRecord]) -> None:
        total = sum(r.seconds for r in records) or 1e-12
        self.out.write("// pass timing\n")
        for r in records:
            self.out.write(f"//   {r.seconds:9.4f} s  {100 * r.seconds / total:5.1f}%  {r.spelling}"
                           f"{'' if r.changed else '  (no change)'}\n")
        self.out.write(f"//   {sum(r.seconds for r in records):9.4f} s  total\n")


@dataclass
class FloatSnapshot(Instrument):
    """Keeps references to the float constants' data after every step that quantized nothing yet.

    Passes replace a constant's data rather than write into it, so references are enough (no copies). A float
    rewrite that precedes quantization (``fold-scales{smooth=...}`` scales weight columns and norm weights
    exactly) changes what "the float weight" of a layer is: :meth:`reference` gives the module with those values,
    which is what the quantized weights approximate.
    """

    data: dict[str, object] = field(default_factory=dict)

    def before_pipeline_module(self, module: Module) -> None:
        self._take(module)

    def after_pass_module(self, record: PassRecord, module: Module) -> None:
        if not any(c.type.quant is not None for c in module.constants.values()):
            self._take(module)

    def _take(self, module: Module) -> None:
        self.data = {n: c.data for n, c in module.constants.items()
                     if c.has_data and c.type.dtype.is_float and not n.startswith("calib.")}

    def reference(self, float_module: Module) -> Module:
        """``float_module`` with the snapshot's values for the constants it has (a clone when any differ)."""
        changed = {n: d for n, d in self.data.items()
                   if n in float_module.constants and float_module.constants[n].data is not d}
        if not changed:
            return float_module
        ref = float_module.clone()
        for n, d in changed.items():
            ref.constants[n].data = d
        return ref


def diff_texts(a: str, b: str, name_a: str, name_b: str, context: int = 3) -> list[str]:
    """Unified diff lines of two IR texts (empty when equal)."""
    return list(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                     fromfile=name_a, tofile=name_b, n=context))
