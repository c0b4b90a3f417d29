"""KV cache block management (pure Python: no arrays live here)."""

from .simple import SimpleBlockAllocator

__all__ = ["SimpleBlockAllocator"]
