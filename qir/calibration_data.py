"""Calibration inputs from a text file: what ``--calib-text FILE`` turns into.

For a causal LM the text is tokenized once (no special tokens) and cut into the
first ``windows`` non-overlapping windows of ``seq`` tokens, each one feed of the
``prefill`` function (``{"tokens": ids[1, seq]}``) — the same windows the
perplexity evaluation uses, so calibrate on a different text than you evaluate
on. For an encoder each non-empty line is one sentence; lines are batched
``batch`` at a time into ``input_ids`` / ``attention_mask`` feeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qir.errors import QirError
from qir.graph import Module


def calibration_feeds(module: Module, kind: str, tokenizer: Any, text_path: str | Path, *, windows: int = 32,
                      seq: int = 512, batch: int = 8) -> tuple[str, list[dict[str, np.ndarray]]]:
    """``(function name, feeds)`` for calibrating ``module`` on the text in ``text_path``."""
    if tokenizer is None:
        raise QirError("calibration from text needs the model's tokenizer, and this module has none: import it "
                       "with `qir import MODEL -o X.qir` (which records the model next to X.qir) or pass a zoo name")
    from qir.evaluate import read_text

    text = read_text(text_path)
    if kind == "causal-lm":
        from qir.evaluate import window_ids

        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        func = "prefill" if "prefill" in module.functions else module.main.name
        name = module.function(func).inputs[0].name
        return func, [{name: np.asarray([w], dtype=np.int64)} for w in window_ids(ids, window=seq,
                                                                                  max_windows=windows)]
    if kind == "encoder":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][: windows * batch]
        if not lines:
            raise QirError(f"--calib-text {text_path}: no non-empty lines to calibrate an encoder on")
        func = module.main
        names = [v.name for v in func.inputs]
        feeds = []
        for i in range(0, len(lines), batch):
            enc = tokenizer(lines[i:i + batch], padding=True, truncation=True, max_length=seq, return_tensors="np")
            feeds.append({names[0]: enc["input_ids"].astype(np.int64),
                          names[1]: enc["attention_mask"].astype(np.int64)})
        return func.name, feeds
    raise QirError(f"cannot build calibration feeds for a model of kind {kind!r}; give arrays through "
                   "qir.passes.PassContext(calibration=[...]) instead")
