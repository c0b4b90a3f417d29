"""Model definitions, written once against the backend ``Ops`` protocol."""

from .gemma3 import Gemma3Model
from .llama import LlamaModel, weight_specs

__all__ = ["Gemma3Model", "LlamaModel", "weight_specs", "model_for"]


def model_for(config):
    """The model definition class for ``config``: Gemma 3 or the Llama family."""
    return Gemma3Model if config.is_gemma3 else LlamaModel
