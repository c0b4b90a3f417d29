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

KV groups (see `layout`): with ``windows=(0, w)`` every request has one block table per group,
each over its own `BlockPool`, aligned by position. Group 0 (full attention) behaves exactly as
a single-group manager does. In a windowed group, `allocate_slots` first gives back the blocks
that lie wholly before the window of the step's first new token (position p reads keys
p - w + 1 .. p), replacing them in the table by `NULL_BLOCK` (block id -1, never read by a
kernel); a prefix hit there needs only the blocks covering the last window of the hit.
The APIs that take or return one group's blocks (`get_computed_blocks`, `block_ids`,
`take_copies`, `pool`) speak of group 0 unless given a group.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .blocks import KVCacheBlock
from .hashing import BlockHash, ExtraKey, encode_extra_keys, hash_request_blocks
from .layout import window_blocks
from .pool import BlockPool, _check

__all__ = ["NULL_BLOCK", "KVCacheManager"]

NULL_BLOCK = KVCacheBlock(-1)
"""Placeholder for a windowed group's block that was given back: it belongs to no pool, is
never reference counted, and its id -1 is never read (`BatchInput` writes 0 in its place)."""

RequestId = Hashable
"""Any hashable id (the engine's request id string); forks need an id of their own."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class _RequestState:
    extra_keys: tuple[ExtraKey, ...]
    tables: list[list[KVCacheBlock]] = field(default_factory=lambda: [[]])  # one per group
    num_tokens: int = 0  # tokens the tables hold slots for (computed or scheduled)
    num_cached_blocks: int = 0  # leading blocks that cache_blocks already registered (or tried)
    block_hashes: list[BlockHash] = field(default_factory=list)  # hashes of the full blocks

    @property
    def blocks(self) -> list[KVCacheBlock]:
        """Group 0's table."""
        return self.tables[0]


