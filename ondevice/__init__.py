"""ondevice: an on-device, multi-backend LLM inference runtime with a paged KV cache."""

from .api import Chunk, Model, load
from .errors import (
    BackendUnavailableError,
    ModelFormatError,
    OndeviceError,
    RequestError,
    SamplingError,
    TokenizerError,
    UnsupportedModelError,
)
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "Chunk", "Model", "ModelFormatError", "OndeviceError",
    "RequestError", "SamplingError", "SamplingParams", "TokenizerError",
    "UnsupportedModelError", "load",
]
