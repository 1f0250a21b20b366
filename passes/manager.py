"""The pass manager: runs a pipeline on a copy of a module, verifying, timing and detecting change.

``PassManager(passes).run(module)`` returns a new module; the input is never
modified, so a failing pass leaves the caller's module exactly as it was. After
each pass (when ``verify_each``) the verifier runs; a pass that breaks the IR is
named in the error together with the pipeline up to it.

Change is detected by comparison, not by trusting a flag: the canonical text
before and after, plus the identity of every constant's data (a pass that
rewrites weights without changing any type still counts as a change).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from qir.errors import QirError, VerifyError
from qir.graph import Module
from qir.passes.base import Pass
from qir.passes.context import PassContext
from qir.passes.instruments import Instrument, PassRecord
from qir.passes.pipeline import format_pipeline, parse_pipeline
from qir.printer import print_module


class PassFailedError(QirError):
    """A pass raised or left an invalid module; names the pass and the pipeline so far."""

    def __init__(self, message: str, *, pass_name: str, pipeline_so_far: str) -> None:
        self.pass_name = pass_name
        self.pipeline_so_far = pipeline_so_far
        super().__init__(message)


def _fingerprint(module: Module) -> tuple[str, tuple[tuple[str, int], ...]]:
    return print_module(module), tuple((n, id(c.data)) for n, c in module.constants.items())


class PassManager:
    """Runs ``passes`` (instances or a pipeline string) with optional verification and instruments."""

    def __init__(self, passes: Sequence[Pass] | str, *, verify_each: bool = True,
                 instruments: Sequence[Instrument] = (), context: PassContext | None = None) -> None:
        self.passes: list[Pass] = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.verify_each = verify_each
        self.context = context or PassContext()
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, module: Module) -> Module:
        from qir.verifier import verify

        work = module.clone()
        text, data_ids = _fingerprint(work)
        for inst in self.instruments:
            inst.before_pipeline(text)
            inst.before_pipeline_module(work)
        self.records = []
        for i, p in enumerate(self.passes):
            so_far = format_pipeline(self.passes[: i + 1])
            p.context = self.context
            t0 = time.perf_counter()
            try:
                p.run(work)
            except QirError as exc:
                raise PassFailedError(f"pass {p.spelling()} failed: {exc}\n  pipeline so far: {so_far}",
                                      pass_name=p.name, pipeline_so_far=so_far) from exc
            except Exception as exc:  # a bug in a (possibly user-written) pass: say which one
                raise PassFailedError(f"pass {p.spelling()} crashed: {type(exc).__name__}: {exc}\n"
                                      f"  pipeline so far: {so_far}",
                                      pass_name=p.name, pipeline_so_far=so_far) from exc
            seconds = time.perf_counter() - t0
            if self.verify_each:
                try:
                    verify(work)
                except VerifyError as exc:
                    raise PassFailedError(f"pass {p.spelling()} left an invalid module: {exc}\n"
                                          f"  pipeline so far: {so_far}",
                                          pass_name=p.name, pipeline_so_far=so_far) from exc
            new_text, new_ids = _fingerprint(work)
            record = PassRecord(i, p.name, p.spelling(), seconds, (new_text, new_ids) != (text, data_ids),
                                text, new_text)
            self.records.append(record)
            for inst in self.instruments:
                inst.after_pass(record)
                inst.after_pass_module(record, work)
            text, data_ids = new_text, new_ids
        for inst in self.instruments:
            inst.after_pipeline(self.records)
        return work


def run_pipeline(module: Module, pipeline: str | Sequence[Pass], **kwargs: object) -> Module:
    """``PassManager(pipeline, **kwargs).run(module)``: the result is a new module."""
    return PassManager(pipeline, **kwargs).run(module)  # type: ignore[arg-type]
