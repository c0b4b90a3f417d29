"""KV block management: free queue, chained hashes, BlockPool, KVCacheManager.

Exact cases pin block ids and eviction order; a Hypothesis state machine drives the manager the
way the engine does (admission, decode, fork, free) under eviction pressure and checks, after
every step, the invariants plus the *content* every request would read through its block table
from a simulated physical KV pool.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ondevice.kv.blocks import FreeBlockQueue, KVCacheBlock
from ondevice.kv.hashing import (
    BlockHash,
    encode_extra_keys,
    hash_block_tokens,
    hash_request_blocks,
)
from ondevice.kv.layout import KVLayout, split_kv_budget, window_blocks
from ondevice.kv.manager import NULL_BLOCK, KVCacheManager
from ondevice.kv.pool import BlockPool

BS = 4


def seq(*values: int, n: int = BS) -> list[int]:
    """Each value repeated ``n`` times: ``seq(1, 2)`` is two full blocks [1,1,1,1,2,2,2,2]."""
    return [v for v in values for _ in range(n)]


def snapshot(kv: KVCacheManager) -> tuple:
    """Everything allocate_slots may change, as plain values (every KV group)."""
    return (
        [(
            [(b.block_id, b.ref_cnt, b.block_hash) for b in pool.blocks],
            [b.block_id for b in pool.free_queue],
            {h: b.block_id for h, b in pool._cached.items()},
            pool.num_cached_free_blocks,
            pool.prefix_queries,
            pool.prefix_hits,
        ) for pool in kv.pools],
        {
            rid: (s.extra_keys, [[b.block_id for b in t] for t in s.tables], s.num_tokens,
                  s.num_cached_blocks)
            for rid, s in kv._requests.items()
        },
        [list(p) for p in kv._pending_copies],
    )


def admit(kv: KVCacheManager, rid: str, tokens: list[int], extra_keys: tuple = ()):
    """The engine's admission: prefix lookup, allocation, then registering full blocks."""
    hits, n = kv.get_computed_blocks(rid, tokens, extra_keys)
    new = kv.allocate_slots(rid, tokens, len(tokens) - n, hits)
    if new is not None:
        kv.cache_blocks(rid, tokens, len(tokens))
    return hits, n, new


# --------------------------------------------------------------------------------------------
# FreeBlockQueue


def test_free_queue_order_remove_and_errors():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and [b.block_id for b in q] == [0, 1, 2, 3, 4]
    q.remove(blocks[2])  # from the middle
    q.remove(blocks[4])  # the tail
    assert [b.block_id for b in q] == [0, 1, 3] and len(q) == 3
    assert blocks[2] not in q and blocks[3] in q
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert [b.block_id for b in q] == [1, 3, 2, 0]
    with pytest.raises(ValueError):
        q.append(blocks[3])  # already queued
    with pytest.raises(ValueError):
        q.remove(blocks[4])  # not queued
    assert [q.popleft().block_id for _ in range(4)] == [1, 3, 2, 0]
    assert len(q) == 0 and list(q) == []
    with pytest.raises(IndexError):
        q.popleft()
    assert all(b.prev_free is None and b.next_free is None for b in blocks)


# --------------------------------------------------------------------------------------------
# Hashing

_SCRIPT = """
from ondevice.kv.hashing import hash_request_blocks
hs = hash_request_blocks(list(range(10)), 4, ("smollm2-135m", 7, b"\\x00", None))
print(",".join(h.hex() for h in hs))
"""


def test_hash_is_deterministic_across_processes():
    here = hash_request_blocks(list(range(10)), 4, ("smollm2-135m", 7, b"\x00", None))
    assert len(here) == 2  # the trailing 2 tokens are not a full block
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's hash() would differ; ours must not
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    assert out == ",".join(h.hex() for h in here)


def test_hash_matches_the_documented_byte_format():
    def u32(n: int) -> bytes:
        return struct.pack("<I", n)

    keys = b"".join(
        [u32(4), b"S", u32(2), b"m1", b"I", u32(1), b"\x07", b"N", b"B", u32(1), b"\xff"]
    )
    assert encode_extra_keys(("m1", 7, None, b"\xff")) == keys
    first = hashlib.sha256(
        b"ondevice.kv.block\x00v1\x00" + b"\x00" + u32(2) + struct.pack("<2q", 5, -1) + keys
    ).digest()
    assert hash_block_tokens(None, [5, -1], ("m1", 7, None, b"\xff")) == first
    second = hashlib.sha256(
        b"ondevice.kv.block\x00v1\x00" + b"\x01" + first + u32(1) + struct.pack("<q", 9) + keys
    ).digest()
    assert hash_block_tokens(BlockHash(first), [9], ("m1", 7, None, b"\xff")) == second


