"""Backends, discovered by name: ``ondevice.backends.<name>_backend`` defines ``BACKEND``.

A backend module is imported only when asked for, so a missing driver (no MLX, no GPU adapter,
not macOS) drops that backend with a reason instead of failing ``import ondevice``.
"""

from __future__ import annotations

import importlib
import platform
import sys

from ..errors import BackendUnavailableError

KNOWN = ("numpy", "cpu", "mlx", "wgpu", "coreml")


# The pip extra that brings each backend's dependencies (pyproject.toml).
EXTRAS = {"cpu": "cpu", "mlx": "mlx", "wgpu": "wgpu", "coreml": "coreml"}


def _auto_order(system: str | None = None, machine: str | None = None) -> tuple[str, ...]:
    """Preference order for ``backend="auto"`` on this platform.

    Apple Silicon: MLX first; it runs there on the Metal GPU with unified memory, then the
    ``cpu`` backend. Elsewhere no GPU backend is preferred: ``cpu`` first (numba kernels on
    packed weights; dense models through the same BLAS as NumPy), then NumPy, the plain
    float32 reference (without numba), then MLX, which has only its CPU device there and
    whose Linux builds do their matrix products with the reference BLAS they ship (measured
    on the 2-core test machine with the default model at float32: MLX decodes at 11-15 tok/s
    and prefills at 20-35 tok/s where NumPy, on OpenBLAS, does about 20 and 370).
    """
    system = sys.platform if system is None else system
    machine = platform.machine() if machine is None else machine
    if system == "darwin" and machine == "arm64":
        return ("mlx", "cpu", "numpy")
    return ("cpu", "numpy", "mlx")


# In order of preference for backend="auto".
AUTO_ORDER = _auto_order()


def backend_class(name: str):
    """The Backend subclass for ``name``; BackendUnavailableError when it cannot run here."""
    if name not in KNOWN:
        raise BackendUnavailableError(f"unknown backend {name!r} (known: {', '.join(KNOWN)})")
    try:
        module = importlib.import_module(f"{__name__}.{name}_backend")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}_backend":
            raise BackendUnavailableError(
                f"backend {name!r} is not implemented in this version of ondevice"
            ) from None
        extra = EXTRAS.get(name)
        hint = f"; install it with: pip install 'ondevice[{extra}]'" if extra else ""
        raise BackendUnavailableError(
            f"backend {name!r} needs {err.name!r}, which is not installed{hint}") from None
    except ImportError as err:
        raise BackendUnavailableError(f"backend {name!r} failed to import: {err}") from None
    cls = module.BACKEND
    ok, why = cls.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    return cls


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every known backend: (available, device or the reason it is not)."""
    out = {}
    for name in KNOWN:
        try:
            out[name] = (True, backend_class(name).availability()[1])
        except BackendUnavailableError as err:
            out[name] = (False, str(err))
    return out


def resolve(name: str = "auto") -> str:
    """Pick a concrete backend name; ``auto`` takes the first available in preference order."""
    if name != "auto":
        backend_class(name)
        return name
    for candidate in AUTO_ORDER:
        try:
            backend_class(candidate)
            return candidate
        except BackendUnavailableError:
            continue
    raise BackendUnavailableError("no backend is available")
