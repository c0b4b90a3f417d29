"""KV cache block management, pure Python: no arrays live here (the backends own the pool)."""

from .blocks import FreeBlockQueue, KVCacheBlock
from .hashing import BlockHash, hash_block_tokens, hash_request_blocks
from .manager import KVCacheManager
from .pool import BlockPool

__all__ = ["BlockHash", "BlockPool", "FreeBlockQueue", "KVCacheBlock", "KVCacheManager",
           "hash_block_tokens", "hash_request_blocks"]
