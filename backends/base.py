"""The backend contract: the ``Ops`` the model definition calls, and ``Backend`` itself.

A backend owns the weights in its own form and the physical paged KV pool, indexed by block
id. The engine hands it a :class:`~ondevice.batch.BatchInput` per step and gets float32 logits
back. The NumPy backend is the living definition of every op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from ..batch import BatchInput
from ..config import ModelConfig
from ..errors import OndeviceError
from ..kv.layout import KVLayout
from ..modeldir import ModelDir
from ..models import model_for
from ..settings import BackendOptions, NumpyOptions

F32 = np.float32


class Ops(Protocol):
    """What the model definition needs. ``X`` is the backend's array type, always 2-D
    ``[T, features]``; weights are the handles the backend's loader returned."""

    def embedding(self, table: Any, ids: np.ndarray) -> Any: ...
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...
    def linear(self, x: Any, w: Any) -> Any: ...  # x @ W.T (+ bias), W dense or quantized
    def rope(self, x: Any, positions: np.ndarray, inv_freq: np.ndarray, heads: int,
             head_dim: int) -> Any: ...
    def write_kv(self, layer: int, k: Any, v: Any, slot_mapping: np.ndarray) -> None: ...
    # window > 0 (Gemma 3's local layers): the query at position p sees keys p-window+1 .. p.
    def paged_attention(self, layer: int, q: Any, batch: BatchInput, heads: int,
                        kv_heads: int, head_dim: int, scale: float, window: int = 0) -> Any: ...
    def silu_mul(self, gate: Any, up: Any) -> Any: ...
    # Gemma 3: gelu_tanh(gate) * up; RMS norm of each head_dim slice of [T, heads*head_dim]
    # with one [head_dim] weight; x * a Python scalar (the embedding's sqrt(hidden)).
    def gelu_tanh_mul(self, gate: Any, up: Any) -> Any: ...
    def head_rms_norm(self, x: Any, weight: Any, eps: float, heads: int, head_dim: int) -> Any: ...
    def scale(self, x: Any, factor: float) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def take_rows(self, x: Any, rows: np.ndarray) -> Any: ...
    def logits(self, x: Any, lm_head: Any) -> np.ndarray: ...  # float32 host array