def test_hash_sensitivity():
    toks = [1, 2, 3, 4]
    base = hash_block_tokens(None, toks, ("model-a",))
    assert len(base) == 32 and isinstance(base, bytes)
    assert hash_block_tokens(None, toks, ("model-a",)) == base
    assert hash_block_tokens(None, toks, ("model-b",)) != base  # model id
    assert hash_block_tokens(None, toks, ()) != base
    assert hash_block_tokens(None, [1, 2, 4, 3], ("model-a",)) != base  # token order
    parent1 = hash_block_tokens(None, [9, 9, 9, 9])
    parent2 = hash_block_tokens(None, [9, 9, 9, 8])
    child1 = hash_block_tokens(parent1, toks, ("model-a",))
    assert child1 != base  # a parent vs none
    assert child1 != hash_block_tokens(parent2, toks, ("model-a",))  # which parent
    # Tags and length prefixes keep distinct key tuples apart.
    assert hash_block_tokens(None, toks, (1,)) != hash_block_tokens(None, toks, ("1",))
    assert hash_block_tokens(None, toks, ("a", "b")) != hash_block_tokens(None, toks, ("ab",))
    assert hash_block_tokens(None, toks, (b"x",)) != hash_block_tokens(None, toks, ("x",))
    assert hash_block_tokens(None, toks, (None,)) != hash_block_tokens(None, toks, ())
    assert hash_block_tokens(None, toks, (-1,)) != hash_block_tokens(None, toks, (255,))
    # The chain of a token list equals block-by-block hashing.
    first = hash_block_tokens(None, [9, 9, 9, 9], ("model-a",))
    chain = hash_request_blocks([9, 9, 9, 9, *toks, 5], 4, ("model-a",))
    assert chain == [first, hash_block_tokens(first, toks, ("model-a",))]
    assert hash_request_blocks([1, 2, 3], 4) == []


@pytest.mark.parametrize("bad", [(1.5,), (True,), ([1],), ((1, 2),), (object(),)])
def test_hash_rejects_unsupported_extra_keys(bad):
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], bad)


