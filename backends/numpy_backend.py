"""The NumPy reference backend: float32, eager, and as plain as correctness allows.

Quantized weights are dequantized at load. The KV pool is one array per KV group
``[layers in the group, 2, num_blocks, block_size, kv_heads, head_dim]`` (one group, all layers,
unless the model has sliding-window layers); attention gathers each sequence's K/V through its
group's block table, so prefill chunks and decode rows share one code path.
"""

from __future__ import annotations

import math

import numpy as np

from ..batch import BatchInput
from ..modeldir import ModelDir, QuantizedTensor
from .base import AttentionPlan, Backend, PageRelease, RopeTables

F32 = np.float32


class _Linear:
    __slots__ = ("w", "b")

    def __init__(self, w: np.ndarray, b: np.ndarray | None):
        self.w = w  # [out, in] float32, C-contiguous
        self.b = b


class NumpyLoader:
    """Copies every weight into float32 anonymous memory (huge pages, no file paging during
    decode), dropping the checkpoint's mapped pages as it goes so they never add up in RSS."""

    def __init__(self, model_dir: ModelDir):
        self.release = PageRelease(model_dir)

    def _dense(self, w) -> np.ndarray:
        out = w.dequantize() if isinstance(w, QuantizedTensor) else np.array(w, dtype=F32, order="C")
        self.release.copied(out.nbytes)
        return out

    def embedding(self, w) -> np.ndarray:
        return self._dense(w)

    def linear(self, w, bias) -> _Linear:
        return _Linear(self._dense(w), None if bias is None else self._dense(bias))

    def norm(self, w) -> np.ndarray:
        return self._dense(w)

    def tied_lm_head(self, embed: np.ndarray, w) -> _Linear:
        return _Linear(embed, None)  # shares the embedding's memory


class NumpyOps:
    """Every op of the ``Ops`` protocol on float32 NumPy arrays."""

    def __init__(self, kv: np.ndarray | list[np.ndarray], block_size: int,
                 layer_pools: list[tuple[int, int]] | None = None):
        """``kv``: one pool per KV group (one array: a single group of every layer);
        ``layer_pools[i]``: layer i's (group, index in the group's pool)."""
        self.kv = [kv] if isinstance(kv, np.ndarray) else list(kv)
        self.layer_pools = layer_pools or [(0, i) for i in range(self.kv[0].shape[0])]
        self.block_size = block_size
        self.rope_tables = RopeTables()
        self._plan: tuple[BatchInput, AttentionPlan] | None = None

    def plan(self, batch: BatchInput) -> AttentionPlan:
        """The step's attention metadata, built by the first layer and reused by the rest."""
        if self._plan is None or self._plan[0] is not batch:
            self._plan = (batch, AttentionPlan.build(batch, self.block_size))
        return self._plan[1]

    def layer_pool(self, layer: int) -> np.ndarray:
        """The KV of ``layer`` ``[2, blocks, block_size, kv_heads, head_dim]`` (in its KV
        group's pool)."""
        group, index = self.layer_pools[layer]
        return self.kv[group][index]

    def layer_cache(self, layer: int, batch: BatchInput) -> tuple[np.ndarray, np.ndarray]:
        """The KV of ``layer`` and the block tables (of its group) that index it."""
        return self.layer_pool(layer), batch.tables_for(layer)

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=F32)
        return x * (1 / np.sqrt(ms + F32(eps))) * weight

    def linear(self, x: np.ndarray, w: _Linear) -> np.ndarray:
        if x.shape[0] == 1:  # decode: matrix-vector product, no GEMM set-up
            y = (w.w @ x[0])[None]
        else:
            y = x @ w.w.T
        if w.b is not None:
            y += w.b
        return y

    def rope(self, x, positions, inv_freq, heads, head_dim) -> np.ndarray:
        t, half = x.shape[0], head_dim // 2
        x = x.reshape(t, heads, head_dim)
        cos, sin = self.rope_tables(positions, inv_freq)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        out = np.empty_like(x)
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:] = x2 * cos + x1 * sin
        return out.reshape(t, heads * head_dim)

    def write_kv(self, layer, k, v, slot_mapping) -> None:
        pool = self.layer_pool(layer)
        _, nb, bs, kvh, hd = pool.shape
        flat = pool.reshape(2, nb * bs, kvh, hd)
        flat[0, slot_mapping] = k.reshape(-1, kvh, hd)
        flat[1, slot_mapping] = v.reshape(-1, kvh, hd)

    def paged_attention(self, layer, q, batch: BatchInput, heads, kv_heads, head_dim, scale,
                        window: int = 0):
        t, g = q.shape[0], heads // kv_heads
        out = np.empty((t, kv_heads, g, head_dim), dtype=F32)
        q = q.reshape(t, kv_heads, g, head_dim)
        cache, tables = self.layer_cache(layer, batch)
        pos = batch.positions
        bs = self.block_size
        for s, start, end, length, n_blocks in self.plan(batch).sequences():
            # A window skips the blocks before its first visible key: they may already be freed.
            first = max(0, int(pos[start]) - window + 1) // bs if window else 0
            blocks = tables[s, first:n_blocks]
            base = first * bs
            k = cache[0, blocks].reshape(-1, kv_heads, head_dim)[:length - base]  # [L, kvh, hd]
            v = cache[1, blocks].reshape(-1, kv_heads, head_dim)[:length - base]
            qs = q[start:end].transpose(1, 2, 0, 3)  # [kvh, g, n, hd]
            scores = qs @ k.transpose(1, 2, 0)[:, None]  # [kvh, g, n, L]
            scores *= F32(scale)
            # Causal: the query at position p sees keys 0..p of its own sequence (with a
            # window, only p-window+1..p).
            key_pos = np.arange(base, length)[None, :]
            hidden = key_pos > pos[start:end, None]
            if window:
                hidden |= key_pos <= pos[start:end, None] - window
            if hidden.any():
                scores[..., hidden] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out[start:end] = (scores @ v.transpose(1, 0, 2)[:, None]).transpose(2, 0, 1, 3)
        return out.reshape(t, heads * head_dim)

    def silu_mul(self, gate, up) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp overflow for very negative gates -> silu = -0
            return gate / (1 + np.exp(-gate)) * up

    def gelu_tanh_mul(self, gate, up) -> np.ndarray:
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), every constant float32.
        inner = F32(math.sqrt(2 / math.pi)) * (gate + F32(0.044715) * gate * gate * gate)
        return F32(0.5) * gate * (F32(1) + np.tanh(inner)) * up

    def head_rms_norm(self, x, weight, eps, heads, head_dim) -> np.ndarray:
        t = x.shape[0]
        return self.rms_norm(x.reshape(t, heads, head_dim), weight, eps).reshape(t, heads * head_dim)

    def scale(self, x, factor) -> np.ndarray:
        return x * F32(factor)

    def add(self, a, b) -> np.ndarray:
        return a + b

    def take_rows(self, x, rows) -> np.ndarray:
        return x[rows]

    def logits(self, x, lm_head: _Linear) -> np.ndarray:
        return self.linear(x, lm_head)


