"""A minimal free-list block allocator for single-sequence generation."""

from __future__ import annotations

from ..errors import RequestError


class SimpleBlockAllocator:
    """Hands out block ids from a fixed pool; blocks go back in reverse order on free."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend ``table`` in place until it holds ``num_tokens`` tokens, or raise."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise RequestError(
                f"out of KV cache: {num_tokens} tokens need {self.blocks_for(num_tokens)} blocks, "
                f"{len(table) + len(self._free)} available"
            )
        for _ in range(max(need, 0)):
            table.append(self._free.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()