class KVCacheManager:
    """Block tables of all requests over shared `BlockPool`s (one per KV group) with prefix
    caching.

    Args:
        num_blocks: Physical blocks in the backend's KV pool; a sequence gives one count per
            group, a single int the same count to every group.
        block_size: Tokens per block.
        enable_caching: Share full blocks between requests by prefix hash.
        extra_keys: Global keys mixed into every block hash, e.g. the model id and dtype, so a
            cache persisted for one model is never served to another. Per-request keys (a LoRA
            name, ...) go to `get_computed_blocks` and are appended after these.
        windows: Per KV group, the window in positions of its layers (0: full attention);
            group 0 must be a full-attention group. The default is one group.

    A request exists from its first `get_computed_blocks` / `allocate_slots` / `fork` until
    `free`; call `free` for every request id ever passed in, admitted or not.
    """

    def __init__(
        self,
        num_blocks: int | Sequence[int],
        block_size: int = 16,
        enable_caching: bool = True,
        extra_keys: tuple[ExtraKey, ...] = (),
        windows: Sequence[int] = (0,),
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        windows = tuple(int(w) for w in windows)
        if not windows or windows[0] != 0 or any(w < 0 for w in windows):
            raise ValueError(f"windows must start with the full-attention group 0, got {windows}")
        counts = ([num_blocks] * len(windows) if isinstance(num_blocks, int)
                  else [int(n) for n in num_blocks])
        if len(counts) != len(windows):
            raise ValueError(f"{len(counts)} block counts for {len(windows)} KV groups")
        encode_extra_keys(extra_keys)  # reject unsupported key types now, not at the first hash
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.extra_keys = tuple(extra_keys)
        self.windows = windows
        self.pools = [BlockPool(n, enable_caching) for n in counts]
        self._requests: dict[RequestId, _RequestState] = {}
        self._pending_copies: list[list[tuple[int, int]]] = [[] for _ in windows]

    # ---------------------------------------------------------------------------------------
    # Queries

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def pool(self) -> BlockPool:
        """Group 0's pool (the only one without window groups)."""
        return self.pools[0]

    @property
    def num_blocks(self) -> int:
        """Blocks of group 0 (full attention): they bound the context of a sequence."""
        return self.pools[0].num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take in group 0 (cached free blocks included)."""
        return self.pools[0].num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use in the fullest group (cached free blocks count as free)."""
        return max(p.usage for p in self.pools)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def block_ids(self, request_id: RequestId, group: int = 0) -> list[int]:
        """The request's block table in ``group``: block ids in token order (a fresh list);
        -1 where a windowed group gave the block back."""
        return [b.block_id for b in self._state(request_id).tables[group]]

    def block_tables(self, request_id: RequestId) -> tuple[list[int], ...]:
        """`block_ids` of every group."""
        state = self._state(request_id)
        return tuple([b.block_id for b in t] for t in state.tables)

    def batch_tables(self, request_id: RequestId) -> list[int] | tuple[list[int], ...]:
        """What ``BatchInput.build`` takes for the request: group 0's `block_ids` when there
        is one group, else `block_tables`."""
        tables = self.block_tables(request_id)
        return tables[0] if len(tables) == 1 else tables

    def reach(self, chunk: int) -> int:
        """The longest sequence the pools can hold alone, in steps of at most ``chunk`` new
        tokens: group 0 needs a block per ``block_size`` tokens; a windowed group, once it
        holds the blocks of one window and one chunk (`window_blocks`), never needs more."""
        bs = self.block_size
        reach = self.num_blocks * bs
        for window, pool in zip(self.windows[1:], self.pools[1:], strict=True):
            if pool.num_blocks < window_blocks(window, bs, chunk):
                reach = min(reach, pool.num_blocks * bs)
        return reach

    def num_live_blocks(self, request_id: RequestId, group: int = 0) -> int:
        """Blocks the request holds in ``group`` (placeholders not counted)."""
        return sum(1 for b in self._state(request_id).tables[group] if b is not NULL_BLOCK)

    def num_tokens(self, request_id: RequestId) -> int:
        """Tokens the request's block table holds slots for (computed or scheduled)."""
        return self._state(request_id).num_tokens

    def stats(self) -> dict[str, int | float]:
        """Counters for metrics; prefix queries and hits are in tokens. The ``blocks_*``
        figures are group 0's; ``groups`` lists each group's window and block counts."""
        pool = self.pool
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used_blocks,
            "blocks_free": pool.num_free_blocks,
            "blocks_cached_free": pool.num_cached_free_blocks,
            "prefix_queries": pool.prefix_queries,
            "prefix_hits": pool.prefix_hits,
            "usage": self.usage,
            "requests": len(self._requests),
            "groups": [
                {"window": w, "blocks_total": p.num_blocks, "blocks_used": p.num_used_blocks,
                 "blocks_cached_free": p.num_cached_free_blocks}
                for w, p in zip(self.windows, self.pools, strict=True)
            ],
        }

    def _state(self, request_id: RequestId) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    def _new_state(self, extra_keys: tuple[ExtraKey, ...]) -> _RequestState:
        return _RequestState(extra_keys, tables=[[] for _ in self.windows])

    def window_start(self, group: int, position: int) -> int:
        """Index of the first block of ``group`` that a query at ``position`` reads; every
        block before it lies wholly outside the window (0 for a full-attention group)."""
        w = self.windows[group]
        return max(0, position - w + 1) // self.block_size if w else 0

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

    def _window_hits(self, group: int, hashes: Sequence[BlockHash], num_blocks: int
                     ) -> list[KVCacheBlock] | None:
        """Group ``group``'s table for a prefix hit of ``num_blocks`` blocks: placeholders up
        to the window of the first token after the hit, then the cached blocks; None if one of
        those is not cached."""
        lo = self.window_start(group, num_blocks * self.block_size)
        pool = self.pools[group]
        hits = [pool.get_cached_block(h) for h in hashes[lo:num_blocks]]
        if any(b is None for b in hits):
            return None
        return [NULL_BLOCK] * lo + hits  # type: ignore[list-item]

    # ---------------------------------------------------------------------------------------
    # Admission and growth

    def get_computed_blocks(
        self,
        request_id: RequestId,
        token_ids: Sequence[int],
        extra_keys: tuple[ExtraKey, ...] = (),
    ) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of full blocks (group 0's), and the tokens it covers.

        Never the whole sequence: at least the last token is left to compute, since the engine
        needs its logits (a prompt that is entirely cached loses its last block to this rule).
        With windowed groups, a prefix of n blocks is a hit only if each windowed group also
        caches the blocks the token after it reads (the last window of the prefix), so the
        hit may be shorter than group 0's cached prefix. Reference counts are not changed;
        pass the blocks to `allocate_slots` right away, before any other allocation could
        evict the cached free ones among them (it looks the windowed groups' blocks up again).

        Adds ``len(token_ids)`` to group 0's pool's ``prefix_queries`` and the hit tokens to
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
            state = self._requests[request_id] = self._new_state(extra_keys)
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
        # Windowed groups: the longest hit whose last window is cached there too (be correct
        # first: try each shorter length; windows are a few blocks, prompts a few hundred).
        for group in range(1, self.num_groups):
            while hits and self._window_hits(group, hashes, len(hits)) is None:
                hits.pop()
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
        """Grow the request's tables to ``num_tokens + len(new_computed_blocks) * block_size +
        num_new_tokens`` tokens.

        ``new_computed_blocks`` are group 0's prefix hits from `get_computed_blocks`; they are
        appended to the table and shared (one more reference each); the windowed groups' hit
        blocks are looked up by the same hashes. ``token_ids`` is the request's token list so
        far; the table never covers more tokens than it holds.

        In windowed groups the blocks wholly before the window of the first token written
        (``write_start - window + 1``) are given back first and replaced by `NULL_BLOCK`; they
        count as free for this allocation (no kernel reads them in this step or later).

        If the first token to write lands in a partially filled block that other requests share
        (after a `fork`), that block is replaced in this request's table by a fresh copy and the
        pair ``(src, dst)`` is queued for `take_copies` (of its group).

        Returns group 0's blocks taken from the pool in this call (the copy-on-write block
        first, then the appended ones), or None when a pool lacks free blocks; in that case
        nothing changed (no partial allocation, prefix hits untouched, request state as
        before).

        Raises:
            ValueError: inconsistent arguments (negative count, table past ``token_ids``,
                prefix blocks not aligned or no longer carrying the expected hash).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        state = self._requests.get(request_id)
        tables = state.tables if state is not None else [[] for _ in self.windows]
        num_tokens = state.num_tokens if state is not None else 0
        new_computed = list(new_computed_blocks)
        hits_by_group: list[list[KVCacheBlock]] = [new_computed] + [[] for _ in self.windows[1:]]

        if new_computed:
            if state is None:
                raise ValueError(f"request {request_id!r}: prefix blocks without lookup")
            if num_tokens != len(tables[0]) * bs:
                raise ValueError("prefix blocks must follow a table of full blocks")
            # A cached free block evicted between lookup and allocation would silently feed
            # another request's KV to this one; refuse instead of corrupting output.
            hashes = state.block_hashes
            start = len(tables[0])
            stale = ValueError(
                "prefix blocks are stale: call allocate_slots right after get_computed_blocks")
            for i, block in enumerate(new_computed):
                if start + i >= len(hashes) or block.block_hash != hashes[start + i]:
                    raise stale
            end = start + len(new_computed)
            for group in range(1, self.num_groups):
                if start:  # a hit only ever follows an empty table (admission)
                    raise ValueError("prefix blocks must follow an empty table with KV groups")
                window_hits = self._window_hits(group, hashes, end)
                if window_hits is None:
                    raise stale
                hits_by_group[group] = window_hits
        write_start = num_tokens + len(new_computed) * bs
        total = write_start + num_new_tokens
        if total > len(token_ids):
            raise ValueError(
                f"request {request_id!r}: {total} token slots asked for, only "
                f"{len(token_ids)} tokens exist"
            )

        # Plan every group before changing any, so that a shortage changes nothing.
        plans = []
        for group, (table, hits) in enumerate(zip(tables, hits_by_group, strict=True)):
            pool = self.pools[group]
            # Blocks leaving the window (only ever in a windowed group, never hits).
            lo = self.window_start(group, write_start)
            leaving = [b for b in table[:lo] if b is not NULL_BLOCK]
            released = sum(1 for b in leaving if b.ref_cnt == 1)
            # Copy-on-write: only the block holding write_start can be partial and shared;
            # every block after it is new, and full shared blocks are only read.
            cow_index = -1
            if num_new_tokens and write_start % bs and table[write_start // bs].ref_cnt > 1:
                cow_index = write_start // bs
            num_to_allocate = max(_cdiv(total, bs) - len(table) - len(hits), 0)
            # Reviving cached free prefix blocks takes them out of the free queue too.
            num_revived = sum(1 for b in hits if b is not NULL_BLOCK and b.ref_cnt == 0)
            need = num_to_allocate + (cow_index >= 0) + num_revived
            if need > pool.num_free_blocks + released:
                return None
            plans.append((lo, leaving, cow_index, num_to_allocate))

        # Commit. Touch before allocating so our own prefix hits cannot be evicted below.
        if state is None:
            state = self._requests[request_id] = self._new_state(())
        if new_computed and state.num_cached_blocks == len(state.blocks):
            # The prefix blocks are registered already; cache_blocks can skip them.
            state.num_cached_blocks += len(new_computed)
        fresh: list[KVCacheBlock] = []
        for group, (lo, leaving, cow_index, num_to_allocate) in enumerate(plans):
            pool, table, hits = self.pools[group], state.tables[group], hits_by_group[group]
            pool.touch(b for b in hits if b is not NULL_BLOCK)
            table.extend(hits)
            if leaving:
                table[:lo] = [NULL_BLOCK] * lo
                # Oldest first, so evicted first: a later prefix hit needs the blocks of the
                # last window before its end, the ones nearest the window most likely.
                pool.free_blocks(leaving)
            taken: list[KVCacheBlock] = []
            if cow_index >= 0:
                src = table[cow_index]
                (dst,) = pool.get_new_blocks(1)
                table[cow_index] = dst
                pool.free_blocks([src])  # still held by the others: stays in use
                self._pending_copies[group].append((src.block_id, dst.block_id))
                taken.append(dst)
            appended = pool.get_new_blocks(num_to_allocate)
            table.extend(appended)
            taken.extend(appended)
            if group == 0:
                fresh = taken
        state.num_tokens = total
        return fresh

    def allocate_prefix(self, request_id: RequestId, token_ids: Sequence[int]
                        ) -> tuple[list[int], ...] | None:
        """Fresh tables for all of ``token_ids`` (a whole number of blocks) as a prefix hit on
        them would need them: every block in group 0, the blocks of the last window (of the
        token after them) in windowed groups, placeholders before. For loading saved KV
        (prompt caches): write the returned blocks, `cache_blocks`, then `free`. Returns the
        tables (`block_tables`), or None when a pool is short (nothing changed).

        Raises:
            ValueError: the request already holds blocks, or the tokens end mid-block.
        """
        n, bs = len(token_ids), self.block_size
        if n % bs:
            raise ValueError(f"a prefix of {n} tokens ends inside a block of {bs}")
        state = self._requests.get(request_id)
        if state is not None and state.blocks:
            raise ValueError(f"request {request_id!r} already holds blocks")
        starts = [self.window_start(g, n) for g in range(self.num_groups)]
        if any(n // bs - lo > pool.num_free_blocks
               for lo, pool in zip(starts, self.pools, strict=True)):
            return None
        if state is None:
            state = self._requests[request_id] = self._new_state(())
        for lo, pool, table in zip(starts, self.pools, state.tables, strict=True):
            table.extend([NULL_BLOCK] * lo + pool.get_new_blocks(n // bs - lo))
        state.num_tokens = n
        return self.block_tables(request_id)

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
        for pool, table in zip(self.pools, state.tables, strict=True):
            for i in range(state.num_cached_blocks, num_full):
                if table[i] is not NULL_BLOCK:  # given back before it was registered
                    pool.cache_full_block(table[i], hashes[i])
        state.num_cached_blocks = num_full

    def window_intact(self, request_id: RequestId, num_tokens: int) -> bool:
        """Whether the tables still hold every block a query at position ``num_tokens``
        reads, i.e. whether `truncate` to ``num_tokens`` tokens leaves a usable table."""
        state = self._state(request_id)
        keep = _cdiv(num_tokens, self.block_size)
        return all(
            all(b is not NULL_BLOCK for b in table[self.window_start(g, num_tokens):keep])
            for g, table in enumerate(state.tables)
        )

    def truncate(self, request_id: RequestId, num_tokens: int) -> None:
        """Shrink the request's tables to ``num_tokens`` tokens, giving back the blocks past them.

        Speculative decoding allocates slots for proposed tokens before it knows how many are
        accepted; the rejected ones are given back here. Only blocks that no longer hold any of
        the kept tokens are freed (tail first, like `free`); the partial block that keeps some
        of them stays, and its stale tail slots are simply overwritten later. Registered
        (hashed) blocks are never dropped: `cache_blocks` only hashes computed tokens, and the
        caller never truncates below those. Nor may it truncate so far back that a windowed
        group already gave back a block the next token reads (see `window_intact`).

        Raises:
            ValueError: ``num_tokens`` is negative, above the table, below a hashed block, or
                behind a window whose blocks were given back.
        """
        state = self._state(request_id)
        if not 0 <= num_tokens <= state.num_tokens:
            raise ValueError(f"request {request_id!r}: cannot truncate {state.num_tokens} "
                             f"tokens to {num_tokens}")
        keep = _cdiv(num_tokens, self.block_size)
        if num_tokens < state.num_cached_blocks * self.block_size:
            raise ValueError(f"request {request_id!r}: truncating to {num_tokens} tokens would "
                             f"drop registered blocks")
        if not self.window_intact(request_id, num_tokens):
            raise ValueError(f"request {request_id!r}: truncating to {num_tokens} tokens needs "
                             f"window blocks that were already given back")
        for pool, table in zip(self.pools, state.tables, strict=True):
            dropped = table[keep:]
            del table[keep:]
            pool.free_blocks(reversed(dropped))
        state.num_tokens = num_tokens

    # ---------------------------------------------------------------------------------------
    # Sharing and release

    def fork(self, parent_id: RequestId, child_id: RequestId) -> None:
        """Give ``child_id`` the parent's whole block tables, sharing every block.

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
        for pool, table in zip(self.pools, parent.tables, strict=True):
            pool.touch(b for b in table if b is not NULL_BLOCK)
        self._requests[child_id] = _RequestState(
            extra_keys=parent.extra_keys,
            tables=[list(t) for t in parent.tables],
            num_tokens=parent.num_tokens,
            num_cached_blocks=parent.num_cached_blocks,
            block_hashes=list(parent.block_hashes),
        )

    def take_copies(self, group: int = 0) -> list[tuple[int, int]]:
        """Return and clear ``group``'s pending copy-on-write pairs ``(src_block_id,
        dst_block_id)``.

        The backend must copy them in this order, in that group's pool, before the forward
        pass that writes into the destination blocks.
        """
        pairs, self._pending_copies[group] = self._pending_copies[group], []
        return pairs

    def free(self, request_id: RequestId) -> None:
        """Release the request's blocks (tail first) and forget it. Unknown ids are ignored."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        for group, (pool, table) in enumerate(zip(self.pools, state.tables, strict=True)):
            # Reverse: the tail is the least shareable part, so it should be evicted first.
            pool.free_blocks(b for b in reversed(table) if b is not NULL_BLOCK)
            if self._pending_copies[group]:
                # A copy into a block nobody holds any more is wasted work.
                self._pending_copies[group] = [
                    (src, dst) for src, dst in self._pending_copies[group]
                    if pool.blocks[dst].ref_cnt > 0
                ]

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only possible while no block is in use (see `BlockPool`)."""
        if any(p.num_used_blocks for p in self.pools):
            return False
        for pool in self.pools:
            pool.reset_prefix_cache()
        for state in self._requests.values():
            state.num_cached_blocks = 0
            state.block_hashes.clear()
        return True

    # ---------------------------------------------------------------------------------------
    # Checking

    def check_invariants(self) -> None:
        """Verify pools and tables agree; raises AssertionError on the first breach.

        Checks, in every group: free + used == total; every block's ref_cnt equals the number
        of tables holding it; no block is both free and referenced; a hashed block in a table
        is full and carries the hash of its position; the prefix map only points at blocks
        carrying that hash. Tables of all groups cover the same tokens; placeholders appear
        only in windowed groups, only as a leading run, and never where the window of the
        request's next token reaches. O(total blocks): for tests and debugging.
        """
        bs = self.block_size
        for group, pool in enumerate(self.pools):
            pool.check_invariants()
            _check(pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks, "free + used")
            holders = [0] * pool.num_blocks
            for rid, state in self._requests.items():
                _check(len(state.tables) == self.num_groups, f"request {rid!r}: tables")
                table = state.tables[group]
                _check(
                    len(table) == _cdiv(state.num_tokens, bs),
                    f"request {rid!r} group {group}: {len(table)} blocks for "
                    f"{state.num_tokens} tokens",
                )
                live = [b for b in table if b is not NULL_BLOCK]
                nulls = len(table) - len(live)
                _check(all(b is NULL_BLOCK for b in table[:nulls]),
                       f"request {rid!r} group {group}: a placeholder after a live block")
                _check(nulls <= self.window_start(group, state.num_tokens),
                       f"request {rid!r} group {group}: {nulls} blocks given back inside the "
                       f"window of token {state.num_tokens}")
                _check(
                    len({id(b) for b in live}) == len(live),
                    f"request {rid!r} holds a block twice",
                )
                _check(
                    state.num_cached_blocks <= len(table),
                    f"request {rid!r}: more blocks cached than held",
                )
                for i, block in enumerate(table):
                    if block is NULL_BLOCK:
                        continue
                    _check(pool.blocks[block.block_id] is block,
                           f"foreign block {block.block_id}")
                    holders[block.block_id] += 1
                    if block.block_hash is not None:
                        _check(
                            (i + 1) * bs <= state.num_tokens,
                            f"request {rid!r}: partial block {block.block_id} is hashed",
                        )
                        _check(
                            i < len(state.block_hashes)
                            and state.block_hashes[i] == block.block_hash,
                            f"request {rid!r}: block {block.block_id} carries another "
                            f"position's hash",
                        )
            for block in pool.blocks:
                _check(
                    block.ref_cnt == holders[block.block_id],
                    f"group {group} block {block.block_id}: ref_cnt {block.ref_cnt}, held by "
                    f"{holders[block.block_id]} tables",
                )
                _check(
                    not (block in pool.free_queue and holders[block.block_id]),
                    f"block {block.block_id} is free and referenced",
                )
        _check(NULL_BLOCK.ref_cnt == 0 and NULL_BLOCK.block_hash is None
               and NULL_BLOCK.prev_free is None, "the placeholder block was used")
