"""Device memory: the wgpu device with its caches, pooled buffers, and the activation type.

One :class:`Device` per (adapter, float16) per process; every backend on it shares its
pipelines and parameter buffers. Activations live in pooled buffers (power-of-two sizes) that
return to the pool when their :class:`GTensor` is dropped, so a decode step after the first
creates no GPU objects.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import wgpu

from ...errors import OndeviceError
from .adapter import adapter_info
from .wgsl import render

F32 = np.float32
BUF = wgpu.BufferUsage
ACT = BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST  # activations (pooled)
UPLOAD = BUF.STORAGE | BUF.COPY_DST | BUF.COPY_SRC  # host data written with write_buffer
PARAM_CACHE = 4096  # parameter buffers and bind groups kept before the caches are reset


class WgpuError(OndeviceError):
    """A wgpu operation failed in a way the caller can act on (limits, layouts)."""


def pool_size(nbytes: int) -> int:
    """Pooled buffer sizes: powers of two from 256 bytes, so that buffers get reused."""
    return max(256, 1 << (max(nbytes, 1) - 1).bit_length())


def pipeline_key(shader: str, subst: dict | None, constants: dict | None) -> tuple:
    """What makes a pipeline distinct: the kernel, its substitutions and its constants."""
    return (shader, tuple(sorted((subst or {}).items())),
            tuple(sorted((constants or {}).items())))


class Device:
    """A wgpu device with the caches every backend on it shares (pipelines, parameters,
    pooled buffers)."""

    def __init__(self, adapter, f16: bool, timestamps: bool = False):
        self.adapter = adapter
        self.info = adapter_info(adapter)
        feats = ["shader-f16"] if f16 else []
        if timestamps and "timestamp-query" in adapter.features:
            feats.append("timestamp-query")
        lim = adapter.limits
        self.max_binding = int(lim["max-storage-buffer-binding-size"])
        self.max_storage_buffers = int(lim["max-storage-buffers-per-shader-stage"])
        self.device = adapter.request_device_sync(
            required_features=feats,
            required_limits={
                "max-storage-buffer-binding-size": self.max_binding,
                "max-buffer-size": int(lim["max-buffer-size"]),
                # All the adapter has: a KV pool split over several bindings needs them.
                "max-storage-buffers-per-shader-stage": self.max_storage_buffers,
            },
        )
        self.features = set(feats)
        self.queue = self.device.queue
        self._pipelines: dict[tuple, Any] = {}
        self._params: dict[bytes, Any] = {}
        self._free: dict[tuple[int, int], list[Any]] = defaultdict(list)
        self._serial: dict[int, int] = {}
        self._keep: list[Any] = []
        self._reorder = False

    def pipeline(self, shader: str, subst: dict[str, Any] | None = None,
                 constants: dict[str, int] | None = None):
        """The compute pipeline of kernel ``shader`` so specialized (compiled once)."""
        key = pipeline_key(shader, subst, constants)
        pipe = self._pipelines.get(key)
        if pipe is None:
            module = self.device.create_shader_module(label=shader, code=render(shader, subst))
            stage = {"module": module, "entry_point": "main"}
            if constants:
                stage["constants"] = dict(constants)
            pipe = self.device.create_compute_pipeline(label=shader, layout="auto", compute=stage)
            self._pipelines[key] = pipe
        return pipe

    def params(self, values: tuple) -> Any:
        """An immutable uniform buffer holding ``values`` (4-byte ints or floats), by content."""
        words = np.zeros(8, dtype=np.uint32)
        for i, v in enumerate(values):
            words[i] = np.array(v, F32).view(np.uint32) if isinstance(v, float) else int(v)
        data = words.tobytes()
        buf = self._params.get(data)
        if buf is None:
            if len(self._params) >= PARAM_CACHE:
                self._params.clear()
            buf = self.device.create_buffer_with_data(data=data, usage=BUF.UNIFORM)
            self._params[data] = buf
        return buf

    def take(self, nbytes: int, usage: int) -> Any:
        """A pooled buffer of at least ``nbytes``."""
        if self._reorder:
            # Every step starts from the same order of free buffers, so that a step of the
            # same shape gets the same buffers as the last one and finds its bind groups cached.
            for free in self._free.values():
                free.sort(key=lambda b: -self._serial[id(b)])
            self._reorder = False
        size = pool_size(nbytes)
        free = self._free[(size, usage)]
        if free:
            return free.pop()
        buf = self.device.create_buffer(size=size, usage=usage)
        self._serial[id(buf)] = len(self._serial)
        self._keep.append(buf)  # pooled buffers live as long as the device (ids stay unique)
        return buf

    def keep(self, buf) -> Any:
        """Keep ``buf`` alive as long as the device (bind groups are cached by buffer id)."""
        self._keep.append(buf)
        return buf

    def give(self, buf) -> None:
        """Return a pooled buffer."""
        self._free[(buf.size, buf.usage)].append(buf)

    def new_step(self) -> None:
        """Called after each submit: the next take restores the canonical pool order."""
        self._reorder = True

    def buffer(self, data: np.ndarray, usage: int = BUF.STORAGE | BUF.COPY_SRC) -> Any:
        """A persistent buffer holding ``data`` (padded to 16 bytes)."""
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        size = max(16, -(-raw.size // 16) * 16)
        buf = self.device.create_buffer(size=size, usage=usage | BUF.COPY_DST)
        if raw.size:
            if raw.size % 4:
                raw = np.concatenate([raw, np.zeros(4 - raw.size % 4, np.uint8)])
            self.queue.write_buffer(buf, 0, raw)
        return buf


_devices: dict[tuple, Device] = {}


def get_device(adapter, f16: bool) -> Device:
    """One device per (adapter, f16) per process: backends share its pipelines and caches."""
    key = (id(adapter), f16)
    if key not in _devices:
        _devices[key] = Device(adapter, f16)
    return _devices[key]


class GTensor:
    """A float32 activation ``[rows, cols]`` in a pooled GPU buffer. The buffer returns to the
    pool when the tensor is dropped; later dispatches may then reuse it, which is safe because
    the encoder runs dispatches in order."""

    __slots__ = ("buf", "rows", "cols", "_dev")

    def __init__(self, dev: Device | None, buf, rows: int, cols: int):
        self.buf, self.rows, self.cols, self._dev = buf, rows, cols, dev

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * 4

    def __del__(self):
        if self._dev is not None:
            self._dev.give(self.buf)
            self._dev = None