class HostKV:
    """Block I/O and copy-on-write of host KV pools ``self.kv_pools`` (one per KV group) in
    the portable layout ``[layers in the group, 2, blocks, block_size, kv_heads, head_dim]``
    (the NumPy and cpu backends'); ``self.kv`` is group 0's."""

    kv_pools: list[np.ndarray]

    @property
    def kv(self) -> np.ndarray:
        return self.kv_pools[0]

    def copy_blocks(self, pairs: list[tuple[int, int]], group: int = 0) -> None:
        if pairs:
            src, dst = np.array(pairs, dtype=np.int64).T
            pool = self.kv_pools[group]
            pool[:, :, dst] = pool[:, :, src]

    def read_blocks(self, block_ids: list[int], group: int = 0) -> np.ndarray:
        return self.kv_pools[group][:, :, np.asarray(block_ids, dtype=np.int64)]

    def write_blocks(self, block_ids: list[int], data: np.ndarray, group: int = 0) -> None:
        self.kv_pools[group][:, :, np.asarray(block_ids, dtype=np.int64)] = data


class NumpyBackend(HostKV, Backend):
    name = "numpy"

    def __init__(self, model_dir: ModelDir, *, num_blocks, block_size: int = 16,
                 options=None, kv_layout=None):
        super().__init__(model_dir, num_blocks=num_blocks, block_size=block_size, options=options,
                         kv_layout=kv_layout)
        c = self.config
        self.params = self.model.load_params(model_dir, NumpyLoader(model_dir))
        self.kv_pools = []
        for group, blocks in enumerate(self.group_blocks):
            shape = (len(self.kv_layout.layers(group)), 2, blocks, block_size,
                     c.num_key_value_heads, c.head_dim)
            pool = np.zeros(shape, dtype=F32)
            pool[...] = 0  # fault every page in now, not during the first requests
            self.kv_pools.append(pool)
        self.ops = NumpyOps(self.kv_pools, block_size, self.layer_pools)

    def forward(self, batch: BatchInput) -> np.ndarray:
        self.check_batch(batch)
        return self.model.forward(self.ops, self.params, batch)



BACKEND = NumpyBackend
