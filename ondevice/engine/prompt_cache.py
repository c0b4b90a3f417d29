"""Persistent prompt caches: the KV blocks of a prefix saved to safetensors and loaded back
into the pool, so that a later process skips that prefill (a long system prompt, say).

File: ``kv`` float32 ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` and ``token_ids``
int32, with ``__metadata__`` naming the format, the model id and the block size. Loading
checks all three against the running engine before a block is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, RequestError
from ..kv import hash_request_blocks
from ..weights import SafetensorsFile, SafetensorsWriter
from .engine import Engine, score_tokens

FORMAT = "ondevice-prompt-cache-1"


def _cached_blocks(engine: Engine, token_ids: list[int]) -> list[int]:
    """Block ids holding the prefix's full blocks, as long as they are cached."""
    hashes = hash_request_blocks(token_ids, engine.block_size, engine.kv.extra_keys)
    out = []
    for h in hashes:
        block = engine.kv.pool.get_cached_block(h)
        if block is None:
            break
        out.append(block.block_id)
    return out


def save_prompt_cache(engine: Engine, token_ids: list[int], path: str | Path) -> int:
    """Save the KV of the full blocks of ``token_ids``; returns the number of tokens saved.
    Runs on the engine thread (``EngineLoop.call``)."""
    token_ids = [int(t) for t in token_ids]
    num = len(token_ids) // engine.block_size * engine.block_size
    if num == 0:
        raise RequestError(f"a prompt cache needs at least one full block ({engine.block_size} tokens)")
    engine.validate(token_ids[:num])
    prefix = token_ids[:num]
    blocks = _cached_blocks(engine, prefix)
    if len(blocks) * engine.block_size < num:
        score_tokens(engine, prefix, logits_for="last", register=True)
        blocks = _cached_blocks(engine, prefix)
    kv = engine.backend.read_blocks(blocks)
    try:
        writer = SafetensorsWriter(
            path, [("kv", np.float32, kv.shape), ("token_ids", np.int32, (num,))],
            metadata={"format": FORMAT, "model_id": engine.model_id,
                      "block_size": str(engine.block_size), "num_tokens": str(num)},
        )
    except OSError as err:  # a missing directory, no permission, a full disk
        raise RequestError(f"cannot write the prompt cache {path}: {_os_reason(err)}") from None
    try:
        writer.write("kv", kv.astype(np.float32, copy=False))
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
        kv = f.get("kv")
        expected = engine.backend.kv_block_shape(len(token_ids) // engine.block_size)
        if len(token_ids) % engine.block_size or tuple(kv.shape) != expected:
            raise ModelFormatError(
                f"{path}: kv shape {list(kv.shape)} does not fit {len(token_ids)} tokens "
                f"(expected {list(expected)})"
            )
        engine.validate(token_ids)
        # NaN/Inf in the KV would poison every request that reuses these cached blocks (and
        # stay cached): refuse the file before a block is allocated.
        if not np.isfinite(kv).all():
            raise ModelFormatError(f"{path}: the prompt cache holds NaN or infinite KV values")
        rid = f"prompt-cache-load-{id(kv)}"
        try:
            if engine.kv.allocate_slots(rid, token_ids, len(token_ids)) is None:
                raise RequestError(f"not enough free KV blocks to load {len(token_ids)} tokens")
            engine.backend.write_blocks(engine.kv.block_ids(rid), kv)
            engine.kv.cache_blocks(rid, token_ids, len(token_ids))
        finally:
            engine.kv.free(rid)
    return len(token_ids)

