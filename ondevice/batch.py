"""The flattened, variable-length batch every backend's ``forward`` consumes (vLLM v1 style)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    logits_indices: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(
        cls,
        seqs: list[tuple[list[int], int, list[int]]],
        block_size: int,
        logits_for: str | list[bool] = "last",
    ) -> BatchInput:
        """Build a batch from ``(new_token_ids, num_computed_tokens, block_ids)`` per sequence.

        The new tokens of a sequence occupy positions ``num_computed .. num_computed + n - 1``;
        ``logits_for="last"`` asks for the last new row of each sequence, ``"all"`` for every
        row, and a list of booleans for the last row of the sequences marked True; an integer
        ``m`` in that list asks for the sequence's last ``m`` rows (speculative verification:
        the last token and its ``m - 1`` proposals).
        """
        ids, pos, slots, lens, starts, rows = [], [], [], [], [0], []
        max_blocks = max((len(b) for _, _, b in seqs), default=0) or 1
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        for s, (new, computed, blocks) in enumerate(seqs):
            n = len(new)
            p = np.arange(computed, computed + n, dtype=np.int64)
            table = np.asarray(blocks, dtype=np.int64)
            ids.extend(new)
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
            tables[s, : len(blocks)] = blocks
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
        return cls(
            token_ids=np.asarray(ids, dtype=np.int32),
            positions=cat(pos),
            slot_mapping=cat(slots),
            block_tables=tables,
            seq_lens=np.asarray(lens, dtype=np.int32),
            query_start_loc=np.asarray(starts, dtype=np.int32),
            logits_indices=np.asarray(rows, dtype=np.int32),
        )