def test_hash_rejects_bad_containers_parent_and_tokens():
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], "model-id")  # a str is not a tuple of keys
    with pytest.raises(TypeError):
        hash_block_tokens(b"short", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        hash_block_tokens(None, [2**63])
    with pytest.raises(TypeError):
        KVCacheManager(4, extra_keys=(1.0,))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# BlockPool


def test_pool_allocate_free_touch_and_cache():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert (a.block_id, b.block_id, a.ref_cnt) == (0, 1, 1)
    h = hash_block_tokens(None, [1, 2])
    assert pool.cache_full_block(a, h) and pool.get_cached_block(h) is a
    assert not pool.cache_full_block(b, h)  # the existing mapping wins
    assert b.block_hash is None and pool.get_cached_block(h) is a
    with pytest.raises(ValueError):
        pool.cache_full_block(a, hash_block_tokens(None, [3]))  # another hash
    pool.free_blocks([b, a])
    assert [x.block_id for x in pool.free_queue] == [2, 3, 1, 0]
    assert pool.num_cached_free_blocks == 1 and pool.usage == 0.0
    pool.touch([a])  # revive the cached free block
    assert a.ref_cnt == 1 and a not in pool.free_queue and pool.num_cached_free_blocks == 0
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.num_free_blocks == 3  # the failed call popped nothing
    with pytest.raises(ValueError):
        pool.free_blocks([b])  # double free
    with pytest.raises(ValueError):
        pool.cache_full_block(b, h)  # free blocks are not cached
    assert not pool.reset_prefix_cache()  # a is in use
    pool.free_blocks([a])
    assert pool.reset_prefix_cache()
    assert a.block_hash is None and pool.get_cached_block(h) is None
    pool.check_invariants()


def test_pool_without_caching_never_hashes():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    assert not pool.cache_full_block(a, h)
    assert a.block_hash is None and pool.get_cached_block(h) is None
    pool.check_invariants()


# --------------------------------------------------------------------------------------------
# KVCacheManager: exact cases


def test_lru_eviction_order_and_evicted_hashes():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a, b = seq(1, 2), seq(3, 4)
    admit(kv, "a", a)
    admit(kv, "b", b)
    assert kv.block_ids("a") == [0, 1] and kv.block_ids("b") == [2, 3]
    ha, hb = hash_request_blocks(a, BS), hash_request_blocks(b, BS)
    kv.free("a")  # freed first -> evicted first; each request tail first
    kv.free("b")
    assert [blk.block_id for blk in kv.pool.free_queue] == [4, 5, 1, 0, 3, 2]
    assert kv.stats()["blocks_cached_free"] == 4
    new = kv.allocate_slots("c", seq(7, 8, 9), 3 * BS)
    assert [blk.block_id for blk in new] == [4, 5, 1]
    # Block 1 (a's tail) was evicted; a's head block 0 and all of b survive.
    assert kv.pool.get_cached_block(ha[1]) is None
    assert kv.pool.get_cached_block(ha[0]).block_id == 0
    assert [kv.pool.get_cached_block(h).block_id for h in hb] == [2, 3]
    assert kv.pool.blocks[1].block_hash is None
    kv.check_invariants()
    assert [blk.block_id for blk in kv.allocate_slots("d", seq(5), BS)] == [0]
    assert kv.pool.get_cached_block(ha[0]) is None and kv.stats()["blocks_cached_free"] == 2


def test_reverse_free_keeps_the_head_prefix_longest():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    prompt = seq(1, 2, 3)
    admit(kv, "a", prompt)
    kv.free("a")
    assert [b.block_id for b in kv.pool.free_queue] == [2, 1, 0]
    assert [b.block_id for b in kv.allocate_slots("x", seq(9), BS)] == [2]  # a's tail goes
    hits, n = kv.get_computed_blocks("a2", prompt + [5])
    assert [b.block_id for b in hits] == [0, 1] and n == 2 * BS


def test_prefix_hit_reuses_blocks_and_counts_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = seq(1, 2) + [7, 7]
    b = seq(1, 2) + [8, 8, 8, 8, 8]
    admit(kv, "a", a)
    hits, n, new = admit(kv, "b", b)
    assert n == 8 and [blk.block_id for blk in hits] == [0, 1]
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == [0, 1, 3, 4]
    assert [blk.block_id for blk in new] == [3, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in range(5)] == [2, 2, 1, 1, 1]
    stats = kv.stats()
    assert stats["prefix_queries"] == len(a) + len(b) and stats["prefix_hits"] == 8
    assert stats["blocks_used"] == 5 and stats["usage"] == 0.5
    kv.check_invariants()
    kv.free("a")
    assert [kv.pool.blocks[i].ref_cnt for i in range(3)] == [1, 1, 0]  # b still holds 0, 1
    kv.check_invariants()


def test_cached_free_blocks_are_revived_by_hash_not_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = seq(1, 2, 3)
    admit(kv, "a", prompt)
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.pool.num_cached_free_blocks == 3
    hits, n, new = admit(kv, "b", prompt + [4])
    assert [blk.block_id for blk in hits] == [0, 1, 2] and n == 12
    # Touching took the hits out of the free queue before the new block was popped.
    assert [blk.block_id for blk in new] == [3] and kv.block_ids("b") == [0, 1, 2, 3]
    assert kv.num_free_blocks == 0 and kv.pool.num_cached_free_blocks == 0
    kv.check_invariants()


def test_cached_free_blocks_lost_to_eviction_give_no_hit():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = seq(1, 2, 3)
    admit(kv, "a", prompt)
    kv.free("a")
    kv.allocate_slots("x", seq(9, 9), 2 * BS)  # pops 3 (never used), then 2 (a's tail)
    assert kv.block_ids("x") == [3, 2]
    hits, n = kv.get_computed_blocks("b", prompt + [4])
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8  # the chain breaks at block 2


def test_get_computed_blocks_never_returns_the_whole_prompt():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, "a", seq(1, 2) + [3])
    hits, n, new = admit(kv, "b", seq(1, 2))  # fully cached: last block recomputed
    assert n == 4 and [blk.block_id for blk in hits] == [0]
    assert len(new) == 1 and kv.block_ids("b") == [0, new[0].block_id]
    assert kv.pool.blocks[new[0].block_id].block_hash is None  # duplicate of block 1
    assert kv.get_computed_blocks("c", seq(1, 2) + [3])[1] == 8  # one token left: full hit
    assert kv.get_computed_blocks("d", seq(1))[1] == 0
    assert kv.get_computed_blocks("e", [1])[1] == 0
    kv.check_invariants()


def test_duplicate_content_keeps_the_first_mapping():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    prompt = seq(1, 2) + [3]
    for rid in ("a", "b"):  # both admitted before either is cached: no hit for b
        hits, n = kv.get_computed_blocks(rid, prompt)
        assert n == 0
        kv.allocate_slots(rid, prompt, len(prompt), hits)
    kv.cache_blocks("a", prompt, len(prompt))
    kv.cache_blocks("b", prompt, len(prompt))
    h = hash_request_blocks(prompt, BS)
    assert [kv.pool.get_cached_block(x).block_id for x in h] == [0, 1]
    assert [kv.pool.blocks[i].block_hash for i in (3, 4)] == [None, None]
    kv.check_invariants()
    kv.free("b")
    assert kv.pool.num_cached_free_blocks == 0  # b's duplicates are plain free blocks


