"""ondevice: an on-device, multi-backend LLM inference runtime with a paged KV cache."""

from typing import Any

from . import api
from .api import Chunk, Model
from .errors import (
    BackendUnavailableError,
    ModelFormatError,
    OndeviceError,
    RequestError,
    SamplingError,
    TokenizerError,
    UnknownSamplingOptionError,
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
    SpeculativeConfig,
    WgpuOptions,
)

__version__ = "0.1.0"


def load(model: Any = None, backend: str = "auto", *, policy: Any = None, **kwargs: Any) -> Any:
    """Load a model: a local :class:`Model` (see :func:`ondevice.api.load` for every keyword:
    ``engine``, ``options``, ``kv_memory``, ...), or with ``policy`` a routed model.

    ``policy``: None for a local :class:`Model`; else ``"auto"``, ``"local"``, ``"cloud"``,
    an inference mode name, or an :class:`ondevice.policy.Policy`: returns a
    :class:`ondevice.policy.RoutedModel` that places each request locally or on the configured
    cloud endpoint (and loads the local engine only when needed).
    """
    if policy is None:
        return api.load(model, backend, **kwargs)
    from .policy import load_routed

    return load_routed(model, backend, policy, **kwargs)

__all__ = [
    "BackendOptions", "CoreMLOptions", "CpuOptions", "EngineConfig", "MlxOptions",
    "NumpyOptions", "SpeculativeConfig", "WgpuOptions",
    "BackendUnavailableError", "Chunk", "Model", "ModelFormatError", "OndeviceError",
    "RequestError", "SamplingError", "SamplingParams", "TokenizerError",
    "UnknownSamplingOptionError", "UnsupportedModelError", "load",
]
