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
from .settings import (
    BackendOptions,
    CoreMLOptions,
    CpuOptions,
    EngineConfig,
    MlxOptions,
    NumpyOptions,
    WgpuOptions,
)

__version__ = "0.1.0"

__all__ = [
    "BackendOptions", "CoreMLOptions", "CpuOptions", "EngineConfig", "MlxOptions",
    "NumpyOptions", "WgpuOptions",
    "BackendUnavailableError", "Chunk", "Model", "ModelFormatError", "OndeviceError",
    "RequestError", "SamplingError", "SamplingParams", "TokenizerError",
    "UnsupportedModelError", "load",
]