def test_copy_on_write_after_fork():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = seq(1) + [2, 2]  # one full block and a partial one holding 2 tokens
    admit(kv, "p", prompt)
    kv.fork("p", "c")
    assert kv.block_ids("c") == kv.block_ids("p") == [0, 1]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    kv.check_invariants()
    # The child writes first into the shared partial block: it gets a copy.
    new = kv.allocate_slots("c", prompt + [5], 1)
    assert [b.block_id for b in new] == [2]
    assert kv.block_ids("c") == [0, 2] and kv.block_ids("p") == [0, 1]
    assert kv.take_copies() == [(1, 2)] and kv.take_copies() == []
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [2, 1, 1]
    # The parent is now the only holder of block 1 and writes in place.
    assert kv.allocate_slots("p", prompt + [6], 1) == []
    assert kv.take_copies() == [] and kv.block_ids("p") == [0, 1]
    # Appending past full shared blocks needs no copy; the full block stays shared.
    assert [b.block_id for b in kv.allocate_slots("c", prompt + [5, 5, 5], 2)] == [3]
    assert kv.take_copies() == [] and kv.pool.blocks[0].ref_cnt == 2
    kv.check_invariants()


def test_fork_of_a_full_table_shares_everything_and_pending_copy_dropped_on_free():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = seq(1, 2)
    admit(kv, "p", prompt)
    kv.fork("p", "c")
    assert [b.block_id for b in kv.allocate_slots("c", prompt + [3], 1)] == [2]
    assert kv.take_copies() == [] and kv.block_ids("c") == [0, 1, 2]
    # A copy whose destination is freed before the step runs is dropped.
    kv.fork("c", "g")
    kv.allocate_slots("g", prompt + [3, 4], 1)
    assert kv.block_ids("g") == [0, 1, 3]
    kv.free("g")
    assert kv.take_copies() == []
    kv.check_invariants()
    with pytest.raises(KeyError):
        kv.fork("nobody", "x")
    with pytest.raises(ValueError):
        kv.fork("p", "c")  # c already holds blocks


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    admit(kv, "a", seq(1, 2, 3))  # blocks 0..2, all cached
    before = snapshot(kv)
    assert kv.allocate_slots("b", seq(5, 6), 2 * BS) is None  # 2 needed, 1 free
    assert snapshot(kv) == before and "b" not in kv
    kv.free("a")
    # 3 cached free hits + 2 new blocks = 5 blocks > 4: the hits count against the free pool.
    prompt = seq(1, 2, 3, 4, 5)
    hits, n = kv.get_computed_blocks("b", prompt)
    assert n == 12
    before = snapshot(kv)
    assert kv.allocate_slots("b", prompt, len(prompt) - n, hits) is None
    assert snapshot(kv) == before
    assert all(b.ref_cnt == 0 and b in kv.pool.free_queue for b in hits)
    kv.free("b")
    # A copy-on-write that does not fit changes nothing either.
    admit(kv, "p", [1, 1])
    kv.fork("p", "c")
    kv.allocate_slots("x", seq(7, 7, 7), 3 * BS)
    assert kv.num_free_blocks == 0
    before = snapshot(kv)
    assert kv.allocate_slots("c", [1, 1, 2], 1) is None
    assert snapshot(kv) == before
    kv.check_invariants()


def test_allocate_slots_rejects_inconsistent_calls():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    with pytest.raises(ValueError):
        kv.allocate_slots("a", [1, 2], 3)  # more slots than tokens
    with pytest.raises(ValueError):
        kv.allocate_slots("a", [1, 2], -1)
    admit(kv, "a", seq(1, 2, 3))
    kv.free("a")
    hits, _ = kv.get_computed_blocks("b", seq(1, 2, 3, 4))
    kv.allocate_slots("x", seq(9, 9, 9, 9, 9), 5 * BS)  # evicts the hits
    with pytest.raises(ValueError, match="stale"):
        kv.allocate_slots("b", seq(1, 2, 3, 4), 4, hits)
    with pytest.raises(ValueError):
        kv.cache_blocks("x", seq(9, 9, 9, 9, 9), 5 * BS + 1)
    with pytest.raises(ValueError):
        kv.get_computed_blocks("x", seq(9))  # x already holds blocks
    with pytest.raises(KeyError):
        kv.block_ids("nobody")


def test_extra_keys_separate_caches():
    a = KVCacheManager(num_blocks=8, block_size=BS, extra_keys=("model-a",))
    prompt = seq(1, 2) + [3]
    admit(a, "r", prompt)
    assert a.get_computed_blocks("s", prompt)[1] == 8
    assert a.get_computed_blocks("t", prompt, ("lora-x",))[1] == 0  # per-request key
    with pytest.raises(ValueError):
        a.get_computed_blocks("t", prompt, ("lora-y",))  # keys of a request are fixed
    admit(a, "u", prompt, ("lora-x",))
    assert a.get_computed_blocks("v", prompt, ("lora-x",))[1] == 8
    h_a = a.pool.blocks[0].block_hash
    b = KVCacheManager(num_blocks=8, block_size=BS, extra_keys=("model-b",))
    admit(b, "r", prompt)
    assert b.pool.blocks[0].block_hash != h_a  # a persisted cache cannot cross models
    assert h_a == hash_request_blocks(prompt, BS, ("model-a",))[0]


