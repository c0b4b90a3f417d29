"""KV cache blocks and the O(1) LRU queue of free blocks.

A `KVCacheBlock` is bookkeeping only: the KV tensors live in the backend's pool, indexed by
``block_id``. The free queue threads its links through the blocks themselves (``prev_free`` /
``next_free``), so that a block found by its hash can be taken out of the middle of the queue in
O(1) when a prefix-cache hit revives it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .hashing import BlockHash

__all__ = ["FreeBlockQueue", "KVCacheBlock"]


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    """Metadata of one physical KV block.

    Attributes:
        block_id: Index of the block in the backend's KV pool, ``0 .. num_blocks - 1``.
        ref_cnt: Number of block tables (requests) holding the block. 0 means the block is in
            the free queue.
        block_hash: Hash of the block's tokens (and prefix) once the block is full and
            registered in the prefix cache; None otherwise. A free block keeps its hash until it
            is evicted, so a later request with the same prefix can still reuse it.
        prev_free, next_free: Links of the free queue; both None while the block is not in it.
    """

    # eq=False: blocks compare and hash by identity; two blocks are never "equal" by value.
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order: the head is evicted first.

    Blocks are appended at the tail when freed and popped from the head when a new block is
    needed, so the least recently freed block goes first (LRU). `remove` takes a block out of the
    middle in O(1) when a prefix-cache hit brings it back into use. Two sentinel nodes (block id
    -1) bound the list, so no operation needs to special-case an empty queue or the ends.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()):
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """The free blocks from head (evicted next) to tail (freed last)."""
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def __contains__(self, block: object) -> bool:
        # O(1): a block is linked exactly while it is in the queue. Only meaningful for blocks of
        # this queue's pool (there is one free queue per pool).
        return isinstance(block, KVCacheBlock) and block.prev_free is not None

    def popleft(self) -> KVCacheBlock:
        """Remove and return the head block (the next to evict).

        Raises:
            IndexError: the queue is empty.
        """
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("pop from an empty free block queue")
        self._unlink(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail (evicted last).

        Raises:
            ValueError: the block is already in the queue.
        """
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        """Take ``block`` out of the queue wherever it is.

        Raises:
            ValueError: the block is not in the queue.
        """
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        self._unlink(block)

    def _unlink(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1
