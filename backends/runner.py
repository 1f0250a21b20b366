"""Generation with a compiled artifact: a :class:`qir.generate.StepRunner` over an artifact's prefill/decode.

:func:`qir.generate.generate` needs ``prefill(tokens) -> (logits, caches)`` and ``decode(token, position, caches)
-> (logits, caches)``. :class:`ArtifactRunner` provides them for any artifact object that can run one of its
functions on a list of numpy inputs (``artifact.run(inputs, function=name)``) and records what it was compiled from
in ``artifact.report`` (``kind``, ``max_seq``, ``functions``). An artifact that can also keep tensors on its device
(``artifact.run_device``: TVM) gets its caches back as device tensors, passed straight to the next step: SmolLM2's
60 caches are ~47 MB, and copying them in and out of every decode step held ``qir generate`` on a w4a8 TVM
artifact to ~40 tok/s where the decode loop itself runs ~115.

    >>> art = load_artifact("out/smollm2-135m-ort-cpu-w8a16")
    >>> qir.generate(ArtifactRunner(art), "What is the capital of France?", tokenizer=art.tokenizer).text
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qir.errors import QirError

__all__ = ["ArtifactRunner", "ArtifactRunnerError"]


class ArtifactRunnerError(QirError):
    """The artifact cannot generate (not a causal LM, no decode function, unknown cache size)."""


class ArtifactRunner:
    """Runs a compiled causal LM's ``prefill`` and ``decode`` functions (see the module docstring)."""

    def __init__(self, artifact: Any) -> None:
        report = artifact.report
        where = getattr(artifact, "path", "the artifact")
        if report.get("kind") != "causal-lm":
            raise ArtifactRunnerError(f"{where}: generation needs a compiled causal LM; this artifact is "
                                      f"{report.get('kind', 'of unknown kind')!r}")
        missing = [f for f in ("prefill", "decode") if f not in report.get("functions", {})]
        if missing:
            raise ArtifactRunnerError(f"{where}: the artifact has no {' or '.join(missing)} function; compile the "
                                      f"model (not a single function) with qir compile")
        max_seq = report.get("max_seq")
        if not isinstance(max_seq, int) or max_seq < 2:
            raise ArtifactRunnerError(f"{where}: report.json does not record the decode cache size (max_seq); "
                                      f"recompile with qir compile")
        self.artifact = artifact
        self.max_seq = max_seq
        load = getattr(artifact, "load", None)
        if load is not None:  # the library, sessions and weights: not part of the first prefill's time
            load()

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = self.artifact.run([np.asarray(tokens, dtype=np.int64)], function="prefill")
        return np.asarray(outs[0]), [np.asarray(o) for o in outs[1:]]

    def decode(self, token: np.ndarray, position: np.ndarray,
               caches: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One step. ``caches``: numpy arrays (the padded prefill caches), or what the previous step returned."""
        inputs = [np.asarray(token, dtype=np.int64), np.asarray(position, dtype=np.int64), *caches]
        run_device = getattr(self.artifact, "run_device", None)
        if run_device is not None:
            outs = run_device(inputs, function="decode")  # numpy caches are copied in once, on the first step
            return outs[0].numpy(), list(outs[1:])
        outs = self.artifact.run(inputs, function="decode")
        return np.asarray(outs[0]), [np.asarray(o) for o in outs[1:]]
