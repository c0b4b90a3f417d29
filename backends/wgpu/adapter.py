"""Adapter choice: which WebGPU adapter and which compute dtype this process uses.

The adapter and the dtype come from the backend's options (``WgpuOptions.adapter`` /
``.dtype``); when a caller passes none, the environment's values apply. Each of the two is
resolved in exactly one function here (:func:`requested_adapter`, :func:`requested_dtype`), and
the environment itself is read by :mod:`ondevice.settings`, the one place that knows the
variables.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import wgpu

from ...errors import BackendUnavailableError
from ...settings import WgpuOptions

DTYPES = ("float32", "float16")
T = TypeVar("T")


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as ``ondevice backends`` lists it."""

    name: str
    backend_type: str
    adapter_type: str

    def describe(self) -> str:
        return f"{self.name} ({self.backend_type}, {self.adapter_type})"


def adapter_info(adapter) -> AdapterInfo:
    """Name, backend type and device type of a wgpu adapter."""
    i = adapter.info
    return AdapterInfo(str(i.get("device") or i.get("description") or "unknown"),
                       str(i.get("backend_type", "?")), str(i.get("adapter_type", "?")))


# -- probing the driver stack -----------------------------------------------------------------
@contextmanager
def _private_runtime_dir() -> Iterator[None]:
    """``XDG_RUNTIME_DIR`` set to a private empty directory while the block runs, when it is
    unset or invalid.

    Every adapter enumeration (``enumerate_adapters``, ``request_adapter``) probes wgpu's OpenGL
    backend, whose EGL connects to Wayland; without a valid ``XDG_RUNTIME_DIR`` libwayland
    prints "error: XDG_RUNTIME_DIR is invalid or not set" on stderr (seen with Mesa 25 on
    headless machines). In an empty directory there is no compositor socket, so the connection
    fails quietly, which is the right answer there too. The OpenGL adapter stays listed and
    usable. Both enumerations run once per process (their results are cached below).
    """
    current = os.environ.get("XDG_RUNTIME_DIR", "")
    if current.startswith("/"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ondevice-xdg-") as private:
        os.environ["XDG_RUNTIME_DIR"] = private
        try:
            yield
        finally:
            if current:
                os.environ["XDG_RUNTIME_DIR"] = current
            else:
                del os.environ["XDG_RUNTIME_DIR"]


def _probe(call: Callable[[], T]) -> T:
    """``call()``, a wgpu call that enumerates adapters, under :func:`_private_runtime_dir`."""
    with _private_runtime_dir():
        return call()


_adapters: list[Any] | None = None
_chosen: dict[str, Any] = {}


def all_adapters() -> list[Any]:
    """Every adapter wgpu sees on this machine (enumerated once per process)."""
    global _adapters
    if _adapters is None:
        _adapters = list(_probe(wgpu.gpu.enumerate_adapters_sync))
    return _adapters


# -- what the caller asked for -----------------------------------------------------------------
def requested_adapter(adapter: str | None = None) -> tuple[str, str]:
    """(adapter text asked for, where it came from): ``adapter`` when given, else the
    environment's (through :mod:`ondevice.settings`); ``""`` asks for none in particular."""
    if adapter is not None:
        return adapter.strip(), "wgpu adapter"
    return (WgpuOptions.from_env().adapter or "").strip(), WgpuOptions.ENV["adapter"]


def requested_dtype(dtype: str | None = None) -> tuple[str, str]:
    """(dtype asked for, where it came from): ``dtype`` when given, else the environment's
    (through :mod:`ondevice.settings`); ``""`` leaves the choice to the adapter."""
    if dtype is not None:
        return dtype.strip().lower(), "wgpu dtype"
    return (WgpuOptions.from_env().dtype or "").strip().lower(), WgpuOptions.ENV["dtype"]


# -- choosing ----------------------------------------------------------------------------------
def choose_adapter(adapter: str | None = None):
    """The adapter to use: the first whose name or backend type contains the requested text
    (case-insensitive; see :func:`requested_adapter`), else the high-performance one.
    BackendUnavailableError when there is none, or the named one does not exist (the message
    lists what exists)."""
    want, source = requested_adapter(adapter)
    if want in _chosen:
        return _chosen[want]
    if want:
        adapters = all_adapters()
        for a in adapters:
            inf = adapter_info(a)
            if want.lower() in f"{inf.name} {inf.backend_type}".lower():
                _chosen[want] = a
                return a
        seen = "; ".join(adapter_info(a).describe() for a in adapters) or "none"
        raise BackendUnavailableError(f"{source}={want!r} matches no adapter (seen: {seen})")
    try:
        a = _probe(lambda: wgpu.gpu.request_adapter_sync(
            power_preference="high-performance"))
    except Exception as err:  # wgpu-native raises plain errors when no driver is present
        raise BackendUnavailableError(f"no WebGPU adapter ({err})") from None
    if a is None:
        raise BackendUnavailableError(
            "no WebGPU adapter (install a Vulkan/Metal/D3D12 driver; on Linux without a GPU, "
            "Mesa's lavapipe: mesa-vulkan-drivers)")
    _chosen[want] = a
    return a


def adapter_dtypes(adapter) -> tuple[str, ...]:
    """The dtypes ``adapter`` can run (float16 needs shader-f16)."""
    return DTYPES if "shader-f16" in adapter.features else ("float32",)


def choose_dtype(adapter, dtype: str | None = None) -> str:
    """The compute dtype on ``adapter``: the requested one (see :func:`requested_dtype`), else
    float16 when the adapter has shader-f16, else float32. BackendUnavailableError for a dtype
    that is unknown or that the adapter cannot run."""
    want, source = requested_dtype(dtype)
    if not want:
        return "float16" if "shader-f16" in adapter.features else "float32"
    if want not in DTYPES:
        raise BackendUnavailableError(f"{source}={want!r}: choose {' or '.join(DTYPES)}")
    if want not in adapter_dtypes(adapter):
        raise BackendUnavailableError(
            f"wgpu dtype {want} needs shader-f16, which {adapter_info(adapter).name} lacks")
    return want


def adapter_report(adapter: str | None = None) -> list[str]:
    """One line per adapter wgpu sees (name, backend, device type), the one in use marked;
    for ``ondevice backends``."""
    try:
        adapters = all_adapters()
    except Exception as err:  # a broken driver stack: say so rather than fail the listing
        return [f"wgpu adapters: none ({err})"]
    try:
        used = adapter_info(choose_adapter(adapter))
    except BackendUnavailableError:
        used = None
    lines = []
    for a in adapters:
        inf = adapter_info(a)
        mark = "  <- used" if inf == used else ""
        lines.append(f"wgpu adapter: {inf.describe()}{mark}")
    return lines or ["wgpu adapters: none"]