def test_free_is_idempotent_and_everything_returns():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    admit(kv, "a", seq(1, 2) + [1])
    kv.free("a")
    kv.free("a")
    kv.free("never-seen")
    assert kv.num_free_blocks == 6 and kv.stats()["requests"] == 0
    kv.check_invariants()


def test_reset_prefix_cache_and_disabled_caching():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    prompt = seq(1, 2) + [1]
    admit(kv, "a", prompt)
    assert not kv.reset_prefix_cache()
    kv.free("a")
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks("b", prompt)[1] == 0
    kv.check_invariants()

    off = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=False)
    admit(off, "a", prompt)
    assert all(b.block_hash is None for b in off.pool.blocks)
    assert off.get_computed_blocks("b", prompt) == ([], 0)
    assert off.stats()["prefix_queries"] == 0
    off.check_invariants()


def test_cache_blocks_hashes_only_computed_full_blocks():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    tokens = seq(1, 2)
    kv.allocate_slots("a", tokens, 8)
    kv.cache_blocks("a", tokens + [9], 7)  # the second block is not fully computed yet
    assert [kv.pool.blocks[i].block_hash is not None for i in (0, 1)] == [True, False]
    kv.cache_blocks("a", tokens + [9], 8)
    assert kv.pool.blocks[1].block_hash == hash_request_blocks(tokens, BS)[1]
    kv.check_invariants()


def test_check_invariants_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    admit(kv, "a", seq(1) + [2])
    kv.pool.blocks[1].block_hash = kv.pool.blocks[0].block_hash  # a partial block "hashed"
    with pytest.raises(AssertionError):
        kv.check_invariants()
    kv.pool.blocks[1].block_hash = None
    kv.pool.blocks[0].ref_cnt += 1
    with pytest.raises(AssertionError):
        kv.check_invariants()


# --------------------------------------------------------------------------------------------
# KV groups: a sliding-window group beside the full-attention one (window 6 = 1.5 blocks)

W = 6


def windowed(num_blocks=(12, 8), caching=True) -> KVCacheManager:
    return KVCacheManager(list(num_blocks), block_size=BS, enable_caching=caching,
                          extra_keys=("m",), windows=(0, W))


def decode_to(kv: KVCacheManager, rid, tokens: list[int], have: int, upto: int) -> None:
    for n in range(have, upto):
        assert kv.allocate_slots(rid, tokens[: n + 1], 1) is not None
        kv.cache_blocks(rid, tokens, n + 1)


def test_window_group_gives_back_blocks_wholly_before_the_window():
    kv = windowed()
    tokens = list(range(40))
    admit(kv, "a", tokens[:10])
    assert kv.block_tables("a") == ([0, 1, 2], [0, 1, 2])  # a prefill keeps its chunk
    # Writing token 10 (reads 5..10): block 0 (tokens 0-3) is wholly before the window.
    decode_to(kv, "a", tokens, 10, 11)
    assert kv.block_ids("a", 1) == [-1, 1, 2] and kv.block_ids("a") == [0, 1, 2]
    assert kv.pools[1].blocks[0].block_hash is not None  # given back, still cached
    assert [b.block_id for b in kv.pools[1].free_queue][-1] == 0  # evicted last
    decode_to(kv, "a", tokens, 11, 30)
    # Token 29 reads 24..29: blocks 6 and 7 only; the full group holds all 8.
    assert kv.block_ids("a", 1) == [-1] * 6 + kv.block_ids("a", 1)[6:]
    assert kv.num_live_blocks("a", 1) == 2 and kv.num_live_blocks("a") == 8
    kv.check_invariants()
    # 8 local blocks held a 30-token sequence that needs 8: freeing made room as it went.
    assert kv.pools[1].num_free_blocks == 8 - 2
    kv.free("a")
    kv.check_invariants()
    assert kv.pools[1].num_free_blocks == 8 and kv.stats()["groups"][1]["window"] == W


def test_window_group_shortage_is_a_failed_allocation_that_changes_nothing():
    kv = windowed(num_blocks=(12, 3))
    before = snapshot(kv)
    assert kv.allocate_slots("a", list(range(13)), 13) is None  # 4 local blocks for a chunk
    assert snapshot(kv) == before
    # In chunks of 4 it fits: each step frees what left the window.
    tokens = list(range(24))
    for n in range(0, 24, 4):
        assert kv.allocate_slots("a", tokens, 4) is not None, n
    assert kv.num_live_blocks("a", 1) <= 3 and kv.num_tokens("a") == 24
    kv.check_invariants()
    kv.free("a")
    kv.free("never")
    kv.check_invariants()


