"""The ``Ops`` protocol with MIL-builder ops: running ``LlamaModel.forward`` with these builds
the Core ML program instead of computing anything.

Arrays are MIL vars. Activations are float16 (what the Neural Engine and GPU compute in);
RMSNorm and the RoPE angles run in float32 because a float16 sum of squares overflows past
|x| ~ 256 and float16 angles lose the position. The paged KV pool is two float16 Core ML
states, ``key_cache`` and ``value_cache``, each ``[layers, num_blocks * block_size,
kv_heads * head_dim]`` and indexed by slot (``block_id * block_size + offset``), exactly the
slot numbering of the runtime's block manager.

Everything here is per request: one sequence, whose block table is a ``[max_blocks]`` vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UnsupportedModelError
from ...modeldir import QuantizedTensor

F16_MAX = float(np.finfo(np.float16).max)
# Masked attention scores: far below any real score, and finite in float16 (the Neural
# Engine's handling of -inf is not something to depend on).
MASK_VALUE = -30000.0


@dataclass
class MilLinear:
    """A linear layer's weight const ``[out, in]`` and optional bias const (float16)."""

    weight: Any
    bias: Any | None


def _f16(name: str, w: Any) -> np.ndarray:
    dense = w.dequantize() if isinstance(w, QuantizedTensor) else np.asarray(w, dtype=np.float32)
    if np.abs(dense).max(initial=0) > F16_MAX:
        raise UnsupportedModelError(
            f"tensor {name} has values beyond float16 range; Core ML weights are float16"
        )
    return dense.astype(np.float16)


class MilLoader:
    """Turns checkpoint tensors into MIL consts (float16; norm weights float32)."""

    def __init__(self, mb: Any, on_tensor=None):
        self.mb = mb
        self.count = 0
        self._on_tensor = on_tensor

    def _const(self, val: np.ndarray, kind: str) -> Any:
        self.count += 1
        if self._on_tensor is not None:
            self._on_tensor()
        return self.mb.const(val=val, name=f"{kind}_{self.count}")

    def embedding(self, w: Any) -> Any:
        return self._const(_f16("embedding", w), "embed")

    def linear(self, w: Any, bias: np.ndarray | None) -> MilLinear:
        b = None if bias is None else self._const(_f16("bias", bias), "bias")
        return MilLinear(self._const(_f16("linear", w), "weight"), b)

    def norm(self, w: np.ndarray) -> Any:
        return self._const(np.asarray(w, dtype=np.float32), "norm")

    def tied_lm_head(self, embed: Any, w: Any) -> MilLinear:
        return MilLinear(embed, None)  # one const, used by the gather and the linear


@dataclass
class SymbolicBatch:
    """The ``BatchInput`` fields the model reads, as MIL vars of one sequence's step."""

    token_ids: Any  # int32 [T]
    positions: Any  # int32 [T]
    slot_mapping: Any  # int32 [T]
    block_table: Any  # int32 [max_blocks]
    seq_len: Any  # int32 [1]
    logits_indices: Any | None  # int32 [1] (last row), or None for every row

    def slots_for(self, layer: int) -> Any:
        """Every layer writes through the one slot mapping (a package has one KV group)."""
        return self.slot_mapping