class Loader(Protocol):
    """Turns checkpoint tensors into backend weight handles."""

    def embedding(self, w: Any) -> Any: ...
    def linear(self, w: Any, bias: np.ndarray | None) -> Any: ...
    def norm(self, w: np.ndarray) -> Any: ...
    def tied_lm_head(self, embed: Any, w: Any) -> Any: ...


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond the required contract; the engine, bench, policy and tests
    ask these, never ``hasattr``.

    device_topk: :meth:`Backend.forward_topk` returns the top-k ids/values computed on the
        device, so greedy steps read back one id per row instead of the whole logits row.
    packed_bits: bit widths whose quantized weights stay packed in memory (the others are
        expanded to the compute dtype at load). The policy sizes memory from it.
    kv_itemsize: bytes per stored KV element (4 float32, 2 float16) unless the backend's
        :meth:`Backend.kv_bytes_per_token` says otherwise for its options.
    window_paging: the backend keeps sliding-window layers in a KV group of their own, whose
        blocks leave the pool once outside the window (see ``ondevice.kv.layout``).
    """

    device_topk: bool = False
    packed_bits: frozenset[int] = frozenset()
    kv_itemsize: int = 4
    window_paging: bool = True


class Backend(ABC):
    """A model loaded on one device with its paged KV pool.

    Beyond the abstract methods, every backend exposes ``ops`` (its :class:`Ops`), ``params``
    (the loaded weight handles) and ``dtype_name`` (its compute dtype): the op conformance
    harness drives them directly, moving arrays with :meth:`to_device` / :meth:`to_host`.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    options_class: ClassVar[type[BackendOptions]] = NumpyOptions
    dtype_name: str = "float32"
    ops: Any
    params: Any

    def __init__(self, model_dir: ModelDir, *, num_blocks: int | Sequence[int],
                 block_size: int = 16, options: BackendOptions | None = None,
                 kv_layout: KVLayout | None = None):
        """``num_blocks``: blocks of each KV group's pool (one int: the same for every group).
        ``kv_layout``: the KV groups (default: :meth:`default_kv_layout`)."""
        layout = kv_layout or self.default_kv_layout(model_dir.config)
        if layout.num_layers != model_dir.config.num_hidden_layers or (
                layout.num_groups > 1 and not self.capabilities.window_paging):
            raise OndeviceError(f"backend {self.name!r} cannot keep the KV groups {layout}")
        counts = ((num_blocks,) * layout.num_groups if isinstance(num_blocks, int)
                  else tuple(int(n) for n in num_blocks))
        if len(counts) != layout.num_groups or min(counts) <= 0 or block_size <= 0:
            raise OndeviceError(f"invalid KV pool: {num_blocks} blocks of {block_size} tokens "
                                f"for {layout.num_groups} KV group(s)")
        if options is None:
            options = self.options_class.from_env()
        elif not isinstance(options, self.options_class):
            raise OndeviceError(f"backend {self.name!r} takes {self.options_class.__name__}, "
                                f"not {type(options).__name__}")
        self.options = options
        self.config: ModelConfig = model_dir.config
        # A draft model's trimmed head: the token id of each logits column (None: column i
        # is token i, the whole vocabulary).
        self.head_ids: np.ndarray | None = model_dir.draft_head_ids
        self.kv_layout = layout
        self.group_blocks: tuple[int, ...] = counts
        self.num_blocks = counts[0]  # group 0 (full attention): it bounds a sequence's context
        self.block_size = block_size
        self.model = model_for(model_dir.config)(model_dir.config)
        # Each layer's (group, index within the group's pool).
        self.layer_pools = [(layout.layer_group[i], layout.index_in_group(i))
                            for i in range(layout.num_layers)]

    @classmethod
    def default_kv_layout(cls, config: ModelConfig, paging: bool = True) -> KVLayout:
        """The KV groups this backend keeps for ``config``: windowed layers in a group of
        their own where the backend pages windows (and ``paging`` is on), else one group."""
        return KVLayout.for_config(config, paging and cls.capabilities.window_paging)

    def kv_group_block_bytes(self) -> tuple[int, ...]:
        """Bytes of one block of each KV group's pool (its layers' K and V)."""
        per_layer = self.kv_bytes_per_token(self.config, self.options) \
            // self.config.num_hidden_layers * self.block_size
        return tuple(len(self.kv_layout.layers(g)) * per_layer
                     for g in range(self.kv_layout.num_groups))

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, device description or the reason it is not)."""
        return True, "cpu"

    @classmethod
    def dtypes(cls, options: BackendOptions | None = None) -> tuple[str, ...]:
        """The compute dtypes this backend can run here (its options may pick one)."""
        return (cls.dtype_name,)

    def describe(self) -> dict[str, Any]:
        """What this loaded backend runs on: device, compute dtype, weight storage."""
        return {"backend": self.name, "device": self.availability()[1], "dtype": self.dtype_name}

    @classmethod
    def kv_bytes_per_token(cls, config: ModelConfig, options: BackendOptions | None = None) -> int:
        """Bytes of K and V one token occupies in this backend's pool."""
        return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                * cls.capabilities.kv_itemsize)

    @classmethod
    def max_kv_blocks(cls, config: ModelConfig, block_size: int,
                      options: BackendOptions | None = None) -> int | None:
        """The largest KV pool (in blocks) this backend can hold here; None: no limit beyond
        memory. A default-sized pool is clamped to it."""
        return None

    def forward_topk(self, batch: BatchInput, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids int32, logits float32), each ``[R, k]``, computed on the device.
        Only backends whose ``capabilities.device_topk`` is true implement it."""
        raise NotImplementedError(f"backend {self.name!r} has no device top-k")

    def to_device(self, array: np.ndarray) -> Any:
        """A host float32 array as this backend's activation type."""
        return array

    def to_host(self, x: Any) -> np.ndarray:
        """An activation back as a host NumPy array."""
        return np.asarray(x)

    @abstractmethod
    def forward(self, batch: BatchInput) -> np.ndarray:
        """float32 logits ``[len(batch.logits_indices), vocab]``; writes the batch's K/V."""

    @abstractmethod
    def copy_blocks(self, pairs: list[tuple[int, int]], group: int = 0) -> None:
        """Copy the KV of block ``src`` into block ``dst`` of KV group ``group``'s pool for
        each pair (copy-on-write)."""

    def kv_block_shape(self, num_blocks: int, group: int = 0) -> tuple[int, ...]:
        """Shape of :meth:`read_blocks` for ``num_blocks`` blocks of ``group`` (a portable
        layout: the group's layers in model order)."""
        c = self.config
        return (len(self.kv_layout.layers(group)), 2, num_blocks, self.block_size,
                c.num_key_value_heads, c.head_dim)

    @abstractmethod
    def read_blocks(self, block_ids: list[int], group: int = 0) -> np.ndarray:
        """float32 KV of these blocks of ``group`` in :meth:`kv_block_shape` layout (prompt
        caches)."""

    @abstractmethod
    def write_blocks(self, block_ids: list[int], data: np.ndarray, group: int = 0) -> None:
        """Inverse of :meth:`read_blocks`."""

    def check_batch(self, batch: BatchInput) -> None:
        """Refuse a batch built for other KV groups than this backend's pools."""
        groups = self.kv_layout.layer_group if self.kv_layout.num_groups > 1 else ()
        if batch.layer_groups and batch.layer_groups != groups:
            raise OndeviceError(f"the batch's KV groups {batch.layer_groups} are not the "
                                f"backend's {groups}")

    def close(self) -> None:  # noqa: B027  (optional hook: most backends free on GC)
        """Release device memory."""


