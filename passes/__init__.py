"""Passes over the qir IR (installed as ``qir.passes``): the pass base, registry, pipelines, manager, instruments.

    from qir.passes import run_pipeline
    out = run_pipeline(module, "fold-qdq,cse,dce", verify_each=True)

Built-in passes register on import (the table is :data:`qir.passes.registry.PASSES`).
"""

import qir.passes.compress_scales  # noqa: F401  (registers compress-scales)
import qir.passes.fold_scales  # noqa: F401  (registers fold-scales)
import qir.passes.merge_siblings  # noqa: F401  (registers merge-siblings)
import qir.passes.mixed_precision  # noqa: F401  (registers mixed-precision)
import qir.passes.outlier_split  # noqa: F401  (registers outlier-split)
import qir.passes.split_vocab  # noqa: F401  (registers split-vocab)
import qir.passes.vocab_share  # noqa: F401  (registers vocab-share)
from qir.passes import calibrate, cleanup, quantize  # noqa: F401  (register dce, cse, ..., calibrate, quantize)
from qir.passes.base import Pass
from qir.passes.context import PassContext
from qir.passes.instruments import (
    DumpDir,
    FloatSnapshot,
    Instrument,
    PassRecord,
    PrintAfter,
    PrintAfterAll,
    PrintChanged,
    Timing,
)
from qir.passes.manager import PassFailedError, PassManager, run_pipeline
from qir.passes.pipeline import PipelineError, format_pipeline, make_pass, parse_pipeline
from qir.passes.registry import (
    PASSES,
    function_pass,
    get_pass,
    load_entry_points,
    load_pass_file,
    register_pass,
    unregister_pass,
)
from qir.passes.rewrite import RewriteDidNotConvergeError, RewritePattern, Rewriter, apply_patterns

__all__ = [
    "PASSES", "DumpDir", "FloatSnapshot", "Instrument",
    "Pass", "PassContext", "PassFailedError", "PassManager", "PassRecord",
    "PipelineError",
    "PrintAfter", "PrintAfterAll", "PrintChanged", "RewriteDidNotConvergeError", "RewritePattern", "Rewriter",
    "Timing", "apply_patterns", "format_pipeline", "function_pass", "get_pass", "load_entry_points",
    "load_pass_file", "make_pass", "parse_pipeline", "register_pass", "run_pipeline", "unregister_pass",
]
