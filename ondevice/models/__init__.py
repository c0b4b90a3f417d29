"""Model definitions, written once against the backend ``Ops`` protocol."""

from .llama import LlamaModel, weight_specs

__all__ = ["LlamaModel", "weight_specs", "model_for"]


def model_for(config):
    """The model definition class for ``config`` (all supported types are Llama-family)."""
    return LlamaModel
