"""The wgpu backend: the model on one WebGPU adapter, its weights and KV pool in storage
buffers, one submit and one readback per engine step."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...batch import BatchInput
from ...config import ModelConfig
from ...errors import BackendUnavailableError
from ...modeldir import ModelDir
from ...settings import WgpuOptions
from ..base import Backend, Capabilities
from .adapter import adapter_dtypes, adapter_info, choose_adapter, choose_dtype
from .device import get_device
from .kvpool import KVPool
from .loader import PACKED_BITS, WgpuLoader
from .ops import TopkOps, WgpuOps
from .wgsl import max_kv_parts

F32 = np.float32


class WgpuBackend(Backend):
    """The model on a WebGPU adapter through wgpu (Vulkan, Metal, D3D12; lavapipe on a CPU).

    ``options`` (:class:`~ondevice.settings.WgpuOptions`) pick the adapter and the dtype; None
    takes them from the environment. ``max_binding`` lowers the storage binding limit below
    the adapter's, so that tests exercise split tensors and KV pools without huge models.
    """

    name = "wgpu"
    options_class = WgpuOptions
    # KV is f16 or f32 by the chosen dtype: kv_bytes_per_token asks the adapter.
    capabilities = Capabilities(device_topk=True, packed_bits=PACKED_BITS)

    def __init__(self, model_dir: ModelDir, *, num_blocks, block_size: int = 16,
                 options: WgpuOptions | None = None, max_binding: int | None = None,
                 kv_layout=None):
        super().__init__(model_dir, num_blocks=num_blocks, block_size=block_size,
                         options=options, kv_layout=kv_layout)
        opts: WgpuOptions = self.options
        adapter = choose_adapter(opts.adapter)
        self.dtype_name = choose_dtype(adapter, opts.dtype)
        self.f16 = self.dtype_name == "float16"
        self.dev = get_device(adapter, self.f16)
        self.adapter_info = self.dev.info
        self.max_binding = min(max_binding or self.dev.max_binding, self.dev.max_binding)
        # The KV pools first (one per KV group): a pool the adapter cannot bind fails before
        # the weights load.
        self.kv_pools = [
            KVPool(self.dev, self.config, num_blocks=blocks, block_size=block_size, f16=self.f16,
                   max_binding=self.max_binding, layers=len(self.kv_layout.layers(g)))
            for g, blocks in enumerate(self.group_blocks)]
        self.kv = self.kv_pools[0]
        self.ops = WgpuOps(self.dev, self.kv_pools, f16=self.f16, block_size=block_size,
                           max_binding=self.max_binding,
                           max_positions=min(self.config.max_position_embeddings,
                                             self.num_blocks * block_size),  # the pool's reach
                           layer_pools=self.layer_pools)
        loader = WgpuLoader(self.dev, model_dir, f16=self.f16, max_binding=self.max_binding)
        self.params = self.model.load_params(model_dir, loader)
        self.ops.flush()

    # -- what it can run here ----------------------------------------------------------------
    @classmethod
    def dtypes(cls, options: WgpuOptions | None = None) -> tuple[str, ...]:
        """The dtypes the chosen adapter can run (float16 needs shader-f16)."""
        return adapter_dtypes(choose_adapter(options.adapter if options else None))

    @classmethod
    def availability(cls, options: WgpuOptions | None = None) -> tuple[bool, str]:
        opts = options or WgpuOptions()
        try:
            adapter = choose_adapter(opts.adapter)
            dtype = choose_dtype(adapter, opts.dtype)
        except BackendUnavailableError as err:
            return False, str(err)
        return True, f"{adapter_info(adapter).describe()}, {dtype}"

    @classmethod
    def kv_bytes_per_token(cls, config: ModelConfig, options: WgpuOptions | None = None) -> int:
        """KV bytes per token in the dtype the chosen adapter stores KV in."""
        opts = options or WgpuOptions()
        try:
            itemsize = 2 if choose_dtype(choose_adapter(opts.adapter), opts.dtype) == "float16" \
                else 4
        except BackendUnavailableError:
            itemsize = 4
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim \
            * itemsize

    @classmethod
    def max_kv_blocks(cls, config: ModelConfig, block_size: int,
                      options: WgpuOptions | None = None) -> int | None:
        """Blocks whose per-layer K (or V) pool fits the storage bindings the KV kernels can
        take on the adapter."""
        try:
            limits = choose_adapter(options.adapter if options else None).limits
        except BackendUnavailableError:
            return None
        per_token = cls.kv_bytes_per_token(config, options) // (2 * config.num_hidden_layers)
        per_part = int(limits["max-storage-buffer-binding-size"]) // (per_token * block_size)
        parts = max_kv_parts(int(limits["max-storage-buffers-per-shader-stage"]))
        return max(1, per_part * parts)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.adapter_info.describe(),
                "dtype": self.dtype_name}

    # -- running -----------------------------------------------------------------------------
    def to_device(self, array: np.ndarray) -> Any:
        return self.ops.from_host(array)

    def to_host(self, x: Any) -> np.ndarray:
        return self.ops.to_host(x)

    def forward(self, batch: BatchInput) -> np.ndarray:
        self.check_batch(batch)
        return self.model.forward(self.ops, self.params, batch)

    def forward_topk(self, batch: BatchInput, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`forward`, but returns the top-``k`` (ids, logits) of each row asked
        for, selected on the GPU (greedy decoding reads back a few bytes per row)."""
        self.check_batch(batch)
        ops = TopkOps(self.ops, k)
        self.model.forward(ops, self.params, batch)
        return ops.result

    # -- KV blocks ---------------------------------------------------------------------------
    def copy_blocks(self, pairs: list[tuple[int, int]], group: int = 0) -> None:
        self.kv_pools[group].copy(pairs, self.ops)

    def read_blocks(self, block_ids: list[int], group: int = 0) -> np.ndarray:
        if not len(block_ids):
            return np.zeros(self.kv_block_shape(0, group), F32)
        return self.kv_pools[group].read(block_ids, self.ops).reshape(
            self.kv_block_shape(len(block_ids), group))

    def write_blocks(self, block_ids: list[int], data: np.ndarray, group: int = 0) -> None:
        self.kv_pools[group].write(block_ids, data, self.ops)

    def close(self) -> None:
        self.ops.flush()
        for pool in self.kv_pools:
            pool.destroy()
        self.params = None
