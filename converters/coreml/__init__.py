"""Core ML: export a model as a stateful ML Program with the paged KV interface, and the NumPy
MIL interpreter that evaluates a saved program anywhere.

* :func:`export_coreml` (``ondevice convert MODEL --to coreml -o OUT.mlpackage``)
* verification against the NumPy reference lives in :mod:`ondevice.bench.verify_coreml`
  (``ondevice verify-coreml OUT.mlpackage``), above the backends it compares with.

coremltools is imported only when an export runs.
"""

from __future__ import annotations

from .exporter import (
    MANIFEST_NAME,
    QUANTIZE_CHOICES,
    ExportOptions,
    export_coreml,
    read_manifest,
)

__all__ = [
    "MANIFEST_NAME", "QUANTIZE_CHOICES", "ExportOptions", "export_coreml", "read_manifest",
]
