"""The wgpu backend: the one model definition as WGSL compute shaders on any WebGPU adapter.

Weights and the paged KV pool live in GPU storage buffers. Every op of a forward pass records
one or more dispatches into a single command encoder (one compute pass); the logits op ends it,
copies the logits into a mapped staging buffer, submits once and reads back. So an engine step
is one submit and one readback.

Precision: ``float16`` (the default when the adapter has ``shader-f16``) stores dense weights
and the KV pool as f16 and computes in f32; ``float32`` stores everything as f32 (the golden
and conformance checks run there). Quantized weights keep their MLX-affine packing.

Modules, one job each:

- :mod:`.adapter`: which adapter and dtype (from ``WgpuOptions``, else the environment)
- :mod:`.device`: the device, its pipeline/parameter caches and buffer pool; ``GTensor``
- :mod:`.wgsl`: kernel sources from ``ondevice.shaders`` and the WGSL generated around them
- :mod:`.loader`: checkpoint tensors into (split) GPU buffers
- :mod:`.kvpool`: the paged KV pool in parts of whole blocks; block I/O
- :mod:`.recorder`: one command encoder per step, one submit, readback
- :mod:`.ops`: the ``Ops`` protocol as dispatches, and the device top-k
- :mod:`.backend`: :class:`WgpuBackend`, the ``Backend`` contract over the above
"""

from __future__ import annotations

from ...settings import WgpuOptions
from .adapter import AdapterInfo, adapter_report, choose_adapter, choose_dtype
from .backend import WgpuBackend
from .device import WgpuError

BACKEND = WgpuBackend

__all__ = ["BACKEND", "AdapterInfo", "WgpuBackend", "WgpuError", "WgpuOptions",
           "adapter_report", "choose_adapter", "choose_dtype"]
