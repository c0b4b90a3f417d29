"""The pool of KV cache blocks: reference counts, the LRU free queue and the prefix cache.

Every block is in exactly one of two states:

* **used**: ``ref_cnt >= 1``, held by that many block tables, not in the free queue;
* **free**: ``ref_cnt == 0``, in the free queue. A free block that still carries a hash is a
  *cached free* block: its KV is intact, a prefix hit can revive it (`touch`), and it is only
  evicted (its hash dropped) when `get_new_blocks` pops it for other content.

The prefix map sends a `BlockHash` to the one block registered under it. Hashes are SHA-256
digests of the whole prefix (see `hashing`), so the map trusts them without comparing tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from .blocks import FreeBlockQueue, KVCacheBlock
from .hashing import BlockHash

__all__ = ["BlockPool"]


class BlockPool:
    """Fixed set of ``num_blocks`` blocks with reference counting and a prefix cache.

    Args:
        num_blocks: Number of physical blocks (the backend's KV pool has as many).
        enable_caching: Keep the prefix map. When False, `cache_full_block` does nothing and
            `get_cached_block` always misses; the pool is then a plain LRU allocator.

    Attributes:
        blocks: All blocks, indexed by block id.
        prefix_queries, prefix_hits: Prefix-cache counters **in tokens**, cumulative (also
            across `reset_prefix_cache`). The pool does not count by itself:
            `KVCacheManager.get_computed_blocks` adds the prompt length to ``prefix_queries``
            and the number of tokens served from the cache to ``prefix_hits``.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self._num_cached_free = 0  # free blocks that still carry a hash
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---------------------------------------------------------------------------------------
    # Counts

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_cnt == 0`` (cached free ones included: they can be evicted)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a hash, so a prefix hit can reuse them."""
        return self._num_cached_free

    @property
    def num_cached_blocks(self) -> int:
        """Entries in the prefix map (used and free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0 (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    # ---------------------------------------------------------------------------------------
    # Allocation

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head of the free queue (least recently freed first).

        A popped block that was cached is evicted: its hash leaves the prefix map and the block.
        Every returned block has ``ref_cnt == 1``.

        Raises:
            ValueError: fewer than ``n`` blocks are free. Callers check `num_free_blocks` first;
                nothing is popped in that case.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self.free_queue):
            raise ValueError(f"need {n} free blocks, only {len(self.free_queue)} left")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            assert block.ref_cnt == 0, f"block {block.block_id} in the free queue is in use"
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        if self._cached.get(block_hash) is block:
            del self._cached[block_hash]
        block.block_hash = None
        self._num_cached_free -= 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the free-queue tail.

        The order matters: blocks appended first are evicted first. Pass a sequence's blocks in
        *reverse* so its tail goes before its head (the head is the prefix most worth keeping).
        Freed blocks keep their hash, so they stay reusable by prefix until evicted.

        Raises:
            ValueError: a block is already free (a double free; blocks before it were freed).
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} is already free")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)
                if block.block_hash is not None:
                    self._num_cached_free += 1

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference on each block (a prefix hit reusing them).

        A cached free block (``ref_cnt == 0``) is taken out of the free queue, so it can no
        longer be evicted: touching first, then allocating, is what keeps a request's own prefix
        hits safe from its own new allocations.
        """
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
                if block.block_hash is not None:
                    self._num_cached_free -= 1
            block.ref_cnt += 1

    # ---------------------------------------------------------------------------------------
    # Prefix cache

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block registered under ``block_hash`` (used or cached free), or None."""
        return self._cached.get(block_hash)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register a block that just became full under its hash.

        If another block is already registered under ``block_hash`` (two requests computed the
        same content independently), the existing mapping wins and ``block`` stays unhashed: it
        is then an ordinary block that is recycled as soon as it is freed, and the map never
        holds two blocks per hash. Returns whether ``block`` now carries ``block_hash``
        (always False when caching is disabled).

        Raises:
            ValueError: the block is free (only a block being written is cached), or it already
                carries a different hash (its content cannot have changed while cached).
        """
        if block.ref_cnt <= 0:
            raise ValueError(f"block {block.block_id} is free; only used blocks can be cached")
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(f"block {block.block_id} already carries another hash")
            return True
        if not self.enable_caching:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (for example after the weights changed).

        Only done when no block is in use, because a used block's hash may be needed to
        register the blocks after it. Returns whether the cache was reset. The free-queue order
        and the prefix counters are kept.
        """
        if self.num_used_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        self._num_cached_free = 0
        return True

    # ---------------------------------------------------------------------------------------
    # Checking

    def check_invariants(self) -> None:
        """Verify the pool's internal consistency; raises AssertionError on the first breach.

        O(num_blocks): meant for tests and debugging, not for every engine step.
        """
        queued = list(self.free_queue)
        _check(len(queued) == len(self.free_queue), "free queue length is off")
        _check(len({id(b) for b in queued}) == len(queued), "a block is queued twice")
        queued_ids = {id(b) for b in queued}
        for block in self.blocks:
            in_queue = id(block) in queued_ids
            _check(block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}")
            _check(
                in_queue == (block.ref_cnt == 0),
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but in_queue={in_queue}",
            )
            _check(
                in_queue == (block in self.free_queue),
                f"block {block.block_id}: queue links disagree with queue content",
            )
            if block.block_hash is not None:
                _check(self.enable_caching, f"block {block.block_id} hashed with caching off")
                _check(
                    self._cached.get(block.block_hash) is block,
                    f"block {block.block_id} carries a hash the prefix map does not send to it",
                )
        _check(all(b.block_id >= 0 for b in queued), "a sentinel leaked into the free queue")
        for block_hash, block in self._cached.items():
            _check(
                block.block_hash == block_hash,
                f"prefix map entry points at block {block.block_id} with another hash",
            )
        cached_free = sum(1 for b in queued if b.block_hash is not None)
        _check(cached_free == self._num_cached_free, "cached free block count is off")


def _check(cond: bool, message: str) -> None:
    # Not `assert`: invariant checks must also run under `python -O`.
    if not cond:
        raise AssertionError(message)
