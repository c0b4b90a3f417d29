"""Registry entry (``ondevice.backends.<name>_backend``) of the package ``ondevice.backends.wgpu``."""
from .wgpu import *  # noqa: F403  (BACKEND, WgpuBackend, adapter_report, ...)
from .wgpu import __all__  # noqa: F401
