"""The backend contract: the ``Ops`` the model definition calls, and ``Backend`` itself.

A backend owns the weights in its own form and the physical paged KV pool, indexed by block
id. The engine hands it a :class:`~ondevice.batch.BatchInput` per step and gets float32 logits
back. The NumPy backend is the living definition of every op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import numpy as np

from ..batch import BatchInput
from ..config import ModelConfig
from ..errors import OndeviceError
from ..modeldir import ModelDir
from ..models import model_for


class Ops(Protocol):
    """What the model definition needs. ``X`` is the backend's array type, always 2-D
    ``[T, features]``; weights are the handles the backend's loader returned."""

    def embedding(self, table: Any, ids: np.ndarray) -> Any: ...
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...
    def linear(self, x: Any, w: Any) -> Any: ...  # x @ W.T (+ bias), W dense or quantized
    def rope(self, x: Any, positions: np.ndarray, inv_freq: np.ndarray, heads: int,
             head_dim: int) -> Any: ...
    def write_kv(self, layer: int, k: Any, v: Any, slot_mapping: np.ndarray) -> None: ...
    def paged_attention(self, layer: int, q: Any, batch: BatchInput, heads: int,
                        kv_heads: int, head_dim: int, scale: float) -> Any: ...
    def silu_mul(self, gate: Any, up: Any) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def take_rows(self, x: Any, rows: np.ndarray) -> Any: ...
    def logits(self, x: Any, lm_head: Any) -> np.ndarray: ...  # float32 host array


class Loader(Protocol):
    """Turns checkpoint tensors into backend weight handles."""

    def embedding(self, w: Any) -> Any: ...
    def linear(self, w: Any, bias: np.ndarray | None) -> Any: ...
    def norm(self, w: np.ndarray) -> Any: ...
    def tied_lm_head(self, embed: Any, w: Any) -> Any: ...


class Backend(ABC):
    """A model loaded on one device with its paged KV pool."""

    name: ClassVar[str]

    def __init__(self, model: ModelDir, *, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise OndeviceError(f"invalid KV pool: {num_blocks} blocks of {block_size} tokens")
        self.config: ModelConfig = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.model = model_for(model.config)(model.config)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, device description or the reason it is not)."""
        return True, "cpu"

    @staticmethod
    def kv_bytes_per_token(config: ModelConfig, itemsize: int = 4) -> int:
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize

    @classmethod
    def max_kv_blocks(cls, config: ModelConfig, block_size: int) -> int | None:
        """The largest KV pool (in blocks) this backend can hold here; None: no limit beyond
        memory. A default-sized pool is clamped to it."""
        return None

    @abstractmethod
    def forward(self, batch: BatchInput) -> np.ndarray:
        """float32 logits ``[len(batch.logits_indices), vocab]``; writes the batch's K/V."""

    @abstractmethod
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block ``src`` into block ``dst`` for each pair (copy-on-write)."""

    def kv_block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of :meth:`read_blocks` for ``num_blocks`` blocks (a portable layout)."""
        c = self.config
        return (c.num_hidden_layers, 2, num_blocks, self.block_size, c.num_key_value_heads,
                c.head_dim)

    @abstractmethod
    def read_blocks(self, block_ids: list[int]) -> np.ndarray:
        """float32 KV of these blocks in :meth:`kv_block_shape` layout (prompt caches)."""

    @abstractmethod
    def write_blocks(self, block_ids: list[int], data: np.ndarray) -> None:
        """Inverse of :meth:`read_blocks`."""

    def close(self) -> None:  # noqa: B027  (optional hook: most backends free on GC)
        """Release device memory."""