def test_window_prefix_hit_needs_the_last_window_of_the_hit():
    kv = windowed(num_blocks=(12, 6))
    shared = list(range(100, 120))  # 5 full blocks
    tokens = shared + [7, 7, 7]
    admit(kv, "a", tokens)
    decode_to(kv, "a", tokens + [8, 8], 23, 25)  # the window moves on: blocks 0-3 given back
    kv.free("a")
    # A prompt of the 20 shared tokens + 3: 5 blocks hit; the token after them (20) reads
    # 15..20, i.e. local block 3 (12-15) and 4 (16-19) must be cached: they are.
    hits, n = kv.get_computed_blocks("b", shared + [1, 2, 3])
    assert n == 20 and [b.block_id for b in hits] == [0, 1, 2, 3, 4]
    new = kv.allocate_slots("b", shared + [1, 2, 3], 3, hits)
    assert new is not None
    table = kv.block_ids("b", 1)
    assert table[:3] == [-1, -1, -1] and table[3:5] == [3, 4]  # the cached local blocks
    kv.check_invariants()
    kv.free("b")
    # Evict local block 3 (its hash) by allocating every other local block: the hit shrinks
    # to the longest prefix whose last window is still cached (here none reaches).
    evict = kv.pools[1].get_new_blocks(6)
    kv.pools[1].free_blocks(evict)
    hits, n = kv.get_computed_blocks("c", shared + [1, 2, 3])
    assert n == 0 and hits == []
    kv.free("c")
    kv.check_invariants()


def test_window_fork_copy_on_write_in_both_groups():
    kv = windowed()
    tokens = list(range(14))  # 3.5 blocks: the last block is partial
    admit(kv, "a", tokens)
    kv.fork("a", "b")
    assert kv.block_tables("b") == kv.block_tables("a")
    assert kv.allocate_slots("b", tokens + [1], 1) is not None
    # Both groups copy their shared partial last block (index 3) for b.
    assert kv.take_copies(0) == [(3, 4)] and kv.take_copies(1) == [(3, 4)]
    assert kv.block_ids("b", 1) == [-1, -1, 2, 4]  # and b's window moved past blocks 0-1
    assert kv.block_ids("a", 1) == [0, 1, 2, 3]  # a still holds them
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    kv.check_invariants()


def test_window_truncate_refuses_to_cut_back_past_given_back_blocks():
    kv = windowed(caching=False)
    tokens = list(range(30))
    assert kv.allocate_slots("a", tokens, 10) is not None
    # Slots for 8 proposed tokens at once: written from 10, so only blocks before 5 leave.
    assert kv.allocate_slots("a", tokens[:18], 8) is not None
    assert kv.window_intact("a", 12)
    kv.truncate("a", 12)
    kv.check_invariants()
    # A draft model's decode steps move the window one token at a time, past where it may
    # have to come back to.
    decode_to(kv, "a", tokens, 12, 24)
    assert not kv.window_intact("a", 13)
    with pytest.raises(ValueError, match="given back"):
        kv.truncate("a", 13)
    assert kv.window_intact("a", 23)
    kv.truncate("a", 23)
    kv.check_invariants()


def test_window_allocate_prefix_for_loading_saved_kv():
    kv = windowed(num_blocks=(12, 3))
    tokens = list(range(20))
    tables = kv.allocate_prefix("load", tokens)
    # The token after the prefix (20) reads 15..20: local blocks 3 and 4 only.
    assert tables == ([0, 1, 2, 3, 4], [-1, -1, -1, 0, 1])
    kv.cache_blocks("load", tokens, 20)
    kv.free("load")
    hits, n = kv.get_computed_blocks("q", tokens + [5])
    assert n == 20
    kv.free("q")
    with pytest.raises(ValueError, match="inside a block"):
        kv.allocate_prefix("x", tokens[:6])
    small = windowed(num_blocks=(4, 3))
    before = snapshot(small)
    assert small.allocate_prefix("y", tokens) is None and snapshot(small) == before
    kv.check_invariants()


def test_invariants_catch_a_block_given_back_inside_the_window():
    kv = windowed()
    admit(kv, "a", list(range(10)))
    table = kv._requests["a"].tables[1]
    blocks = table[:2]  # tokens 0-7; the next token (10) reads 5..10
    table[:2] = [NULL_BLOCK] * 2
    kv.pools[1].free_blocks(blocks)
    with pytest.raises(AssertionError, match="inside the window"):
        kv.check_invariants()
    table[0], table[1] = NULL_BLOCK, kv.pools[1].blocks[5]  # a placeholder, then live
    with pytest.raises(AssertionError):
        kv.check_invariants()


