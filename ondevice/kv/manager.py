"""Per-request block tables on top of `BlockPool`: prefix hits, growth, forks, copy-on-write.

How the engine drives it, per request::

    admission   blocks, n = kv.get_computed_blocks(rid, token_ids, extra_keys)
                new = kv.allocate_slots(rid, token_ids, len(token_ids) - n, blocks)
                (None: not enough blocks, nothing changed; try again later)
    each step   kv.allocate_slots(rid, token_ids, num_new_tokens)    (None: preempt someone)
                pairs = kv.take_copies()      -> backend.copy_blocks(pairs) BEFORE the forward
                table = kv.block_ids(rid)     -> BatchInput block tables / slot mapping
    after step  kv.cache_blocks(rid, token_ids, num_computed_tokens)
    n > 1       kv.fork(rid, child_rid)       (after the prompt was allocated)
    done        kv.free(rid)                  (finish, abort, preemption; also never-admitted)

The manager tracks, per request, how many tokens its block table covers (`num_tokens`): every
successful `allocate_slots` adds the prefix-hit tokens and ``num_new_tokens`` to it, because the
engine computes the tokens it scheduled in that step. The engine's own ``num_computed_tokens``
is passed to `cache_blocks` only, since a block may be hashed only once its KV was written.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .blocks import KVCacheBlock
from .hashing import BlockHash, ExtraKey, encode_extra_keys, hash_request_blocks
from .pool import BlockPool, _check

__all__ = ["KVCacheManager"]

RequestId = Hashable
"""Any hashable id (the engine's request id string); forks need an id of their own."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class _RequestState:
    extra_keys: tuple[ExtraKey, ...]
    blocks: list[KVCacheBlock] = field(default_factory=list)
    num_tokens: int = 0  # tokens the table holds slots for (computed or scheduled)
    num_cached_blocks: int = 0  # leading blocks that cache_blocks already registered (or tried)
    block_hashes: list[BlockHash] = field(default_factory=list)  # hashes of the full blocks


class KVCacheManager:
    """Block tables of all requests over one shared `BlockPool` with prefix caching.

    Args:
        num_blocks: Physical blocks in the backend's KV pool.
        block_size: Tokens per block.
        enable_caching: Share full blocks between requests by prefix hash.
        extra_keys: Global keys mixed into every block hash, e.g. the model id and dtype, so a
            cache persisted for one model is never served to another. Per-request keys (a LoRA
            name, ...) go to `get_computed_blocks` and are appended after these.

    A request exists from its first `get_computed_blocks` / `allocate_slots` / `fork` until
    `free`; call `free` for every request id ever passed in, admitted or not.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_caching: bool = True,
        extra_keys: tuple[ExtraKey, ...] = (),
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        encode_extra_keys(extra_keys)  # reject unsupported key types now, not at the first hash
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.extra_keys = tuple(extra_keys)
        self.pool = BlockPool(num_blocks, enable_caching)
        self._requests: dict[RequestId, _RequestState] = {}
        self._pending_copies: list[tuple[int, int]] = []

    # ---------------------------------------------------------------------------------------
    # Queries

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take (cached free blocks included)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (cached free blocks count as free)."""
        return self.pool.usage

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def block_ids(self, request_id: RequestId) -> list[int]:
        """The request's block table: block ids in token order (a fresh list)."""
        return [b.block_id for b in self._state(request_id).blocks]

    def num_tokens(self, request_id: RequestId) -> int:
        """Tokens the request's block table holds slots for (computed or scheduled)."""
        return self._state(request_id).num_tokens

    def stats(self) -> dict[str, int | float]:
        """Counters for metrics; prefix queries and hits are in tokens."""
        pool = self.pool
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used_blocks,
            "blocks_free": pool.num_free_blocks,
            "blocks_cached_free": pool.num_cached_free_blocks,
            "prefix_queries": pool.prefix_queries,
            "prefix_hits": pool.prefix_hits,
            "usage": pool.usage,
            "requests": len(self._requests),
        }

    def _state(self, request_id: RequestId) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    def _full_block_hashes(
        self, state: _RequestState, token_ids: Sequence[int], num_blocks: int
    ) -> list[BlockHash]:
        # A request's tokens only ever grow, so hashes computed earlier stay valid: extend the
        # chain from the last known hash instead of rehashing the prompt every step.
        have = len(state.block_hashes)
        if num_blocks > have:
            bs = self.block_size
            parent = state.block_hashes[-1] if have else None
            state.block_hashes.extend(
                hash_request_blocks(
                    token_ids[have * bs : num_blocks * bs],
                    bs,
                    self.extra_keys + state.extra_keys,
                    parent,
                )
            )
        return state.block_hashes

    # ---------------------------------------------------------------------------------------
    # Admission and growth

    def get_computed_blocks(
        self,
        request_id: RequestId,
        token_ids: Sequence[int],
        extra_keys: tuple[ExtraKey, ...] = (),
    ) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of full blocks, and the number of tokens it covers.

        Never the whole sequence: at least the last token is left to compute, since the engine
        needs its logits (a prompt that is entirely cached loses its last block to this rule).
        Reference counts are not changed; pass the blocks to `allocate_slots` right away, before
        any other allocation could evict the cached free ones among them.

        Adds ``len(token_ids)`` to the pool's ``prefix_queries`` and the hit tokens to
        ``prefix_hits`` on every call (a request retried at admission is counted each time).
        With caching disabled this returns ``([], 0)`` and counts nothing.

        ``extra_keys`` are this request's own hash keys (after the manager's global ones); they
        are remembered for the request's later `cache_blocks` calls.

        Raises:
            ValueError: the request already holds blocks, or was seen with other extra keys.
        """
        encode_extra_keys(extra_keys)  # type check (a lone str is not a key tuple)
        extra_keys = tuple(extra_keys)
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = _RequestState(extra_keys)
        elif state.extra_keys != extra_keys:
            raise ValueError(f"request {request_id!r} was seen with other extra keys")
        if state.blocks:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if not self.enable_caching:
            return [], 0
        # (len - 1) // bs: full blocks that leave at least one token uncached.
        max_blocks = max(len(token_ids) - 1, 0) // self.block_size
        hashes = self._full_block_hashes(state, token_ids, max_blocks)
        hits: list[KVCacheBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.pool.prefix_queries += len(token_ids)
        self.pool.prefix_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request_id: RequestId,
        token_ids: Sequence[int],
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Grow the request's table to ``num_tokens + len(new_computed_blocks) * block_size +
        num_new_tokens`` tokens.

        ``new_computed_blocks`` are prefix hits from `get_computed_blocks`; they are appended to
        the table and shared (one more reference each). ``token_ids`` is the request's token list
        so far; the table never covers more tokens than it holds.

        If the first token to write lands in a partially filled block that other requests share
        (after a `fork`), that block is replaced in this request's table by a fresh copy and the
        pair ``(src, dst)`` is queued for `take_copies`.

        Returns the blocks taken from the pool in this call (the copy-on-write block first, then
        the appended ones), or None when the pool lacks free blocks; in that case nothing changed
        (no partial allocation, prefix hits untouched, request state as before).

        Raises:
            ValueError: inconsistent arguments (negative count, table past ``token_ids``,
                prefix blocks not aligned or no longer carrying the expected hash).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        state = self._requests.get(request_id)
        blocks = state.blocks if state is not None else []
        num_tokens = state.num_tokens if state is not None else 0
        new_computed = list(new_computed_blocks)

        if new_computed:
            if state is None:
                raise ValueError(f"request {request_id!r}: prefix blocks without lookup")
            if num_tokens != len(blocks) * bs:
                raise ValueError("prefix blocks must follow a table of full blocks")
            # A cached free block evicted between lookup and allocation would silently feed
            # another request's KV to this one; refuse instead of corrupting output.
            hashes = state.block_hashes
            start = len(blocks)
            for i, block in enumerate(new_computed):
                if start + i >= len(hashes) or block.block_hash != hashes[start + i]:
                    raise ValueError(
                        "prefix blocks are stale: call allocate_slots right after "
                        "get_computed_blocks"
                    )
        write_start = num_tokens + len(new_computed) * bs
        total = write_start + num_new_tokens
        if total > len(token_ids):
            raise ValueError(
                f"request {request_id!r}: {total} token slots asked for, only "
                f"{len(token_ids)} tokens exist"
            )

        # Copy-on-write: only the block holding write_start can be partial and shared; every
        # block after it is new, and full shared blocks are only read.
        cow_index = -1
        if num_new_tokens and write_start % bs and blocks[write_start // bs].ref_cnt > 1:
            cow_index = write_start // bs
        num_to_allocate = max(_cdiv(total, bs) - len(blocks) - len(new_computed), 0)
        # Reviving cached free prefix blocks takes them out of the free queue too.
        num_revived = sum(1 for b in new_computed if b.ref_cnt == 0)
        if num_to_allocate + (cow_index >= 0) + num_revived > self.pool.num_free_blocks:
            return None

        # Commit. Touch before allocating so our own prefix hits cannot be evicted below.
        if state is None:
            state = self._requests[request_id] = _RequestState(())
        self.pool.touch(new_computed)
        if new_computed and state.num_cached_blocks == len(state.blocks):
            # The prefix blocks are registered already; cache_blocks can skip them.
            state.num_cached_blocks += len(new_computed)
        state.blocks.extend(new_computed)
        fresh: list[KVCacheBlock] = []
        if cow_index >= 0:
            src = state.blocks[cow_index]
            (dst,) = self.pool.get_new_blocks(1)
            state.blocks[cow_index] = dst
            self.pool.free_blocks([src])  # still held by the others: stays in use
            self._pending_copies.append((src.block_id, dst.block_id))
            fresh.append(dst)
        appended = self.pool.get_new_blocks(num_to_allocate)
        state.blocks.extend(appended)
        fresh.extend(appended)
        state.num_tokens = total
        return fresh

    def cache_blocks(
        self, request_id: RequestId, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Hash and register the request's blocks that became full with computed KV.

        Call after each step with the request's computed token count (the sampled token that is
        not yet fed back is not computed). A block whose content another block already caches
        stays unregistered (see `BlockPool.cache_full_block`). No-op with caching disabled.

        Raises:
            ValueError: ``num_computed_tokens`` exceeds the table or ``token_ids``.
        """
        state = self._state(request_id)
        if num_computed_tokens > min(state.num_tokens, len(token_ids)):
            raise ValueError(
                f"request {request_id!r}: {num_computed_tokens} computed tokens, but the table "
                f"covers {state.num_tokens} and there are {len(token_ids)} tokens"
            )
        if not self.enable_caching:
            return
        num_full = num_computed_tokens // self.block_size
        if num_full <= state.num_cached_blocks:
            return
        hashes = self._full_block_hashes(state, token_ids, num_full)
        for i in range(state.num_cached_blocks, num_full):
            self.pool.cache_full_block(state.blocks[i], hashes[i])
        state.num_cached_blocks = num_full

    def truncate(self, request_id: RequestId, num_tokens: int) -> None:
        """Shrink the request's table to ``num_tokens`` tokens, giving back the blocks past them.

        Speculative decoding allocates slots for proposed tokens before it knows how many are
        accepted; the rejected ones are given back here. Only blocks that no longer hold any of
        the kept tokens are freed (tail first, like `free`); the partial block that keeps some
        of them stays, and its stale tail slots are simply overwritten later. Registered
        (hashed) blocks are never dropped: `cache_blocks` only hashes computed tokens, and the
        caller never truncates below those.

        Raises:
            ValueError: ``num_tokens`` is negative, above the table, or below a hashed block.
        """
        state = self._state(request_id)
        if not 0 <= num_tokens <= state.num_tokens:
            raise ValueError(f"request {request_id!r}: cannot truncate {state.num_tokens} "
                             f"tokens to {num_tokens}")
        keep = _cdiv(num_tokens, self.block_size)
        if num_tokens < state.num_cached_blocks * self.block_size:
            raise ValueError(f"request {request_id!r}: truncating to {num_tokens} tokens would "
                             f"drop registered blocks")
        dropped = state.blocks[keep:]
        del state.blocks[keep:]
        state.num_tokens = num_tokens
        self.pool.free_blocks(reversed(dropped))

    # ---------------------------------------------------------------------------------------
    # Sharing and release

    def fork(self, parent_id: RequestId, child_id: RequestId) -> None:
        """Give ``child_id`` the parent's whole block table, sharing every block.

        Used for parallel samples (n > 1) of one prompt. Needs no free block; the first of the
        two that writes into a shared partial last block gets a private copy (`allocate_slots`),
        the last remaining holder writes in place.

        Raises:
            KeyError: unknown parent.
            ValueError: the child already holds blocks.
        """
        parent = self._state(parent_id)
        child = self._requests.get(child_id)
        if child is not None and child.blocks:
            raise ValueError(f"request {child_id!r} already holds blocks")
        self.pool.touch(parent.blocks)
        self._requests[child_id] = _RequestState(
            extra_keys=parent.extra_keys,
            blocks=list(parent.blocks),
            num_tokens=parent.num_tokens,
            num_cached_blocks=parent.num_cached_blocks,
            block_hashes=list(parent.block_hashes),
        )

    def take_copies(self) -> list[tuple[int, int]]:
        """Return and clear the pending copy-on-write pairs ``(src_block_id, dst_block_id)``.

        The backend must copy them in this order, before the forward pass that writes into the
        destination blocks.
        """
        pairs, self._pending_copies = self._pending_copies, []
        return pairs

    def free(self, request_id: RequestId) -> None:
        """Release the request's blocks (tail first) and forget it. Unknown ids are ignored."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        # Reverse: the tail is the least shareable part, so it should be evicted first.
        self.pool.free_blocks(reversed(state.blocks))
        if self._pending_copies:
            # A copy into a block nobody holds any more is wasted work.
            self._pending_copies = [
                (src, dst) for src, dst in self._pending_copies if self.pool.blocks[dst].ref_cnt > 0
            ]

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only possible while no block is in use (see `BlockPool`)."""
        if not self.pool.reset_prefix_cache():
            return False
        for state in self._requests.values():
            state.num_cached_blocks = 0
            state.block_hashes.clear()
        return True

    # ---------------------------------------------------------------------------------------
    # Checking

    def check_invariants(self) -> None:
        """Verify pool and tables agree; raises AssertionError on the first breach.

        Checks: free + used == total; every block's ref_cnt equals the number of tables holding
        it; no block is both free and referenced; a hashed block in a table is full and carries
        the hash of its position; the prefix map only points at blocks carrying that hash.
        O(total blocks): for tests and debugging.
        """
        pool = self.pool
        pool.check_invariants()
        _check(pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks, "free + used")
        holders = [0] * pool.num_blocks
        bs = self.block_size
        for rid, state in self._requests.items():
            _check(
                len(state.blocks) == _cdiv(state.num_tokens, bs),
                f"request {rid!r}: {len(state.blocks)} blocks for {state.num_tokens} tokens",
            )
            _check(
                len({id(b) for b in state.blocks}) == len(state.blocks),
                f"request {rid!r} holds a block twice",
            )
            _check(
                state.num_cached_blocks <= len(state.blocks),
                f"request {rid!r}: more blocks cached than held",
            )
            for i, block in enumerate(state.blocks):
                _check(pool.blocks[block.block_id] is block, f"foreign block {block.block_id}")
                holders[block.block_id] += 1
                if block.block_hash is not None:
                    _check(
                        (i + 1) * bs <= state.num_tokens,
                        f"request {rid!r}: partial block {block.block_id} is hashed",
                    )
                    _check(
                        i < len(state.block_hashes) and state.block_hashes[i] == block.block_hash,
                        f"request {rid!r}: block {block.block_id} carries another position's hash",
                    )
        for block in pool.blocks:
            _check(
                block.ref_cnt == holders[block.block_id],
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, held by "
                f"{holders[block.block_id]} tables",
            )
            _check(
                not (block in pool.free_queue and holders[block.block_id]),
                f"block {block.block_id} is free and referenced",
            )
