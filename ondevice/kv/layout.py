"""KV cache groups: which layers share a block table, and how a KV budget is split among them.

Sliding-window layers (Gemma 3's local ones) only ever read the last ``window`` positions, so
their blocks that fall wholly before the window can go back to the pool while the sequence
runs; full-attention layers need every block. One block table cannot serve both, so layers are
put in *groups* (vLLM v1's KV cache groups, simplified): group 0 holds the full-attention
layers, group 1 the windowed ones. Each group has its own block-id space, its own physical pool
in the backend (``layers in the group x per-layer block bytes`` per block) and its own
`BlockPool` in the `KVCacheManager`; each sequence has one block table per group, and the
tables stay aligned by position (entry ``i`` covers tokens ``i * block_size ..``), the
windowed group holding a placeholder where a block was freed.

vLLM v1 instead makes every group's block the same size and lets all groups draw on one shared
pool, so memory moves between groups as the load changes. That needs groups of equal layer
counts (Gemma 3 1B has 4 global and 22 local layers: not a multiple) and one block id to mean
memory in layers of several groups at once; here each group gets a fixed share of the budget
instead (`split_kv_budget`), which keeps every backend's pool a plain per-layer array.

A model without windowed layers, or without any full-attention layer to anchor group 0 (so a
prefix hit always has a full group to measure it), keeps exactly one group and behaves as if
there were no groups at all; so does a backend or an engine that turns window paging off.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

__all__ = ["KVLayout", "split_kv_budget", "window_blocks"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVLayout:
    """The KV groups of one model: ``windows[g]`` is group g's window in positions (0: full
    attention; group 0 always is), ``layer_group[i]`` the group of layer i."""

    windows: tuple[int, ...]
    layer_group: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.windows or self.windows[0] != 0:
            raise ValueError(f"group 0 must be the full-attention group, got {self.windows}")
        if any(w < 0 for w in self.windows):
            raise ValueError(f"windows must be >= 0, got {self.windows}")
        if set(self.layer_group) != set(range(len(self.windows))):
            raise ValueError(f"every group needs a layer: {self.layer_group} for {self.windows}")

    @classmethod
    def single(cls, num_layers: int) -> KVLayout:
        """One group of every layer, no block ever freed early (the Llama family)."""
        return cls((0,), (0,) * num_layers)

    @classmethod
    def for_config(cls, config: ModelConfig, paging: bool = True) -> KVLayout:
        """Group 0 the full-attention layers, group 1 the sliding-window ones; one group when
        the model has no windowed layers (or none of the other kind), or ``paging`` is off."""
        n = config.num_hidden_layers
        types = config.layer_types if config.is_gemma3 else None
        window = config.sliding_window or 0
        if not paging or not types or window <= 0:
            return cls.single(n)
        local = tuple(kind == "sliding_attention" for kind in types)
        if all(local) or not any(local):
            return cls.single(n)
        return cls((0, window), tuple(int(x) for x in local))

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_layers(self) -> int:
        return len(self.layer_group)

    def layers(self, group: int) -> tuple[int, ...]:
        """The layers of ``group``, in model order."""
        return tuple(i for i, g in enumerate(self.layer_group) if g == group)

    def index_in_group(self, layer: int) -> int:
        """Where ``layer`` sits in its group's pool (its rank among the group's layers)."""
        g = self.layer_group[layer]
        return sum(1 for i in range(layer) if self.layer_group[i] == g)


def window_blocks(window: int, block_size: int, chunk: int) -> int:
    """The most blocks one sequence holds in a windowed group during a step of at most
    ``chunk`` new tokens: its first new token at position c reads keys from c - window + 1,
    its last is written at c + chunk - 1, so blocks (c - window + 1) // bs .. (c + chunk - 1)
    // bs are live. For decode (chunk 1) that is ceil(window / block_size) + 1."""
    return (window + chunk - 2) // block_size + 2


def split_kv_budget(budget: int, layout: KVLayout, layer_block_bytes: int, block_size: int, *,
                    max_num_seqs: int, chunk: int) -> tuple[int, ...]:
    """Blocks per group for ``budget`` bytes of KV.

    Keeping every block, each group needs as many blocks as the full group, so the budget is
    divided in proportion to the groups' layer counts (``equal``: the same block count for
    all). With window paging, a windowed group never holds more than `window_blocks` per
    running sequence plus the step's tokens, so it gets what ``max_num_seqs`` sequences need
    for their windows and one step's ``chunk`` of new tokens (capped at ``equal``: more would
    never be used, since a sequence holds no more windowed blocks than full ones), and the
    full-attention group gets the rest, which is what bounds the longest context. A shortage
    in the windowed group is still handled like any other (the scheduler waits or preempts),
    so the split is about capacity, never correctness.

    ``layer_block_bytes``: bytes of K and V of one block in one layer.
    """
    counts = [len(layout.layers(g)) for g in range(layout.num_groups)]
    per_block = [n * layer_block_bytes for n in counts]
    equal = budget // sum(per_block)
    if layout.num_groups == 1:
        return (equal,)
    windowed = []
    for g in range(1, layout.num_groups):
        w = layout.windows[g]
        # Per sequence (w + n - 2) // bs + 2 <= window_blocks(w, bs, 1) + 1 + (n - 1) // bs,
        # and the sequences' new tokens n add up to at most one chunk.
        need = max_num_seqs * (window_blocks(w, block_size, 1) + 1) + _cdiv(chunk, block_size)
        windowed.append(min(equal, need))
    rest = budget - sum(n * b for n, b in zip(windowed, per_block[1:], strict=True))
    return (rest // per_block[0], *windowed)
