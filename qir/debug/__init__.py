"""The numerics debugger: where a quantized model loses accuracy -- by tensor, by pass and by layer.

* :mod:`qir.debug.compare` -- two things computing the same model (float / quantized ``.qir``, an artifact
  folder) run on the same inputs; every shared tensor compared by IR value name (``qir debug compare``).
* :mod:`qir.debug.account` -- a pass-manager instrument measuring the model metric after each pass that
  changes numerics (``--account`` on ``qir quantize`` / ``qir compile``).
* :mod:`qir.debug.bisect` -- the fewest layers to keep at higher precision to bring the metric under a bound
  (``qir debug bisect``).
"""

from qir.debug.compare import CompareResult, compare_sources, default_feeds
from qir.debug.sources import OrtSource, QirSource, TensorSource, open_source, register_artifact_source

__all__ = ["CompareResult", "OrtSource", "QirSource", "TensorSource", "compare_sources", "default_feeds",
           "open_source", "register_artifact_source"]
