"""Chained hashes of full KV cache blocks, stable across processes and machines.

A block's hash identifies the KV content of that block: it covers the block's own token ids,
the hash of the block before it (so it depends on the whole prefix) and *extra keys* such as the
model id or a LoRA name (the same tokens under another model have other KV). Equal hashes mean
the block's KV can be shared; that is what the prefix cache in `BlockPool` keys on.

The hashes must survive a restart (prompt caches are persisted to disk), so neither Python's
``hash()`` (salted per process) nor pickle (version-dependent) appear here. A `BlockHash` is the
32-byte SHA-256 digest of this byte string (``u32`` is a little-endian uint32)::

    b"ondevice.kv.block\\x00v1\\x00"
    parent:      b"\\x00"                        first block (no parent)
                 b"\\x01" + parent_digest        32 bytes
    tokens:      u32(len(token_ids)) + each id as a little-endian int64
    extra keys:  u32(len(extra_keys)) + for each key, in order:
                 None  -> b"N"
                 int   -> b"I" + u32(n) + n bytes, little-endian two's complement,
                          n = (bit_length + 8) // 8
                 str   -> b"S" + u32(n) + n bytes of UTF-8
                 bytes -> b"B" + u32(n) + the n bytes

The type tags and length prefixes make the encoding injective: ``("a", "b")`` and ``("ab",)``,
or ``1`` and ``"1"``, never hash alike. ``bool`` is rejected although it is an ``int``: ``True``
would otherwise silently mean the same as ``1``. Changing this format invalidates every persisted
cache, so bump the version tag if it ever has to change.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

__all__ = [
    "BLOCK_HASH_SIZE",
    "BlockHash",
    "ExtraKey",
    "encode_extra_keys",
    "hash_block_tokens",
    "hash_request_blocks",
]

BlockHash = NewType("BlockHash", bytes)
"""The 32-byte SHA-256 digest of one full block (see the module docstring for the format).

Plain ``bytes`` at run time: hashable, comparable, ``.hex()`` for logs and file names, and
``BlockHash(bytes.fromhex(text))`` to read one back.
"""

ExtraKey = str | int | bytes | None
"""The types allowed in ``extra_keys``; anything else raises `TypeError`."""

BLOCK_HASH_SIZE = 32

_DOMAIN = b"ondevice.kv.block\x00v1\x00"
_U32 = struct.Struct("<I")


def _encode_extra_key(key: object) -> bytes:
    # bool before int: bool is an int subclass, and True must not alias 1.
    if isinstance(key, bool):
        raise TypeError(f"extra keys must be str, int, bytes or None, got bool {key!r}")
    if key is None:
        return b"N"
    if isinstance(key, int):
        raw = int(key).to_bytes((key.bit_length() + 8) // 8, "little", signed=True)
        return b"I" + _U32.pack(len(raw)) + raw
    if isinstance(key, str):
        raw = key.encode("utf-8")
        return b"S" + _U32.pack(len(raw)) + raw
    if isinstance(key, bytes):
        return b"B" + _U32.pack(len(key)) + key
    raise TypeError(f"extra keys must be str, int, bytes or None, got {type(key).__name__} {key!r}")


def encode_extra_keys(extra_keys: Sequence[ExtraKey]) -> bytes:
    """The canonical byte encoding of ``extra_keys`` (count, then tagged keys).

    Raises:
        TypeError: ``extra_keys`` is not a tuple or list (a lone ``str`` would otherwise be
            read as a sequence of characters), or one of its keys has an unsupported type.
    """
    if not isinstance(extra_keys, tuple | list):
        raise TypeError(f"extra_keys must be a tuple, got {type(extra_keys).__name__}")
    return _U32.pack(len(extra_keys)) + b"".join(_encode_extra_key(k) for k in extra_keys)


def _hash_with_encoded_keys(
    parent: BlockHash | None, token_ids: Sequence[int], encoded_keys: bytes
) -> BlockHash:
    h = hashlib.sha256(_DOMAIN)
    if parent is None:
        h.update(b"\x00")
    else:
        if not isinstance(parent, bytes) or len(parent) != BLOCK_HASH_SIZE:
            raise TypeError(f"parent must be a {BLOCK_HASH_SIZE}-byte BlockHash or None")
        h.update(b"\x01")
        h.update(parent)
    n = len(token_ids)
    try:
        h.update(_U32.pack(n) + struct.pack(f"<{n}q", *token_ids))
    except struct.error as err:
        raise ValueError(f"token ids must be integers that fit in int64: {err}") from None
    h.update(encoded_keys)
    return BlockHash(h.digest())


def hash_block_tokens(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[ExtraKey] = ()
) -> BlockHash:
    """Hash one block: its parent's hash (None for the first block), its tokens, extra keys.

    The caller decides what a block is; the KV cache only ever hashes *full* blocks, because a
    partial block's KV is still being written.

    Raises:
        TypeError: an extra key is not str/int/bytes/None, or ``parent`` is not a digest.
        ValueError: a token id does not fit in int64.
    """
    return _hash_with_encoded_keys(parent, token_ids, encode_extra_keys(extra_keys))


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[ExtraKey] = (),
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """The chained hashes of every *full* block of ``token_ids`` (a trailing partial block is
    left out), starting from ``parent`` (None: the tokens start the sequence)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    encoded = encode_extra_keys(extra_keys)  # once, not per block
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _hash_with_encoded_keys(parent, token_ids[start : start + block_size], encoded)
        hashes.append(parent)
    return hashes