def test_kv_layout_groups_and_budget_split():
    from tiny import tiny_config, tiny_gemma_config

    from ondevice.config import ModelConfig

    gemma = ModelConfig.from_dict(tiny_gemma_config(sliding_window=10))
    layout = KVLayout.for_config(gemma)
    assert layout.windows == (0, 10) and layout.layer_group == (1, 0, 1)
    assert layout.layers(1) == (0, 2) and layout.index_in_group(2) == 1
    assert KVLayout.for_config(gemma, paging=False) == KVLayout.single(3)
    assert KVLayout.for_config(ModelConfig.from_dict(tiny_config())).num_groups == 1
    all_full = tiny_gemma_config(layer_types=["full_attention"] * 3)
    assert KVLayout.for_config(ModelConfig.from_dict(all_full)).num_groups == 1
    with pytest.raises(ValueError):
        KVLayout((10, 0), (0, 1))  # group 0 must be the full-attention group
    # Decode reads back ceil(w / bs) + 1 blocks at most; a chunk of n adds its own.
    assert [window_blocks(10, 4, 1), window_blocks(8, 4, 1), window_blocks(10, 4, 8)] == \
        [4, 3, 6]
    # 1 KiB per layer-block; 1 global, 2 local layers. Keeping every block: equal counts.
    assert split_kv_budget(300 << 10, KVLayout.single(3), 1024, 4,
                           max_num_seqs=1, chunk=8) == (100,)
    # Paging: the local group gets 1 sequence's window + chunk (4 + 1 + 2 = 7 blocks) and
    # the global group the rest: (300 - 7 * 2) KiB = 286 blocks, vs 100 each.
    assert split_kv_budget(300 << 10, layout, 1024, 4, max_num_seqs=1, chunk=8) == (286, 7)
    # Many sequences: the local share is capped at the equal split, never more.
    assert split_kv_budget(300 << 10, layout, 1024, 4, max_num_seqs=64, chunk=8) == (100, 100)


# --------------------------------------------------------------------------------------------
# Property test: the engine's call pattern under eviction pressure

# Prompts are built from a few fixed blocks so that prefixes repeat and hit the cache.
CHUNKS = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1), (2, 0, 2, 0)]
prompts = st.builds(
    lambda chunks, tail: [t for c in chunks for t in c][:79] + tail,
    st.lists(st.sampled_from(CHUNKS), max_size=20),
    st.lists(st.integers(0, 2), min_size=1, max_size=4),
).map(lambda p: p[:80])
LORAS = st.sampled_from([(), (), ("lora-x",)])


