"""What a pipeline run may use besides the module: calibration inputs, chiefly.

Options that fit in a pipeline string live on the pass; things that do not
(arrays of calibration tokens) come through a :class:`PassContext` given to the
:class:`~qir.passes.manager.PassManager`, which sets it as ``pass.context``
before each pass runs. The CLI builds it from ``--calib-text FILE``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from qir.errors import QirError


@dataclass
class PassContext:
    """Calibration feeds for one function: each item maps that function's input names to arrays."""

    calibration: Sequence[dict[str, np.ndarray]] = field(default_factory=list)
    function: str | None = None

    def batches(self, who: str) -> Iterator[dict[str, np.ndarray]]:
        """The calibration feeds; raises (naming the pass ``who``) when there are none."""
        if not self.calibration:
            raise QirError(f"{who} needs calibration data: give --calib-text FILE on the command line, or "
                           "PassManager(..., context=PassContext(calibration=[{input_name: array}, ...]))")
        yield from self.calibration
