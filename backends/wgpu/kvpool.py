"""The paged KV pool on the device, and block I/O (copy-on-write, prompt caches).

A layer's K (and V) pool is one buffer per part of at most one storage binding; parts hold
whole blocks, and the KV kernels bind every part (block table lookups pick the part). New
buffers are zero-filled by WebGPU, so there is no first-touch cost later. A model with KV
groups (``ondevice.kv.layout``) has one pool per group, over that group's layers.
"""

from __future__ import annotations

import numpy as np

from ...config import ModelConfig
from .device import BUF, Device, WgpuError
from .recorder import StepRecorder
from .wgsl import (
    ATTENTION_FIRST_POOL_BINDING,
    KV_WRITE_FIRST_POOL_BINDING,
    kv_pool_code,
    max_kv_parts,
)

F32 = np.float32


class KVPool:
    """K and V of ``layers`` layers (default: every layer of the model): ``k[layer][part]``,
    ``v[layer][part]``, ``blocks_per_part`` blocks of ``block_size`` tokens each, stored as
    f16 or f32 (``kv_type``)."""

    def __init__(self, dev: Device, config: ModelConfig, *, num_blocks: int, block_size: int,
                 f16: bool, max_binding: int, layers: int | None = None):
        self.dev = dev
        self.config = config
        self.num_blocks = num_blocks
        self.f16 = f16
        self.kv_type = "f16" if f16 else "f32"
        width = config.num_key_value_heads * config.head_dim
        block_bytes = block_size * width * (2 if f16 else 4)
        if block_bytes % 4:
            raise WgpuError(f"KV block of {block_size} x {width} f16 values is not a whole "
                            "number of 4-byte words; use an even block size")
        self.block_bytes = block_bytes
        self.blocks_per_part = max_binding // block_bytes
        if self.blocks_per_part < 1:
            raise WgpuError(f"one KV block of {block_bytes} bytes exceeds the adapter's storage "
                            f"binding limit of {max_binding} bytes; use a smaller block size")
        self.parts = -(-num_blocks // self.blocks_per_part)
        allowed = max_kv_parts(dev.max_storage_buffers)
        if self.parts > allowed:
            raise WgpuError(
                f"KV pool of {num_blocks * block_bytes} bytes per layer needs {self.parts} "
                f"storage bindings of at most {max_binding} bytes; the adapter allows "
                f"{allowed}; ask for less KV memory")
        usage = BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST
        sizes = [max(16, -(-min(self.blocks_per_part, num_blocks - first) * block_bytes // 16)
                     * 16) for first in range(0, num_blocks, self.blocks_per_part)]
        self.layers = layers = config.num_hidden_layers if layers is None else layers
        self.k = [[dev.device.create_buffer(size=n, usage=usage) for n in sizes]
                  for _ in range(layers)]
        self.v = [[dev.device.create_buffer(size=n, usage=usage) for n in sizes]
                  for _ in range(layers)]
        # The parts' WGSL, fixed for this pool: built once, not per layer and step.
        self.write_code = kv_pool_code(self.parts, self.kv_type, KV_WRITE_FIRST_POOL_BINDING,
                                       write=True)
        self.attention_code = kv_pool_code(self.parts, self.kv_type,
                                           ATTENTION_FIRST_POOL_BINDING, write=False)

    def layer_buffers(self, layer: int) -> list:
        """Every K part then every V part of ``layer``, in binding order."""
        return [*self.k[layer], *self.v[layer]]

    # -- block I/O ---------------------------------------------------------------------------
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

    def copy(self, pairs: list[tuple[int, int]], rec: StepRecorder) -> None:
        """Copy block ``src`` into block ``dst`` for each pair, in every layer."""
        if not pairs:
            return
        src = self._check_ids([s for s, _ in pairs])
        dst = self._check_ids([d for _, d in pairs])
        bb, per = self.block_bytes, self.blocks_per_part
        # A buffer cannot be copied into itself: go through a scratch buffer.
        scratch = self.dev.take(bb * len(pairs), BUF.COPY_SRC | BUF.COPY_DST)
        enc = rec.commands()
        for parts in (*self.k, *self.v):
            for i, s in enumerate(src):
                enc.copy_buffer_to_buffer(parts[s // per], s % per * bb, scratch, i * bb, bb)
            for i, d in enumerate(dst):
                enc.copy_buffer_to_buffer(scratch, i * bb, parts[d // per], d % per * bb, bb)
        rec.flush()
        self.dev.give(scratch)

    def read(self, block_ids: list[int], rec: StepRecorder) -> np.ndarray:
        """float32 ``[layers, 2, n, block_size * kv_heads * head_dim]`` of these blocks."""
        ids = self._check_ids(block_ids)
        n, bb = len(ids), self.block_bytes
        layers = self.layers
        total = layers * 2 * n * bb
        stage = self.dev.take(total, BUF.STORAGE | BUF.COPY_SRC | BUF.COPY_DST)
        enc = rec.commands()
        for layer in range(layers):
            for kv, parts in enumerate((self.k[layer], self.v[layer])):
                base = (layer * 2 + kv) * n * bb
                for pos, part, first, count in self._runs(ids):
                    enc.copy_buffer_to_buffer(parts[part], first * bb, stage, base + pos * bb,
                                              count * bb)
        [raw] = rec.flush([(stage, total)])
        self.dev.give(stage)
        data = np.frombuffer(raw, np.float16 if self.f16 else F32).astype(F32)
        return data.reshape(layers, 2, n, -1)

    def write(self, block_ids: list[int], data: np.ndarray, rec: StepRecorder) -> None:
        """Inverse of :meth:`read` (any array of that many elements)."""
        ids = self._check_ids(block_ids)
        n = len(ids)
        if not n:
            return
        rec.flush()  # writes land before commands; nothing may be pending
        layers = self.layers
        data = np.asarray(data, dtype=np.float16 if self.f16 else F32).reshape(layers, 2, n, -1)
        bb = self.block_bytes
        for layer in range(layers):
            for kv, parts in enumerate((self.k[layer], self.v[layer])):
                for pos, part, first, count in self._runs(ids):
                    chunk = np.ascontiguousarray(data[layer, kv, pos:pos + count])
                    self.dev.queue.write_buffer(parts[part], first * bb, chunk)
        rec.flush()

    def destroy(self) -> None:
        """Free the pool's buffers now (not when garbage collection gets to them)."""
        for parts in (*self.k, *self.v):
            for buf in parts:
                buf.destroy()
        self.k, self.v = [], []
