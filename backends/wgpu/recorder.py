"""The step recorder: one command encoder per engine step, submitted once.

Every op records its dispatches into one compute pass; :meth:`StepRecorder.flush` ends it,
copies what the caller reads back into mapped staging buffers, submits once and reads back.
So an engine step is one submit and one readback. Bind groups and the small uniform parameter
buffers are cached, and host index arrays are uploaded once per step.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import wgpu

from .device import ACT, BUF, PARAM_CACHE, UPLOAD, Device, GTensor, pipeline_key, pool_size

F32 = np.float32
MAX_GROUPS = 65535  # workgroups per grid dimension (the WebGPU default limit)


def grid(groups: int) -> tuple[int, int]:
    """A 1-D count of workgroups as an (x, y) grid within the per-dimension limit."""
    if groups <= MAX_GROUPS:
        return max(groups, 1), 1
    y = -(-groups // MAX_GROUPS)
    return -(-groups // y), y


class StepRecorder:
    """Records dispatches and copies for one step on ``dev`` and submits them in one go."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.device = dev.device
        self._encoder = None
        self._pass = None
        self._uploads: list[Any] = []
        # Upload buffers of their own, by size: reused only after the step was submitted.
        self._upload_free: dict[int, list[Any]] = {}
        self._step: dict[int, tuple[Any, Any]] = {}
        self._groups: dict[tuple, Any] = {}
        self._dummy = dev.buffer(np.zeros(4, F32))
        self.dispatches = 0  # dispatches recorded since the last flush (for tests, benchmarks)
        self.last_flush: dict[str, float] = {}

    # -- recording ---------------------------------------------------------------------------
    def _compute_pass(self):
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        if self._pass is None:
            self._pass = self._encoder.begin_compute_pass()
        return self._pass

    def commands(self):
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

    def dispatch(self, shader: str, subst: dict | None, constants: dict | None,
                 params: tuple, buffers: list, workgroups: tuple[int, ...]) -> None:
        """Record kernel ``shader`` over ``workgroups`` with uniform ``params`` (binding 0)
        and ``buffers`` (bindings 1...)."""
        pipe = self.dev.pipeline(shader, subst, constants)
        group = self._bind_group(pipeline_key(shader, subst, constants), pipe,
                                 (self.dev.params(params), *buffers))
        cp = self._compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, group)
        cp.dispatch_workgroups(*workgroups)
        self.dispatches += 1

    def new(self, rows: int, cols: int) -> GTensor:
        """A float32 activation ``[rows, cols]`` in a pooled buffer."""
        return GTensor(self.dev, self.dev.take(rows * cols * 4, ACT), rows, cols)

    def upload(self, a: np.ndarray) -> Any:
        """A buffer holding host data for this step. Upload buffers are written with
        ``queue.write_buffer``, which lands before the step's commands run, so they are not
        reused until the step is submitted; nor may an upload take a buffer that this step's
        commands still write (an activation freed earlier in the step would overwrite the
        upload when the commands run), so they come from a pool of their own."""
        raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        free = self._upload_free.get(pool_size(raw.size))
        buf = free.pop() if free else self.dev.keep(
            self.device.create_buffer(size=pool_size(raw.size), usage=UPLOAD))
        if raw.size:
            if raw.size % 4:
                raw = np.concatenate([raw, np.zeros(4 - raw.size % 4, np.uint8)])
            self.dev.queue.write_buffer(buf, 0, raw)
        self._uploads.append(buf)
        return buf

    def ints(self, a: np.ndarray) -> Any:
        """An int32 upload of an index array, once per step for the same array object (the
        model passes the batch's arrays to every layer)."""
        hit = self._step.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        buf = self.upload(np.asarray(a, dtype=np.int32))
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
            enc = self.commands()
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
        # Back in reverse, so that the next step of the same shape pops them in the same order
        # (and finds its bind groups cached).
        for buf in reversed(self._uploads):
            self._upload_free.setdefault(buf.size, []).append(buf)
        self._uploads.clear()
        self.dev.new_step()
        self._step.clear()
        self.last_flush = {"submit_s": t1 - t0, "wait_readback_s": t2 - t1,
                           "dispatches": self.dispatches}
        self.dispatches = 0
        return out

    # -- host <-> device ---------------------------------------------------------------------
    def from_host(self, a: np.ndarray) -> GTensor:
        """A host array (2-D, or flattened to 2-D) as a float32 activation."""
        a = np.ascontiguousarray(a, dtype=F32)
        a2 = a.reshape(a.shape[0], -1) if a.ndim != 2 else a
        t = self.new(*a2.shape)
        src = self.upload(a2)
        if a2.size:
            self.commands().copy_buffer_to_buffer(src, 0, t.buf, 0, a2.nbytes)
        return t

    def to_host(self, x: GTensor) -> np.ndarray:
        """An activation read back (submits what is recorded)."""
        if x.rows * x.cols == 0:
            self.flush()
            return np.zeros(x.shape, F32)
        [raw] = self.flush([(x.buf, x.nbytes)])
        return np.frombuffer(raw, dtype=F32).reshape(x.shape).copy()