class MilOps:
    """Every op of the ``Ops`` protocol, emitting MIL ops into the current program."""

    def __init__(self, mb: Any, types: Any, *, key_state: Any, value_state: Any,
                 block_size: int, max_context: int, on_layer=None):
        self.mb, self.types = mb, types
        self.key_state, self.value_state = key_state, value_state
        self.block_size, self.max_context = block_size, max_context
        self._on_layer = on_layer
        self._rope: dict[int, tuple[np.ndarray, Any, Any]] = {}  # per RoPE base
        self._context: dict[str, Any] | None = None
        self._kv: dict[int, tuple[Any, Any]] = {}
        self._cache: list[Any] | None = None  # the latest value of each state

    # -- helpers -------------------------------------------------------------------------
    def _context_vars(self, batch: SymbolicBatch) -> dict[str, Any]:
        """Per-step values shared by every layer: the slots of context positions
        ``0 .. max_context-1`` through the block table, and the attention masks."""
        if self._context is None:
            mb, bs, c = self.mb, self.block_size, self.max_context
            blocks = mb.expand_dims(x=batch.block_table, axes=[1])  # [MB, 1]
            offsets = np.arange(bs, dtype=np.int32)[None, :]
            slots = mb.reshape(x=mb.add(x=mb.mul(x=blocks, y=np.int32(bs)), y=offsets),
                               shape=[c, 1])  # [C, 1]: slot of context position j
            keys = np.arange(c, dtype=np.int32)
            # Causal: the query at position p sees keys 0..p; never beyond the sequence.
            allowed = mb.less_equal(x=keys[None, :], y=mb.expand_dims(x=batch.positions, axes=[1]))
            valid = mb.expand_dims(x=mb.less(x=keys, y=batch.seq_len), axes=[1])  # [C, 1]
            self._context = {"slots": slots, "allowed": allowed, "valid": valid}
        return self._context

    def _allowed(self, batch: SymbolicBatch, window: int) -> Any:
        """The causal mask, and for a window w also keys > p - w (Gemma 3's local layers)."""
        ctx = self._context_vars(batch)
        if not window:
            return ctx["allowed"]
        key = f"allowed_{window}"
        if key not in ctx:
            mb = self.mb
            keys = np.arange(self.max_context, dtype=np.int32)
            first = mb.sub(x=mb.expand_dims(x=batch.positions, axes=[1]), y=np.int32(window))
            ctx[key] = mb.logical_and(x=ctx["allowed"], y=mb.greater(x=keys[None, :], y=first))
        return ctx[key]

    # -- the Ops protocol --------------------------------------------------------------------
    def embedding(self, table: Any, ids: Any) -> Any:
        return self.mb.gather(x=table, indices=ids, axis=0)

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        mb = self.mb
        xf = mb.cast(x=x, dtype="fp32")
        ms = mb.reduce_mean(x=mb.mul(x=xf, y=xf), axes=[-1], keep_dims=True)
        y = mb.mul(x=mb.mul(x=xf, y=mb.rsqrt(x=ms, epsilon=np.float32(eps))), y=weight)
        return mb.cast(x=y, dtype="fp16")

    def linear(self, x: Any, w: MilLinear) -> Any:
        if w.bias is None:
            return self.mb.linear(x=x, weight=w.weight)
        return self.mb.linear(x=x, weight=w.weight, bias=w.bias)

    def rope(self, x: Any, positions: Any, inv_freq: np.ndarray, heads: int,
             head_dim: int) -> Any:
        mb, half = self.mb, head_dim // 2
        hit = self._rope.get(id(inv_freq))
        if hit is None or hit[0] is not inv_freq:  # the same angles for q and k of every layer
            pos = mb.expand_dims(x=mb.cast(x=positions, dtype="fp32"), axes=[1])  # [T, 1]
            angles = mb.mul(x=pos, y=inv_freq.astype(np.float32)[None, :])  # [T, hd/2]
            hit = self._rope[id(inv_freq)] = (inv_freq, *(
                mb.expand_dims(x=mb.cast(x=f(x=angles), dtype="fp16"), axes=[1])
                for f in (mb.cos, mb.sin)
            ))  # [T, 1, hd/2] each
        _, cos, sin = hit
        x = mb.reshape(x=x, shape=[-1, heads, head_dim])
        x1 = mb.slice_by_index(x=x, begin=[0, 0, 0], end=[0, 0, half],
                               end_mask=[True, True, False])
        x2 = mb.slice_by_index(x=x, begin=[0, 0, half], end=[0, 0, head_dim],
                               end_mask=[True, True, False])
        rotated = mb.concat(values=[
            mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin)),
            mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin)),
        ], axis=-1)
        return mb.reshape(x=rotated, shape=[-1, heads * head_dim])

    def write_kv(self, layer: int, k: Any, v: Any, slot_mapping: Any) -> None:
        mb = self.mb
        slots = mb.expand_dims(x=slot_mapping, axes=[1])  # [T, 1]
        index = mb.concat(values=[mb.fill_like(ref_tensor=slots, value=layer), slots], axis=1)
        if self._cache is None:
            self._cache = [mb.read_state(input=s) for s in (self.key_state, self.value_state)]
        for i, (state, x) in enumerate(((self.key_state, k), (self.value_state, v))):
            cache = mb.scatter_nd(data=self._cache[i], indices=index, updates=x, mode="update")
            # Chain through coreml_update_state's output rather than reading the state again:
            # coremltools' common-subexpression pass merges repeated read_state ops into the
            # first one, which would drop every earlier layer's write.
            self._cache[i] = mb.coreml_update_state(state=state, value=cache)
        self._kv[layer] = (self._cache[0], self._cache[1])

    def paged_attention(self, layer: int, q: Any, batch: SymbolicBatch, heads: int,
                        kv_heads: int, head_dim: int, scale: float, window: int = 0) -> Any:
        mb, c, g = self.mb, self.max_context, heads // kv_heads
        ctx = self._context_vars(batch)
        index = mb.concat(values=[np.full((c, 1), layer, np.int32), ctx["slots"]], axis=1)
        key_cache, value_cache = self._kv.pop(layer)
        k = mb.gather_nd(x=key_cache, indices=index)  # [C, kvh*hd]
        # Context rows past the sequence hold whatever the pool had there (another request's
        # KV, or uninitialised memory): zero V so that even a NaN cannot leak through 0 * NaN.
        v = mb.select(cond=ctx["valid"], a=mb.gather_nd(x=value_cache, indices=index),
                      b=np.float16(0))
        k = mb.transpose(x=mb.reshape(x=k, shape=[c, kv_heads, 1, head_dim]), perm=[1, 2, 0, 3])
        v = mb.transpose(x=mb.reshape(x=v, shape=[c, kv_heads, 1, head_dim]), perm=[1, 2, 0, 3])
        q = mb.reshape(x=mb.mul(x=q, y=np.float16(scale)), shape=[-1, kv_heads, g, head_dim])
        q = mb.transpose(x=q, perm=[1, 2, 0, 3])  # [kvh, g, T, hd]
        scores = mb.matmul(x=q, y=k, transpose_y=True)  # [kvh, g, T, C]
        scores = mb.select(cond=self._allowed(batch, window), a=scores,
                           b=np.float16(MASK_VALUE))
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)  # [kvh, g, T, hd]
        out = mb.transpose(x=out, perm=[2, 0, 1, 3])  # [T, kvh, g, hd]
        if self._on_layer is not None:
            self._on_layer()
        return mb.reshape(x=out, shape=[-1, heads * head_dim])

    def silu_mul(self, gate: Any, up: Any) -> Any:
        return self.mb.mul(x=self.mb.silu(x=gate), y=up)

    def gelu_tanh_mul(self, gate: Any, up: Any) -> Any:
        return self.mb.mul(x=self.mb.gelu(x=gate, mode="TANH_APPROXIMATION"), y=up)

    def head_rms_norm(self, x: Any, weight: Any, eps: float, heads: int, head_dim: int) -> Any:
        y = self.rms_norm(self.mb.reshape(x=x, shape=[-1, heads, head_dim]), weight, eps)
        return self.mb.reshape(x=y, shape=[-1, heads * head_dim])

    def scale(self, x: Any, factor: float) -> Any:
        return self.mb.mul(x=x, y=np.float16(factor))

    def add(self, a: Any, b: Any) -> Any:
        return self.mb.add(x=a, y=b)

    def take_rows(self, x: Any, rows: Any | None) -> Any:
        return x if rows is None else self.mb.gather(x=x, indices=rows, axis=0)

    def logits(self, x: Any, lm_head: MilLinear) -> Any:
        return self.mb.cast(x=self.linear(x, lm_head), dtype="fp32", name="logits")
