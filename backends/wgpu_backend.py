"""The wgpu backend: the one model definition as WGSL compute shaders on any WebGPU adapter.

Weights and the paged KV pool live in GPU storage buffers. Every op of a forward pass records
one or more dispatches into a single command encoder (one compute pass); :meth:`WgpuOps.logits`
ends it, copies the logits into a mapped staging buffer, submits once and reads back. So an
engine step is one submit and one readback.

Kernels are the ``.wgsl`` files of ``ondevice.shaders``, one kernel per file, specialized by
``override`` constants (workgroup sizes, quantization bits and group size) and by a few
``$NAME`` template substitutions where WGSL needs compile-time values (element types, private
array sizes). Pipelines, bind groups and the small uniform parameter buffers are cached, so a
decode step after the first creates no GPU objects.

Precision: ``float16`` (the default when the adapter has ``shader-f16``) stores dense weights
and the KV pool as f16 and computes in f32; ``float32`` stores everything as f32 (the golden
and conformance checks run there). Quantized weights keep their MLX-affine packing (uint32
codes, dequantized inside the shaders) with scales and biases as float32 pairs.

Adapter limits: a tensor larger than ``max-storage-buffer-binding-size`` is split into row
ranges, one buffer and one dispatch each (the limit is 128 MiB on Mesa lavapipe); a layer's KV
pool larger than that is split into parts of whole blocks, all bound to the KV kernels. Adapter
choice: high-performance by default; ``ONDEVICE_WGPU_ADAPTER`` picks the first adapter whose
name contains that text (case-insensitive). ``ONDEVICE_WGPU_DTYPE`` overrides the dtype.

Like the other backends it exposes ``ops`` and ``params`` (tests/test_conformance.py runs each
op on them), plus ``ops.from_host`` / ``ops.to_host``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

import numpy as np
import wgpu

from ..batch import BatchInput
from ..config import ModelConfig
from ..errors import BackendUnavailableError, OndeviceError
from ..modeldir import ModelDir, QuantizedTensor
from .base import Backend

F32 = np.float32
DTYPES = ("float32", "float16")
RELEASE_EVERY = 64 << 20  # bytes uploaded between drops of the checkpoint's mapped pages
# Rows of x up to which the GEMV kernels run (each invocation: 8 weight rows against every x
# row); above it, the tiled kernels. On lavapipe the GEMV kernel at 8 rows takes about a third
# of the tiled kernel's time on the same product and the same time at 32 rows
# (1536x576 f32, measured), so decode batches of up to 8 sequences stay on it.
GEMV_MAX_ROWS = 8
GEMV_ROWS = 8  # weight rows per invocation of the GEMV kernels (each x load serves all of them)
TILE = 8  # rows of x per invocation of the prefill kernels (by 4 dense or TILE quantized weight rows)
MAX_GROUPS = 65535  # workgroups per grid dimension (the WebGPU default limit)
PARAM_CACHE = 4096  # parameter buffers and bind groups kept before the caches are reset
BUF = wgpu.BufferUsage


class WgpuError(OndeviceError):
    """A wgpu operation failed in a way the caller can act on (limits, layouts)."""


# -- adapters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as ``ondevice backends`` lists it."""

    name: str
    backend_type: str
    adapter_type: str

    def describe(self) -> str:
        return f"{self.name} ({self.backend_type}, {self.adapter_type})"


_adapters: list[Any] | None = None
_chosen: dict[str, Any] = {}


def _info(adapter) -> AdapterInfo:
    i = adapter.info
    return AdapterInfo(str(i.get("device") or i.get("description") or "unknown"),
                       str(i.get("backend_type", "?")), str(i.get("adapter_type", "?")))


def list_adapters() -> list[AdapterInfo]:
    """Every adapter wgpu sees on this machine (enumerated once per process)."""
    return [_info(a) for a in _all_adapters()]


def _all_adapters() -> list[Any]:
    global _adapters
    if _adapters is None:
        _adapters = list(wgpu.gpu.enumerate_adapters_sync())
    return _adapters


def choose_adapter():
    """The adapter this process uses: the one ``ONDEVICE_WGPU_ADAPTER`` names (a substring of
    its name or backend type), else the high-performance one. BackendUnavailableError when
    there is none, or the named one does not exist (the message lists what exists)."""
    want = os.environ.get("ONDEVICE_WGPU_ADAPTER", "").strip()
    if want in _chosen:
        return _chosen[want]
    if want:
        adapters = _all_adapters()
        for a in adapters:
            inf = _info(a)
            if want.lower() in f"{inf.name} {inf.backend_type}".lower():
                _chosen[want] = a
                return a
        seen = "; ".join(_info(a).describe() for a in adapters) or "none"
        raise BackendUnavailableError(
            f"ONDEVICE_WGPU_ADAPTER={want!r} matches no adapter (seen: {seen})")
    try:
        a = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as err:  # wgpu-native raises plain errors when no driver is present
        raise BackendUnavailableError(f"no WebGPU adapter ({err})") from None
    if a is None:
        raise BackendUnavailableError(
            "no WebGPU adapter (install a Vulkan/Metal/D3D12 driver; on Linux without a GPU, "
            "Mesa's lavapipe: mesa-vulkan-drivers)")
    _chosen[want] = a
    return a


