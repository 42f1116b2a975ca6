"""Model zoo: a registry of architectures with a width / norm option on each."""

from .registry import (
    MODELS,
    ModelEntry,
    ModelSpec,
    build_model,
    has_batchnorm,
    model_entry,
    register_model,
    resolve_model_spec,
)

__all__ = ["MODELS", "ModelEntry", "ModelSpec", "build_model", "has_batchnorm", "model_entry", "register_model", "resolve_model_spec"]
