"""Core ML: export a model as a stateful ML Program with the paged KV interface, and verify
the saved package anywhere by evaluating its MIL program with NumPy.

* :func:`export_coreml` (``ondevice convert MODEL --to coreml -o OUT.mlpackage``)
* :func:`verify_coreml` (``ondevice verify-coreml OUT.mlpackage``)

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