def adapter_report() -> list[str]:
    """One line per adapter wgpu sees (name, backend, device type), the one in use marked;
    for ``ondevice backends``."""
    try:
        adapters = _all_adapters()
    except Exception as err:  # a broken driver stack: say so rather than fail the listing
        return [f"wgpu adapters: none ({err})"]
    try:
        used = choose_adapter()
    except BackendUnavailableError:
        used = None
    used_info = _info(used) if used is not None else None
    lines = []
    for a in adapters:
        inf = _info(a)
        mark = "  <- used" if inf == used_info else ""
        lines.append(f"wgpu adapter: {inf.describe()}{mark}")
    return lines or ["wgpu adapters: none"]


def default_dtype(adapter) -> str:
    """float16 when the adapter has shader-f16, else float32; ``ONDEVICE_WGPU_DTYPE``
    overrides it."""
    forced = os.environ.get("ONDEVICE_WGPU_DTYPE", "").strip().lower()
    if forced:
        if forced not in DTYPES:
            raise BackendUnavailableError(
                f"ONDEVICE_WGPU_DTYPE={forced!r}: choose {' or '.join(DTYPES)}")
        return forced
    return "float16" if "shader-f16" in adapter.features else "float32"


# -- device: shaders, pipelines, buffers ----------------------------------------------------
_sources: dict[str, str] = {}


def shader_source(name: str) -> str:
    """The text of ``shaders/<name>.wgsl`` (package data of ``ondevice.shaders``)."""
    if name not in _sources:
        _sources[name] = resources.files("ondevice.shaders").joinpath(f"{name}.wgsl").read_text()
    return _sources[name]


def _bucket(nbytes: int) -> int:
    """Pooled buffer sizes: powers of two from 256 bytes, so that buffers get reused."""
    return max(256, 1 << (max(nbytes, 1) - 1).bit_length())


def max_kv_parts(max_storage_buffers: int) -> int:
    """Parts a layer's K (and V) pool may have: paged attention binds 6 other buffers, then
    every K part and every V part."""
    return (max_storage_buffers - 6) // 2


class Device:
    """A wgpu device with the caches every backend on it shares (pipelines, parameters)."""

    def __init__(self, adapter, f16: bool, timestamps: bool = False):
        self.adapter = adapter
        self.info = _info(adapter)
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
                "max-storage-buffers-per-shader-stage":
                    int(lim["max-storage-buffers-per-shader-stage"]),
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
        key = (shader, tuple(sorted((subst or {}).items())),
               tuple(sorted((constants or {}).items())))
        pipe = self._pipelines.get(key)
        if pipe is None:
            src = Template(shader_source(shader)).substitute(
                {k: str(v) for k, v in (subst or {}).items()})
            module = self.device.create_shader_module(label=shader, code=src)
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
        size = _bucket(nbytes)
        free = self._free[(size, usage)]
        if free:
            return free.pop()
        buf = self.device.create_buffer(size=size, usage=usage)
        self._serial[id(buf)] = len(self._serial)
        self._keep.append(buf)  # pooled buffers live as long as the device (ids stay unique)
        return buf

    def give(self, buf) -> None:
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


# -- tensors and weights ------------------------------------------------------------------------
ACT = BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST  # activations (pooled)
UPLOAD = BUF.STORAGE | BUF.COPY_DST | BUF.COPY_SRC  # host data written with write_buffer


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


@dataclass
class _Part:
    """Rows ``lo:hi`` of a matrix in their own buffer(s): ``w`` (dense, or packed codes) and,
    when quantized, ``sb`` (float32 scale/bias pairs per group)."""

    lo: int
    hi: int
    w: Any
    sb: Any = None


@dataclass
class _Matrix:
    """A linear layer's or embedding table's weight, split into row parts that each fit one
    storage binding. ``quant`` is (group_size, bits) or None; ``wtype`` "f32" or "f16"."""

    parts: list[_Part]
    out_features: int
    in_features: int
    wtype: str
    quant: tuple[int, int] | None = None
    bias: Any = None


