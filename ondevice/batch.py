"""The flattened, variable-length batch every backend's ``forward`` consumes (vLLM v1 style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchInput:
    """One engine step: the new tokens of every scheduled sequence, concatenated.

    Shapes (T new tokens over S sequences, R rows whose logits are wanted):
      token_ids, positions, slot_mapping: int32 [T]
      block_tables: int32 [S, max_blocks]  (rows padded with 0 past each sequence's blocks)
      seq_lens: int32 [S]  context length of each sequence *including* this step's tokens
      query_start_loc: int32 [S + 1]  sequence s owns rows query_start_loc[s]:query_start_loc[s+1]
      logits_indices: int32 [R]  rows of the T tokens whose next-token logits are returned

    With KV groups (sliding-window layers on block tables of their own, see
    ``ondevice.kv.layout``), ``block_tables`` and ``slot_mapping`` are group 0's, and
    ``group_block_tables`` / ``group_slot_mappings`` hold every group's (group 0's first);
    ``layer_groups[i]`` is the group of layer i. A layer reads its own through
    :meth:`tables_for` and :meth:`slots_for`. A batch without groups serves every layer with
    the one table (a backend with several group pools then finds the same block ids in each).
    """

    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    logits_indices: np.ndarray
    group_block_tables: tuple[np.ndarray, ...] = ()
    group_slot_mappings: tuple[np.ndarray, ...] = ()
    layer_groups: tuple[int, ...] = field(default=())

    def tables_for(self, layer: int) -> np.ndarray:
        """Block tables of ``layer``'s KV group."""
        return self.group_block_tables[self.layer_groups[layer]] if self.layer_groups \
            else self.block_tables

    def slots_for(self, layer: int) -> np.ndarray:
        """Slot mapping of ``layer``'s KV group."""
        return self.group_slot_mappings[self.layer_groups[layer]] if self.layer_groups \
            else self.slot_mapping

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(
        cls,
        seqs: list[tuple[list[int], int, Sequence]],
        block_size: int,
        logits_for: str | list[bool] = "last",
        layer_groups: tuple[int, ...] = (),
    ) -> BatchInput:
        """Build a batch from ``(new_token_ids, num_computed_tokens, block_ids)`` per sequence.

        With ``layer_groups`` naming more than one KV group, ``block_ids`` is one list per
        group (the manager's ``block_tables``); ids below 0 (blocks a windowed group gave back)
        become 0 in the tables, and are never read. A new token's slot must be a real block.

        The new tokens of a sequence occupy positions ``num_computed .. num_computed + n - 1``;
        ``logits_for="last"`` asks for the last new row of each sequence, ``"all"`` for every
        row, and a list of booleans for the last row of the sequences marked True; an integer
        ``m`` in that list asks for the sequence's last ``m`` rows (speculative verification:
        the last token and its ``m - 1`` proposals).
        """
        num_groups = max(layer_groups, default=0) + 1
        per_group = [[b] for _, _, b in seqs] if num_groups == 1 else [b for _, _, b in seqs]
        if any(len(g) != num_groups for g in per_group):
            raise ValueError(f"each sequence needs {num_groups} block tables")
        ids, pos, lens, starts, rows = [], [], [], [0], []
        slots: list[list[np.ndarray]] = [[] for _ in range(num_groups)]
        max_blocks = max((len(b) for g in per_group for b in g), default=0) or 1
        tables = np.zeros((num_groups, len(seqs), max_blocks), dtype=np.int32)
        for s, (new, computed, _) in enumerate(seqs):
            n = len(new)
            p = np.arange(computed, computed + n, dtype=np.int64)
            ids.extend(new)
            pos.append(p)
            for g, blocks in enumerate(per_group[s]):
                table = np.asarray(blocks, dtype=np.int64)
                written = table[p // block_size]
                if n and written.min() < 0:
                    raise ValueError(f"sequence {s}: a new token's block in KV group {g} was "
                                     f"given back")
                slots[g].append(written * block_size + p % block_size)
                tables[g, s, : len(blocks)] = np.maximum(table, 0)
            lens.append(computed + n)
            if logits_for == "all":
                rows.extend(range(starts[-1], starts[-1] + n))
            elif logits_for == "last":
                rows.append(starts[-1] + n - 1)
            elif logits_for[s]:
                m = min(int(logits_for[s]), n)  # True counts as 1
                rows.extend(range(starts[-1] + n - m, starts[-1] + n))
            starts.append(starts[-1] + n)
        cat = (lambda parts: np.concatenate(parts).astype(np.int32)) if seqs else (
            lambda parts: np.zeros(0, np.int32))
        group_slots = tuple(cat(g) for g in slots)
        group_tables = tuple(np.ascontiguousarray(t) for t in tables)
        grouped = num_groups > 1
        return cls(
            token_ids=np.asarray(ids, dtype=np.int32),
            positions=cat(pos),
            slot_mapping=group_slots[0],
            block_tables=group_tables[0],
            seq_lens=np.asarray(lens, dtype=np.int32),
            query_start_loc=np.asarray(starts, dtype=np.int32),
            logits_indices=np.asarray(rows, dtype=np.int32),
            group_block_tables=group_tables if grouped else (),
            group_slot_mappings=group_slots if grouped else (),
            layer_groups=tuple(layer_groups) if grouped else (),
        )