class KVMachine(RuleBasedStateMachine):
    """Mirrors the engine: every request's tokens, its computed count and its next token.

    ``physical`` simulates the backend's KV pools (one per KV group): each slot holds the
    (extra keys, token) whose KV was written there, so prefix sharing across models/LoRAs, a
    missing copy-on-write or an evicted-but-still-referenced block shows up as a request
    reading the wrong content. ``WINDOWS`` are the KV groups' windows: with a windowed group,
    each request must read back, there, every token of the window of its next token.
    """

    WINDOWS: tuple[int, ...] = (0,)

    def __init__(self):
        super().__init__()
        self.kv: KVCacheManager
        self.tokens: dict[int, list[int]] = {}  # computed tokens of each running request
        self.pending: dict[int, int] = {}  # sampled token not fed back yet
        self.start: dict[int, int] = {}  # first token written by its latest allocation
        self.lora: dict[int, tuple] = {}
        self.next_id = 0
        self.physical: list[dict[int, list[tuple | None]]] = []

    @initialize(num_blocks=st.integers(12, 20), window_blocks=st.integers(5, 14))
    def setup(self, num_blocks, window_blocks):
        counts = [num_blocks] + [window_blocks] * (len(self.WINDOWS) - 1)
        self.kv = KVCacheManager(counts, block_size=BS, extra_keys=("tiny-model",),
                                 windows=self.WINDOWS)
        self.physical = [{i: [None] * BS for i in range(n)} for n in counts]

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _run_step(self, rid: int, start: int, tokens: list[int]) -> None:
        # What the backend does: pending copies first, then the new tokens' KV.
        for group, physical in enumerate(self.physical):
            for src, dst in self.kv.take_copies(group):
                physical[dst] = list(physical[src])
            table = self.kv.block_ids(rid, group)
            for pos in range(start, len(tokens)):
                assert table[pos // BS] >= 0  # a new token never lands in a given-back block
                physical[table[pos // BS]][pos % BS] = (self.lora[rid], tokens[pos])

    # -- rules --------------------------------------------------------------------------------

    @rule(prompt=prompts, lora=LORAS)
    def admit(self, prompt, lora):
        rid = self._new_id()
        hits, n = self.kv.get_computed_blocks(rid, prompt, lora)
        assert n == len(hits) * BS and n < len(prompt)
        expected = hash_request_blocks(prompt, BS, ("tiny-model", *lora))
        assert [b.block_hash for b in hits] == expected[: len(hits)]
        before = snapshot(self.kv)
        new = self.kv.allocate_slots(rid, prompt, len(prompt) - n, hits)
        if new is None:
            assert snapshot(self.kv) == before
            self.kv.free(rid)
            return
        for table in self.kv.block_tables(rid):
            assert len(table) == -(-len(prompt) // BS)
        self.lora[rid] = lora
        self.start[rid] = n
        self._run_step(rid, n, prompt)
        self.tokens[rid] = list(prompt)
        self.pending[rid] = prompt[-1]  # a "sampled" token; content is arbitrary
        self.kv.cache_blocks(rid, prompt + [self.pending[rid]], len(prompt))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), k=st.integers(1, 5))
    def decode(self, data, k):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        old = self.tokens[rid]
        new_tokens = [self.pending[rid]] + data.draw(
            st.lists(st.integers(0, 2), min_size=k - 1, max_size=k - 1)
        )
        tokens = old + new_tokens
        before = snapshot(self.kv)
        new = self.kv.allocate_slots(rid, tokens, k)
        if new is None:
            assert snapshot(self.kv) == before
            return
        self.start[rid] = len(old)
        self._run_step(rid, len(old), tokens)
        self.tokens[rid] = tokens
        self.pending[rid] = data.draw(st.integers(0, 2))
        self.kv.cache_blocks(rid, tokens + [self.pending[rid]], len(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), k=st.integers(2, 5), accepted=st.integers(0, 4))
    def speculate(self, data, k, accepted):
        """Slots for the pending token and k - 1 proposals, then the rejected ones back."""
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        old = self.tokens[rid]
        tokens = old + [self.pending[rid]] + [1] * (k - 1)
        if self.kv.allocate_slots(rid, tokens, k) is None:
            return
        self.start[rid] = len(old)
        self._run_step(rid, len(old), tokens)
        keep = len(old) + 1 + min(accepted, k - 1)
        assert self.kv.window_intact(rid, keep)
        self.kv.truncate(rid, keep)
        self.tokens[rid] = tokens[:keep]
        self.pending[rid] = data.draw(st.integers(0, 2))
        self.kv.cache_blocks(rid, self.tokens[rid] + [self.pending[rid]], keep)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.kv.fork(parent, child)
        assert self.kv.block_tables(child) == self.kv.block_tables(parent)
        self.tokens[child] = list(self.tokens[parent])
        self.lora[child] = self.lora[parent]
        self.start[child] = self.start[parent]
        self.pending[child] = data.draw(st.integers(0, 2))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(rid)
        del self.tokens[rid], self.pending[rid], self.lora[rid], self.start[rid]
        assert rid not in self.kv

    @rule()
    def free_unknown(self):
        before = snapshot(self.kv)
        self.kv.free(-1)
        assert snapshot(self.kv) == before

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def consistent(self):
        kv = self.kv
        kv.check_invariants()
        assert kv.num_free_blocks + kv.pool.num_used_blocks == kv.num_blocks
        for group, (pool, physical) in enumerate(zip(kv.pools, self.physical, strict=True)):
            window = self.WINDOWS[group]
            holders = [0] * pool.num_blocks
            for rid, tokens in self.tokens.items():
                table = kv.block_ids(rid, group)
                assert kv.num_tokens(rid) == len(tokens)
                assert len(table) == -(-len(tokens) // BS)
                for i, block_id in enumerate(table):
                    if block_id < 0:
                        continue
                    holders[block_id] += 1
                    if (i + 1) * BS > len(tokens):
                        assert pool.blocks[block_id].block_hash is None  # partial: never hashed
                # Every computed token the next one reads back through the table as this
                # request wrote it (with a window, the window of the next token).
                first = max(0, len(tokens) - window + 1) if window else 0
                read = [physical[table[p // BS]][p % BS] for p in range(first, len(tokens))]
                assert read == [(self.lora[rid], t) for t in tokens[first:]]
                # Exactly the blocks wholly before the window of the latest allocation's first
                # token were given back (none in a full-attention group).
                lo = max(0, self.start[rid] - window + 1) // BS if window else 0
                assert all(b < 0 for b in table[:lo]) and all(b >= 0 for b in table[lo:])
            for block in pool.blocks:
                assert block.ref_cnt == holders[block.block_id]
                assert not (block in pool.free_queue and holders[block.block_id])
            assert kv.take_copies(group) == []  # every copy was consumed by its step

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for rid in list(self.tokens):
            self.kv.free(rid)
        self.kv.check_invariants()
        for pool in self.kv.pools:
            assert pool.num_free_blocks == pool.num_blocks and pool.usage == 0.0
        assert self.kv.stats()["requests"] == 0


class WindowKVMachine(KVMachine):
    """The same with a sliding-window group (window 6: 1.5 blocks) beside the full one."""

    WINDOWS = (0, 6)


KVMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_state_machine = KVMachine.TestCase
WindowKVMachine.TestCase.settings = KVMachine.TestCase.settings
test_kv_state_machine_with_a_window_group = WindowKVMachine.TestCase