class WgpuLoader:
    """Uploads checkpoint tensors into GPU buffers (dense in the backend's dtype, quantized as
    packed, scales and biases as float32 pairs), splitting any larger than one binding."""

    def __init__(self, backend: WgpuBackend, model: ModelDir):
        self.be = backend
        self.model = model
        self._copied = 0

    def _account(self, nbytes: int) -> None:
        self._copied += nbytes
        if self._copied >= RELEASE_EVERY:
            self.model.weights.release_pages()
            self._copied = 0

    def _row_parts(self, rows: int, bytes_per_row: int) -> list[tuple[int, int]]:
        per = max(1, self.be.max_binding // max(1, bytes_per_row))
        if bytes_per_row > self.be.max_binding:
            raise WgpuError(f"a weight row of {bytes_per_row} bytes exceeds the adapter's "
                            f"storage binding limit of {self.be.max_binding} bytes")
        return [(lo, min(rows, lo + per)) for lo in range(0, rows, per)]

    def matrix(self, w) -> _Matrix:
        dev = self.be.dev
        if isinstance(w, QuantizedTensor):
            out, inp = w.shape
            packed = np.asarray(w.weight, dtype=np.uint32)
            sb = np.stack([np.asarray(w.scales, F32), np.asarray(w.biases, F32)], axis=-1)
            row_bytes = max(packed.shape[1] * 4, sb.shape[1] * 8)
            parts = []
            for lo, hi in self._row_parts(out, row_bytes):
                parts.append(_Part(lo, hi, dev.buffer(packed[lo:hi]), dev.buffer(sb[lo:hi])))
                self._account(packed[lo:hi].nbytes)
            return _Matrix(parts, out, inp, "f32", (w.group_size, w.bits))
        out, inp = w.shape
        np_type = np.float16 if self.be.f16 else F32
        parts = []
        for lo, hi in self._row_parts(out, inp * np.dtype(np_type).itemsize):
            block = np.asarray(w[lo:hi], dtype=np_type)
            parts.append(_Part(lo, hi, dev.buffer(block)))
            self._account(block.nbytes)
        return _Matrix(parts, out, inp, "f16" if self.be.f16 else "f32")

    def embedding(self, w) -> _Matrix:
        return self.matrix(w)

    def linear(self, w, bias) -> _Matrix:
        m = self.matrix(w)
        if bias is not None:
            m.bias = self.be.dev.buffer(np.asarray(bias, F32))
        return m

    def norm(self, w) -> Any:
        return self.be.dev.buffer(np.asarray(w, F32))

    def tied_lm_head(self, embed: _Matrix, w) -> _Matrix:
        return embed  # the same buffers serve row lookups and the head


# -- ops ----------------------------------------------------------------------------------------
def _grid(groups: int) -> tuple[int, int]:
    """A 1-D count of workgroups as an (x, y) grid within the per-dimension limit."""
    if groups <= MAX_GROUPS:
        return max(groups, 1), 1
    y = -(-groups // MAX_GROUPS)
    return -(-groups // y), y


class WgpuOps:
    """Every op of the ``Ops`` protocol, recording dispatches into the step's encoder."""

    def __init__(self, backend: WgpuBackend):
        self.be = backend
        self.dev = backend.dev
        self.device = backend.dev.device
        self._encoder = None
        self._pass = None
        self._uploads: list[Any] = []
        self._step: dict[int, tuple[Any, Any]] = {}
        self._groups: dict[tuple, Any] = {}
        self._rope: dict[bytes, tuple[Any, Any, int]] = {}
        self._dummy = self.dev.buffer(np.zeros(4, F32))
        self.dispatches = 0  # dispatches recorded since the last flush (for tests, benchmarks)
        self.last_flush: dict[str, float] = {}

    # -- recording ---------------------------------------------------------------------------
    def _compute_pass(self):
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        if self._pass is None:
            self._pass = self._encoder.begin_compute_pass()
        return self._pass

    def _commands(self):
        """The encoder, outside any compute pass (for copies)."""
        if self._pass is not None:
            self._pass.end()
            self._pass = None
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        return self._encoder

    def _bind_group(self, pipe_key: tuple, pipe, buffers: tuple):
        key = (pipe_key, tuple(id(b) for b in buffers))
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= PARAM_CACHE:
                self._groups.clear()
            entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
                       for i, b in enumerate(buffers)]
            group = self.device.create_bind_group(layout=pipe.get_bind_group_layout(0),
                                                  entries=entries)
            # Keep the buffers alive as long as the group is cached (ids must stay unique).
            self._groups[key] = (group, buffers)
            return group
        return group[0]

    def _dispatch(self, shader: str, subst: dict | None, constants: dict | None,
                  params: tuple, buffers: list, grid: tuple[int, ...]) -> None:
        pipe = self.dev.pipeline(shader, subst, constants)
        key = (shader, tuple(sorted((subst or {}).items())),
               tuple(sorted((constants or {}).items())))
        group = self._bind_group(key, pipe, (self.dev.params(params), *buffers))
        cp = self._compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, group)
        cp.dispatch_workgroups(*grid)
        self.dispatches += 1

    def _new(self, rows: int, cols: int) -> GTensor:
        return GTensor(self.dev, self.dev.take(rows * cols * 4, ACT), rows, cols)

    def _upload(self, a: np.ndarray) -> Any:
        """A buffer holding host data for this step. Upload buffers are written with
        ``queue.write_buffer``, which lands before the step's commands run, so they are not
        reused until the step is submitted."""
        raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        buf = self.dev.take(raw.size, UPLOAD)
        if raw.size:
            if raw.size % 4:
                raw = np.concatenate([raw, np.zeros(4 - raw.size % 4, np.uint8)])
            self.dev.queue.write_buffer(buf, 0, raw)
        self._uploads.append(buf)
        return buf

    def _ints(self, a: np.ndarray) -> Any:
        """An int32 upload of an index array, once per step for the same array object (the
        model passes the batch's arrays to every layer)."""
        hit = self._step.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        buf = self._upload(np.asarray(a, dtype=np.int32))
        self._step[id(a)] = (a, buf)
        return buf

    def flush(self, reads: list[tuple[Any, int]] = ()) -> list[bytes]:
        """Submit everything recorded (one command buffer) and read back ``(buffer, nbytes)``
        pairs. Records the wall time of submit + wait + readback in ``last_flush``."""
        staged = []
        reads = list(reads)
        sync = not reads and self._encoder is not None
        if sync:
            # Mapping a buffer copied after the work is how to wait for it (wgpu-native's
            # work-done callback is not usable from this version of wgpu-py).
            reads = [(self._dummy, 4)]
        if reads:
            enc = self._commands()
            for buf, n in reads:
                size = -(-n // 4) * 4
                st = self.dev.take(size, BUF.MAP_READ | BUF.COPY_DST)
                if size:
                    enc.copy_buffer_to_buffer(buf, 0, st, 0, size)
                staged.append((st, n, size))
            t0 = time.perf_counter()
            self.dev.queue.submit([enc.finish()])
            self._encoder = None
            t1 = time.perf_counter()
        else:
            t0 = t1 = time.perf_counter()
        out = []
        for st, n, size in staged:
            if size:
                st.map_sync(wgpu.MapMode.READ, 0, size)
                out.append(bytes(st.read_mapped(0, size, copy=True))[:n])
                st.unmap()
            else:
                out.append(b"")
            self.dev.give(st)
        if sync:
            out.clear()
        t2 = time.perf_counter()
        for buf in self._uploads:
            self.dev.give(buf)
        self._uploads.clear()
        self.dev.new_step()
        self._step.clear()
        self.last_flush = {"submit_s": t1 - t0, "wait_readback_s": t2 - t1,
                           "dispatches": self.dispatches}
        self.dispatches = 0
        return out

    # -- host <-> device ---------------------------------------------------------------------
    def from_host(self, a: np.ndarray) -> GTensor:
        a = np.ascontiguousarray(a, dtype=F32)
        a2 = a.reshape(a.shape[0], -1) if a.ndim != 2 else a
        t = self._new(*a2.shape)
        src = self._upload(a2)
        if a2.size:
            self._commands().copy_buffer_to_buffer(src, 0, t.buf, 0, a2.nbytes)
        return t

    def to_host(self, x: GTensor) -> np.ndarray:
        if x.rows * x.cols == 0:
            self.flush()
            return np.zeros(x.shape, F32)
        [raw] = self.flush([(x.buf, x.nbytes)])
        return np.frombuffer(raw, dtype=F32).reshape(x.shape).copy()

    # -- the protocol ------------------------------------------------------------------------
    def _gather(self, m: _Matrix, ids: Any, n: int) -> GTensor:
        out = self._new(n, m.in_features)
        grid = _grid(-(-n * m.in_features // 256))
        for part in m.parts:
            params = (n, m.in_features, part.lo, part.hi)
            if m.quant is None:
                self._dispatch("embedding", self.be.subst(m.wtype), None, params,
                               [part.w, ids, out.buf], grid)
            else:
                gs, bits = m.quant
                self._dispatch("embedding_q", None, {"BITS": bits, "GS": gs}, params,
                               [part.w, part.sb, ids, out.buf], grid)
        return out

    def embedding(self, table: _Matrix, ids: np.ndarray) -> GTensor:
        ids = np.asarray(ids)
        return self._gather(table, self._ints(ids), len(ids))

    def rms_norm(self, x: GTensor, weight: Any, eps: float) -> GTensor:
        out = self._new(x.rows, x.cols)
        if x.rows:
            self._dispatch("rms_norm", None, None, (x.rows, x.cols, float(eps)),
                           [x.buf, weight, out.buf], (x.rows, 1, 1))
        return out

    def linear(self, x: GTensor, w: _Matrix) -> GTensor:
        return self._linear(x, w)

    def _linear(self, x: GTensor, w: _Matrix, out: GTensor | None = None) -> GTensor:
        if x.cols != w.in_features:
            raise WgpuError(f"linear: input has {x.cols} features, weight expects "
                            f"{w.in_features}")
        out = out or self._new(x.rows, w.out_features)
        if x.rows == 0:
            return out
        bias = w.bias if w.bias is not None else self._dummy
        has_bias = int(w.bias is not None)
        for part in w.parts:
            n_out = part.hi - part.lo
            bias_buf = bias
            if w.bias is not None and len(w.parts) > 1:
                bias_buf = self._part_bias(w, part)
            if x.rows <= GEMV_MAX_ROWS:
                groups = _grid(-(-n_out // (64 * GEMV_ROWS)))
                grid = (*groups, 1)
                rt = x.rows
            else:
                ct = TILE if w.quant is not None else 4  # matmul.wgsl: 4 weight rows
                grid = (-(-n_out // (8 * ct)), -(-x.rows // (8 * TILE)), 1)
                rt = TILE
            if w.quant is None:
                vec = 4 if w.in_features % 4 == 0 else 1
                nin = w.in_features // vec
                params = (x.rows, nin, n_out, w.out_features, part.lo, has_bias)
                subst = self.be.subst(w.wtype, vec) | {"RT": rt, "CR": GEMV_ROWS}
                if x.rows <= GEMV_MAX_ROWS and w.wtype == "f16" and w.in_features % 8 == 0:
                    params = (x.rows, w.in_features, n_out, w.out_features, part.lo, has_bias)
                    self._dispatch("gemv_f16", {"RT": rt, "CR": GEMV_ROWS}, None, params,
                                   [part.w, x.buf, bias_buf, out.buf], grid)
                elif x.rows <= GEMV_MAX_ROWS:
                    self._dispatch("gemv", subst, None, params, [part.w, x.buf, bias_buf,
                                                                 out.buf], grid)
                else:
                    self._dispatch("matmul", subst, None, params,
                                   [part.w, x.buf, bias_buf, out.buf], grid)
            else:
                gs, bits = w.quant
                params = (x.rows, w.in_features, n_out, w.out_features, part.lo, has_bias)
                consts = {"BITS": bits, "GS": gs}
                name = "gemv_q" if x.rows <= GEMV_MAX_ROWS else "matmul_q"
                subst = {"RT": rt} | ({"CR": GEMV_ROWS} if name == "gemv_q" else {"CT": TILE})
                self._dispatch(name, subst, consts, params,
                               [part.w, part.sb, x.buf, bias_buf, out.buf], grid)
        return out

    def _part_bias(self, w: _Matrix, part: _Part) -> Any:
        # Biases of split matrices: a per-part copy made once (biases are small).
        cache = self.be._part_biases
        key = (id(w), part.lo)
        if key not in cache:
            enc = self._commands()
            buf = self.device.create_buffer(size=max(16, -(-(part.hi - part.lo) * 4 // 16) * 16),
                                            usage=BUF.STORAGE | BUF.COPY_DST)
            enc.copy_buffer_to_buffer(w.bias, part.lo * 4, buf, 0, (part.hi - part.lo) * 4)
            cache[key] = buf
        return cache[key]

    def _rope_tables(self, inv_freq: np.ndarray, need: int) -> tuple[Any, Any]:
        inv = np.asarray(inv_freq, dtype=F32)
        hit = self._rope.get(inv.tobytes())
        if hit is None or hit[2] < need:
            # The reference's tables: float32 angles, NumPy's cos/sin.
            size = max(need, self.be.config.max_position_embeddings, 1)
            angles = np.arange(size, dtype=F32)[:, None] * inv[None, :]
            hit = (self.dev.buffer(np.cos(angles)), self.dev.buffer(np.sin(angles)), size)
            self._rope[inv.tobytes()] = hit
        return hit[0], hit[1]

    def rope(self, x: GTensor, positions: np.ndarray, inv_freq: np.ndarray, heads: int,
             head_dim: int) -> GTensor:
        out = self._new(x.rows, x.cols)
        if x.rows == 0:
            return out
        cos, sin = self._rope_tables(inv_freq, int(np.max(positions)) + 1)
        n = x.rows * heads * (head_dim // 2)
        self._dispatch("rope", None, None, (x.rows, heads, head_dim),
                       [x.buf, self._ints(positions), cos, sin, out.buf],
                       (*_grid(-(-n // 256)), 1))
        return out

    def write_kv(self, layer: int, k: GTensor, v: GTensor, slot_mapping: np.ndarray) -> None:
        if k.rows == 0:
            return
        be = self.be
        n = k.rows * k.cols
        subst = be.subst(be.kv_type) | {"POOLS": be.kv_write_pools}
        self._dispatch("kv_write", subst, None,
                       (k.rows, k.cols, be.block_size, be.blocks_per_part),
                       [k.buf, v.buf, self._ints(slot_mapping), *be.k_pools[layer],
                        *be.v_pools[layer]], (*_grid(-(-n // 256)), 1))

    def paged_attention(self, layer: int, q: GTensor, batch: BatchInput, heads: int,
                        kv_heads: int, head_dim: int, scale: float) -> GTensor:
        out = self._new(q.rows, q.cols)
        if q.rows == 0:
            return out
        if q.rows > MAX_GROUPS:
            raise WgpuError(f"paged_attention: {q.rows} query rows in one step "
                            f"(at most {MAX_GROUPS})")
        g = heads // kv_heads
        be = self.be
        subst = be.subst(be.kv_type) | {"G": g, "HD": head_dim, "DPT": -(-head_dim // 64),
                                        "POOLS": be.attention_pools}
        params = (kv_heads, be.block_size, batch.block_tables.shape[1], batch.num_seqs,
                  float(scale), be.blocks_per_part)
        self._dispatch("paged_attention", subst, None, params,
                       [q.buf, self._ints(batch.block_tables), self._ints(batch.seq_lens),
                        self._ints(batch.query_start_loc), self._ints(batch.positions),
                        out.buf, *be.k_pools[layer], *be.v_pools[layer]],
                       (q.rows, kv_heads, 1))
        return out

    def _elementwise(self, shader: str, a: GTensor, b: GTensor) -> GTensor:
        if a.shape != b.shape:
            raise WgpuError(f"{shader}: shapes {a.shape} and {b.shape} differ")
        out = self._new(a.rows, a.cols)
        n = a.rows * a.cols
        if n:
            self._dispatch(shader, None, None, (n,), [a.buf, b.buf, out.buf],
                           (*_grid(-(-n // 256)), 1))
        return out

    def silu_mul(self, gate: GTensor, up: GTensor) -> GTensor:
        return self._elementwise("silu_mul", gate, up)

    def add(self, a: GTensor, b: GTensor) -> GTensor:
        return self._elementwise("add", a, b)

    def take_rows(self, x: GTensor, rows: np.ndarray) -> GTensor:
        rows = np.asarray(rows)
        if rows.size == x.rows and np.array_equal(rows, np.arange(rows.size)):
            return x
        out = self._new(rows.size, x.cols)
        if rows.size:  # the embedding gather, with the activation as the table
            params = (rows.size, x.cols, 0, x.rows)
            self._dispatch("embedding", self.be.subst("f32"), None, params,
                           [x.buf, self._ints(rows), out.buf],
                           (*_grid(-(-rows.size * x.cols // 256)), 1))
        return out

    def _logit_chunks(self, x: GTensor, lm_head: _Matrix) -> list[tuple[int, int]]:
        # Rows per logits buffer, so that none exceeds one storage binding.
        per = max(1, self.be.max_binding // (lm_head.out_features * 4))
        return [(lo, min(x.rows, lo + per)) for lo in range(0, x.rows, per)]

    def logits(self, x: GTensor, lm_head: _Matrix) -> np.ndarray:
        """The step's float32 logits: ends the encoder, submits it, reads back."""
        vocab = lm_head.out_features
        if x.rows == 0:
            self.flush()
            return np.zeros((0, vocab), F32)
        outs = []
        for lo, hi in self._logit_chunks(x, lm_head):
            xs = x if (lo, hi) == (0, x.rows) else self.take_rows(x, np.arange(lo, hi))
            outs.append(self._linear(xs, lm_head))
        raws = self.flush([(o.buf, o.nbytes) for o in outs])
        return np.concatenate([np.frombuffer(r, F32).reshape(-1, vocab) for r in raws]).copy()

    def topk(self, x: GTensor, lm_head: _Matrix, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids int32, logits float32) ``[rows, k]`` of the logits of ``x``, computed
        on the GPU: the readback is ``rows * k`` pairs, not ``rows * vocab`` floats. Ties go
        to the lower id."""
        if not 1 <= k <= 64:
            raise WgpuError(f"topk: k={k} (1..64)")
        if x.rows == 0:
            self.flush()
            return np.zeros((0, k), np.int32), np.zeros((0, k), F32)
        ids_all, vals_all = [], []
        for lo, hi in self._logit_chunks(x, lm_head):
            xs = x if (lo, hi) == (0, x.rows) else self.take_rows(x, np.arange(lo, hi))
            logits = self._linear(xs, lm_head)
            n = hi - lo
            ids, vals = self._new(n, k), self._new(n, k)
            self._dispatch("topk", {"K": k}, None, (lm_head.out_features,),
                           [logits.buf, ids.buf, vals.buf], (n, 1, 1))
            ids_all.append(ids)
            vals_all.append(vals)
        reads = [(t.buf, t.nbytes) for t in ids_all] + [(t.buf, t.nbytes) for t in vals_all]
        raws = self.flush(reads)
        m = len(ids_all)
        ids = np.concatenate([np.frombuffer(r, np.int32).reshape(-1, k) for r in raws[:m]])
        vals = np.concatenate([np.frombuffer(r, F32).reshape(-1, k) for r in raws[m:]])
        return ids.copy(), vals.copy()


# -- backend ------------------------------------------------------------------------------------
class WgpuBackend(Backend):
    """The model on a WebGPU adapter through wgpu (Vulkan, Metal, D3D12; lavapipe on a CPU)."""

    name = "wgpu"

    def __init__(self, model: ModelDir, *, num_blocks: int, block_size: int = 16,
                 dtype: str | None = None, max_binding: int | None = None):
        super().__init__(model, num_blocks=num_blocks, block_size=block_size)
        adapter = choose_adapter()
        self.dtype_name = dtype or default_dtype(adapter)
        if self.dtype_name not in DTYPES:
            raise BackendUnavailableError(
                f"wgpu dtype {self.dtype_name!r}: choose {' or '.join(DTYPES)}")
        self.f16 = self.dtype_name == "float16"
        if self.f16 and "shader-f16" not in adapter.features:
            raise BackendUnavailableError(
                f"wgpu dtype float16 needs shader-f16, which {_info(adapter).name} lacks")
        self.dev = get_device(adapter, self.f16)
        self.adapter_info = self.dev.info
        # max_binding below the adapter's limit: splitting exercised without huge tensors.
        self.max_binding = min(max_binding or self.dev.max_binding, self.dev.max_binding)
        self.kv_type = "f16" if self.f16 else "f32"
        self._part_biases: dict[tuple[int, int], Any] = {}
        c = self.config
        width = c.num_key_value_heads * c.head_dim
        item = 2 if self.f16 else 4
        block_bytes = block_size * width * item
        if block_bytes % 4:
            raise WgpuError(f"KV block of {block_size} x {width} f16 values is not a whole "
                            "number of 4-byte words; use an even block size")
        # A layer's K (and V) pool is one buffer per part of at most one storage binding;
        # the KV kernels bind every part.
        self.blocks_per_part = self.max_binding // block_bytes
        if self.blocks_per_part < 1:
            raise WgpuError(f"one KV block of {block_bytes} bytes exceeds the adapter's storage "
                            f"binding limit of {self.max_binding} bytes; use a smaller block size")
        self.kv_parts = -(-num_blocks // self.blocks_per_part)
        max_parts = max_kv_parts(self.dev.max_storage_buffers)
        if self.kv_parts > max_parts:
            raise WgpuError(
                f"KV pool of {num_blocks * block_bytes} bytes per layer needs {self.kv_parts} "
                f"storage bindings of at most {self.max_binding} bytes; the adapter allows "
                f"{max_parts}; ask for less KV memory")
        self.ops = WgpuOps(self)
        self.params = self.model.load_params(model, WgpuLoader(self, model))
        usage = BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST
        sizes = [max(16, -(-min(self.blocks_per_part, num_blocks - first) * block_bytes // 16)
                     * 16) for first in range(0, num_blocks, self.blocks_per_part)]
        # New buffers are zero-filled by WebGPU: no first-touch cost later.
        self.k_pools = [[self.dev.device.create_buffer(size=n, usage=usage) for n in sizes]
                        for _ in range(c.num_hidden_layers)]
        self.v_pools = [[self.dev.device.create_buffer(size=n, usage=usage) for n in sizes]
                        for _ in range(c.num_hidden_layers)]
        self._block_bytes = block_bytes
        # The pool parts' WGSL, fixed for this backend (after kv_write's 3 inputs, after
        # paged attention's 6 other buffers).
        self.kv_write_pools = self.pool_code(4, write=True)
        self.attention_pools = self.pool_code(7, write=False)
        self.ops.flush()

    def pool_code(self, first_binding: int, write: bool) -> str:
        """WGSL of the KV pool parts: K parts then V parts from ``first_binding``, and
        ``kload``/``vload(part, i) -> f32`` (reads) or ``kstore``/``vstore(part, i, x)``."""
        n, kt = self.kv_parts, self.kv_type
        access = "read_write" if write else "read"
        lines = [f"@group(0) @binding({first_binding + kv * n + i}) var<storage, {access}> "
                 f"{name}_pool{i}: array<{kt}>;"
                 for kv, name in enumerate("kv") for i in range(n)]
        for name in "kv":
            if write:
                body = [f"{name}_pool{i}[i] = x;" for i in range(n)]
                head, tail = f"fn {name}store(part: u32, i: u32, x: {kt}) {{", "}"
            else:
                body = [f"r = f32({name}_pool{i}[i]);" for i in range(n)]
                head, tail = f"fn {name}load(part: u32, i: u32) -> f32 {{ var r: f32;", "return r; }"
            if n == 1:
                lines.append(f"{head} {body[0]} {tail}")
            else:
                cases = " ".join(f"case {i}u: {{ {b} }}" for i, b in enumerate(body[:-1]))
                lines.append(f"{head} switch part {{ {cases} default: {{ {body[-1]} }} }} {tail}")
        return "\n".join(lines)

    def subst(self, wtype: str, vec: int = 1) -> dict[str, str]:
        """Template values for a kernel reading elements of ``wtype`` in vectors of ``vec``."""
        enable = "enable f16;" if self.f16 else ""
        if vec == 4:
            return {"ENABLE": enable, "WT": wtype, "KT": wtype, "WV": f"vec4<{wtype}>",
                    "XV": "vec4<f32>", "DOT": "dot"}
        return {"ENABLE": enable, "WT": wtype, "KT": wtype, "WV": wtype, "XV": "f32",
                "DOT": "mul1"}

    @classmethod
    def dtypes(cls) -> tuple[str, ...]:
        """The dtypes the chosen adapter can run (float16 needs shader-f16)."""
        adapter = choose_adapter()
        return DTYPES if "shader-f16" in adapter.features else ("float32",)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            adapter = choose_adapter()
            dtype = default_dtype(adapter)
        except BackendUnavailableError as err:
            return False, str(err)
        return True, f"{_info(adapter).describe()}, {dtype}"

    @classmethod
    def kv_bytes_per_token(cls, config: ModelConfig, itemsize: int | None = None) -> int:
        """KV bytes per token in the dtype the default adapter stores KV in."""
        if itemsize is None:
            try:
                itemsize = 2 if default_dtype(choose_adapter()) == "float16" else 4
            except BackendUnavailableError:
                itemsize = 4
        return Backend.kv_bytes_per_token(config, itemsize)

    @classmethod
    def max_kv_blocks(cls, config: ModelConfig, block_size: int) -> int | None:
        """Blocks whose per-layer K (or V) pool fits the storage bindings the KV kernels can
        take on the adapter."""
        try:
            limits = choose_adapter().limits
        except BackendUnavailableError:
            return None
        per_token = cls.kv_bytes_per_token(config) // (2 * config.num_hidden_layers)
        per_part = int(limits["max-storage-buffer-binding-size"]) // (per_token * block_size)
        parts = max_kv_parts(int(limits["max-storage-buffers-per-shader-stage"]))
        return max(1, per_part * parts)

    def forward(self, batch: BatchInput) -> np.ndarray:
        return self.model.forward(self.ops, self.params, batch)

    def forward_topk(self, batch: BatchInput, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`forward`, but returns the top-``k`` (ids, logits) of each row asked
        for, selected on the GPU (greedy decoding reads back a few bytes per row)."""
        ops = _TopkOps(self.ops, k)
        self.model.forward(ops, self.params, batch)
        return ops.result

    # -- KV blocks ---------------------------------------------------------------------------
    def _runs(self, ids: list[int]) -> list[tuple[int, int, int, int]]:
        """(position in ids, pool part, first block within the part, count) of runs of
        consecutive block ids that lie in one part."""
        runs = []
        for i, b in enumerate(ids):
            part, local = divmod(b, self.blocks_per_part)
            if runs and runs[-1][1] == part and runs[-1][2] + runs[-1][3] == local:
                p, _, first, n = runs[-1]
                runs[-1] = (p, part, first, n + 1)
            else:
                runs.append((i, part, local, 1))
        return runs

    def _check_ids(self, ids) -> list[int]:
        ids = [int(b) for b in ids]
        bad = [b for b in ids if not 0 <= b < self.num_blocks]
        if bad:
            raise WgpuError(f"block ids {bad[:4]} outside the pool of {self.num_blocks}")
        return ids

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = self._check_ids([s for s, _ in pairs])
        dst = self._check_ids([d for _, d in pairs])
        bb = self._block_bytes
        # A buffer cannot be copied into itself: go through a scratch buffer.
        scratch = self.dev.take(bb * len(pairs), BUF.COPY_SRC | BUF.COPY_DST)
        enc = self.ops._commands()
        per = self.blocks_per_part
        for parts in (*self.k_pools, *self.v_pools):
            for i, s in enumerate(src):
                enc.copy_buffer_to_buffer(parts[s // per], s % per * bb, scratch, i * bb, bb)
            for i, d in enumerate(dst):
                enc.copy_buffer_to_buffer(scratch, i * bb, parts[d // per], d % per * bb, bb)
        self.ops.flush()
        self.dev.give(scratch)

    def read_blocks(self, block_ids: list[int]) -> np.ndarray:
        ids = self._check_ids(block_ids)
        n = len(ids)
        if not n:
            return np.zeros(self.kv_block_shape(0), F32)
        bb = self._block_bytes
        layers = self.config.num_hidden_layers
        total = layers * 2 * n * bb
        stage = self.dev.take(total, BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST)
        enc = self.ops._commands()
        for layer in range(layers):
            for kv, parts in enumerate((self.k_pools[layer], self.v_pools[layer])):
                base = (layer * 2 + kv) * n * bb
                for pos, part, first, count in self._runs(ids):
                    enc.copy_buffer_to_buffer(parts[part], first * bb, stage, base + pos * bb,
                                              count * bb)
        [raw] = self.ops.flush([(stage, total)])
        self.dev.give(stage)
        data = np.frombuffer(raw, np.float16 if self.f16 else F32).astype(F32)
        return data.reshape(self.kv_block_shape(n))

    def write_blocks(self, block_ids: list[int], data: np.ndarray) -> None:
        ids = self._check_ids(block_ids)
        n = len(ids)
        if not n:
            return
        self.ops.flush()  # writes land before commands; nothing may be pending
        data = np.asarray(data, dtype=np.float16 if self.f16 else F32)
        data = data.reshape(self.config.num_hidden_layers, 2, n, -1)
        bb = self._block_bytes
        for layer in range(self.config.num_hidden_layers):
            for kv, parts in enumerate((self.k_pools[layer], self.v_pools[layer])):
                for pos, part, first, count in self._runs(ids):
                    chunk = np.ascontiguousarray(data[layer, kv, pos:pos + count])
                    self.dev.queue.write_buffer(parts[part], first * bb, chunk)
        self.ops.flush()

    def close(self) -> None:
        self.ops.flush()
        for parts in (*self.k_pools, *self.v_pools):
            for buf in parts:
                buf.destroy()
        self.k_pools, self.v_pools = [], []
        self.params = None


class _TopkOps:
    """The backend's ops with ``logits`` replaced by the GPU top-k (for forward_topk)."""

    def __init__(self, ops: WgpuOps, k: int):
        self._ops, self._k = ops, k
        self.result: tuple[np.ndarray, np.ndarray] | None = None

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def logits(self, x, lm_head):
        self.result = self._ops.topk(x, lm_head, self._k)
        return self.result


BACKEND = WgpuBackend