# -- helpers every backend shares --------------------------------------------------------------
RELEASE_EVERY = 64 << 20  # bytes copied between drops of the checkpoint's mapped pages


class PageRelease:
    """Counts bytes copied out of a memory-mapped checkpoint during load and drops the file's
    mapped pages every ``every`` bytes, so that the mapping and the backend's copy never add up
    in the process's resident memory."""

    def __init__(self, model_dir: ModelDir, every: int = RELEASE_EVERY):
        self.model_dir = model_dir
        self.every = every
        self._copied = 0

    def copied(self, nbytes: int) -> None:
        self._copied += int(nbytes)
        if self._copied >= self.every:
            self.model_dir.weights.release_pages()
            self._copied = 0


class RopeTables:
    """cos/sin ``[T, head_dim / 2]`` (float32) for one step's positions and one RoPE base.

    Computed from the step's positions, not tabulated over the whole context: memory stays
    proportional to the step whatever context length a config claims. The last few results
    are kept, since every layer of a step asks for the same positions.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._cache: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (np.asarray(positions).tobytes(), id(inv_freq))
        hit = self._cache.get(key)
        if hit is None:
            angles = np.asarray(positions, dtype=F32)[:, None] * np.asarray(inv_freq, F32)[None, :]
            hit = (np.cos(angles), np.sin(angles))
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit


@dataclass(frozen=True)
class AttentionPlan:
    """Per-step attention metadata, built once per batch (vLLM builds its attention metadata
    the same way) and shared by every layer: which rows each sequence owns, its context
    length and its blocks."""

    starts: np.ndarray  # int64 [S]: first query row of each sequence
    ends: np.ndarray  # int64 [S]: one past its last query row
    lens: np.ndarray  # int64 [S]: context length including this step's tokens
    num_blocks: np.ndarray  # int64 [S]: blocks holding that context
    decode_only: bool  # every sequence has exactly one query row

    @classmethod
    def build(cls, batch: BatchInput, block_size: int) -> AttentionPlan:
        qsl = batch.query_start_loc.astype(np.int64)
        lens = batch.seq_lens.astype(np.int64)
        starts, ends = qsl[:-1], qsl[1:]
        return cls(starts, ends, lens, -(-lens // block_size),
                   bool(np.all(ends - starts == 1)))

    def sequences(self):
        """``(s, start, end, length, n_blocks)`` for each sequence with rows in this step."""
        for s in range(len(self.lens)):
            start, end = int(self.starts[s]), int(self.ends[s])
            if end > start:
                yield s, start, end, int(self.lens[s]), int(self.num_blocks[s])
