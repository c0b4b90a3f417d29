"""Persistent prompt caches: the KV blocks of a prefix saved to safetensors and loaded back
into the pool, so that a later process skips that prefill (a long system prompt, say).

File: ``kv`` float32 ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` and ``token_ids``
int32, with ``__metadata__`` naming the format, the model id and the block size. Loading
checks all three against the running engine before a block is touched.

With KV groups (``ondevice.kv.layout``), ``kv`` holds group 0's layers (the full-attention
ones) and ``kv.<g>`` each windowed group's layers, for its last blocks only: those a request
continuing after the saved prefix reads (the earlier ones left the window). A request whose
prompt leaves the prefix earlier gets a shorter prefix hit, or none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, RequestError
from ..kv import hash_request_blocks
from ..weights import SafetensorsFile, SafetensorsWriter
from .engine import Engine, score_tokens

FORMAT = "ondevice-prompt-cache-1"


def _cached_blocks(engine: Engine, token_ids: list[int]) -> list[list[int]] | None:
    """Per KV group, the ids of the cached blocks that a full hit on ``token_ids`` (whole
    blocks) needs: all of group 0's, the last window's of windowed groups; None if one of
    them is not cached."""
    kv = engine.kv
    hashes = hash_request_blocks(token_ids, engine.block_size, kv.extra_keys)
    out = []
    for group, pool in enumerate(kv.pools):
        blocks = [pool.get_cached_block(h)
                  for h in hashes[kv.window_start(group, len(token_ids)):]]
        if any(b is None for b in blocks):
            return None
        out.append([b.block_id for b in blocks])
    return out


def _name(group: int) -> str:
    return "kv" if group == 0 else f"kv.{group}"


def save_prompt_cache(engine: Engine, token_ids: list[int], path: str | Path) -> int:
    """Save the KV of the full blocks of ``token_ids``; returns the number of tokens saved.
    Runs on the engine thread (``EngineLoop.call``)."""
    token_ids = [int(t) for t in token_ids]
    num = len(token_ids) // engine.block_size * engine.block_size
    if num == 0:
        raise RequestError(f"a prompt cache needs at least one full block ({engine.block_size} tokens)")
    engine.validate(token_ids[:num])
    prefix = token_ids[:num]
    groups = _cached_blocks(engine, prefix)
    if groups is None:
        score_tokens(engine, prefix, logits_for="last", register=True)
        groups = _cached_blocks(engine, prefix)
        if groups is None:  # evicted again at once: the pool is far too small
            raise RequestError(f"not enough free KV blocks to keep {num} tokens cached")
    kvs = [engine.backend.read_blocks(blocks, g) for g, blocks in enumerate(groups)]
    try:
        writer = SafetensorsWriter(
            path, [*((_name(g), np.float32, kv.shape) for g, kv in enumerate(kvs)),
                   ("token_ids", np.int32, (num,))],
            metadata={"format": FORMAT, "model_id": engine.model_id,
                      "block_size": str(engine.block_size), "num_tokens": str(num),
                      "kv_groups": str(len(kvs))},
        )
    except OSError as err:  # a missing directory, no permission, a full disk
        raise RequestError(f"cannot write the prompt cache {path}: {_os_reason(err)}") from None
    try:
        for g, kv in enumerate(kvs):
            writer.write(_name(g), kv.astype(np.float32, copy=False))
        writer.write("token_ids", np.asarray(prefix, dtype=np.int32))
        writer.close()
    except OSError as err:
        writer.abort()
        raise RequestError(f"cannot write the prompt cache {path}: {_os_reason(err)}") from None
    except BaseException:
        writer.abort()
        raise
    return num


def _os_reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def load_prompt_cache(engine: Engine, path: str | Path) -> int:
    """Load a saved prefix into the pool as cached blocks; returns its number of tokens.
    Runs on the engine thread."""
    path = Path(path)
    with SafetensorsFile(path) as f:
        meta = f.metadata
        if meta.get("format") != FORMAT:
            raise ModelFormatError(f"{path}: not an ondevice prompt cache")
        if meta.get("model_id") != engine.model_id:
            raise RequestError(f"{path}: the prompt cache was made with another model")
        if meta.get("block_size") != str(engine.block_size):
            raise RequestError(
                f"{path}: the prompt cache uses blocks of {meta.get('block_size')} tokens, "
                f"the engine {engine.block_size}"
            )
        if "kv" not in f or "token_ids" not in f or f.dtype("kv") != "F32":
            raise ModelFormatError(f"{path}: prompt cache without float32 kv and token_ids")
        # Integer ids in one dimension: a float array could hold NaN, a 2-D one rows.
        if f.dtype("token_ids") not in ("I32", "I64") or len(f.shape("token_ids")) != 1:
            raise ModelFormatError(
                f"{path}: token_ids must be a 1-D integer array, got {f.dtype('token_ids')} "
                f"{list(f.shape('token_ids'))}"
            )
        token_ids = [int(t) for t in f.get("token_ids")]
        n, bs, kvm = len(token_ids), engine.block_size, engine.kv
        if meta.get("kv_groups", "1") != str(kvm.num_groups) or any(
                _name(g) not in f for g in range(kvm.num_groups)):
            raise RequestError(f"{path}: the prompt cache has {meta.get('kv_groups', '1')} KV "
                               f"group(s), the engine {kvm.num_groups}")
        kvs = [f.get(_name(g)) for g in range(kvm.num_groups)]
        for g, kv in enumerate(kvs):
            expected = engine.backend.kv_block_shape(n // bs - kvm.window_start(g, n), g)
            if n % bs or f.dtype(_name(g)) != "F32" or tuple(kv.shape) != expected:
                raise ModelFormatError(
                    f"{path}: {_name(g)} shape {list(kv.shape)} does not fit {n} tokens "
                    f"(expected {list(expected)})"
                )
        engine.validate(token_ids)
        # NaN/Inf in the KV would poison every request that reuses these cached blocks (and
        # stay cached): refuse the file before a block is allocated.
        if not all(np.isfinite(kv).all() for kv in kvs):
            raise ModelFormatError(f"{path}: the prompt cache holds NaN or infinite KV values")
        rid = f"prompt-cache-load-{id(kvs)}"
        try:
            tables = kvm.allocate_prefix(rid, token_ids)
            if tables is None:
                raise RequestError(f"not enough free KV blocks to load {n} tokens")
            for g, (table, kv) in enumerate(zip(tables, kvs, strict=True)):
                engine.backend.write_blocks([b for b in table if b >= 0], kv, g)
            kvm.cache_blocks(rid, token_ids, n)
        finally:
            kvm.free(rid)
    return len(token_ids)

