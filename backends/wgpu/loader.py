"""The loader: checkpoint tensors into GPU buffers.

Dense weights are stored in the backend's dtype (f16 or f32); quantized ones keep their
MLX-affine packing (uint32 codes, dequantized inside the shaders) with scales and biases as
float32 pairs. A matrix larger than one storage binding (``max-storage-buffer-binding-size``,
128 MiB on Mesa lavapipe) is split into row ranges, one buffer each, and dispatched per part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...modeldir import ModelDir, QuantizedTensor
from ..base import PageRelease
from .device import Device, WgpuError

F32 = np.float32
# Bit widths the quantized kernels read: each uint32 word holds 32 / bits codes, taken in
# vec4s (gemv_q.wgsl, matmul_q.wgsl, embedding_q.wgsl).
PACKED_BITS = frozenset({2, 4, 8})


@dataclass
class Part:
    """Rows ``lo:hi`` of a matrix in their own buffer(s): ``w`` (dense, or packed codes) and,
    when quantized, ``sb`` (float32 scale/bias pairs per group)."""

    lo: int
    hi: int
    w: Any
    sb: Any = None


@dataclass
class Matrix:
    """A linear layer's or embedding table's weight, split into row parts that each fit one
    storage binding. ``quant`` is (group_size, bits) or None; ``wtype`` "f32" or "f16"."""

    parts: list[Part]
    out_features: int
    in_features: int
    wtype: str
    quant: tuple[int, int] | None = None
    bias: Any = None


def row_parts(rows: int, bytes_per_row: int, max_binding: int) -> list[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` of a matrix whose parts each fit one storage binding."""
    if bytes_per_row > max_binding:
        raise WgpuError(f"a weight row of {bytes_per_row} bytes exceeds the adapter's "
                        f"storage binding limit of {max_binding} bytes")
    per = max(1, max_binding // max(1, bytes_per_row))
    return [(lo, min(rows, lo + per)) for lo in range(0, rows, per)]


class WgpuLoader:
    """Uploads checkpoint tensors into GPU buffers on ``dev``, splitting any larger than
    ``max_binding`` bytes, and drops the checkpoint's mapped pages as it goes (load-time page
    release, :class:`~ondevice.backends.base.PageRelease`)."""

    def __init__(self, dev: Device, model_dir: ModelDir, *, f16: bool, max_binding: int):
        self.dev = dev
        self.f16 = f16
        self.max_binding = max_binding
        self.release = PageRelease(model_dir)

    def matrix(self, w) -> Matrix:
        dev = self.dev
        if isinstance(w, QuantizedTensor) and w.bits not in PACKED_BITS:
            # The kernels decode only codes that tile a 32-bit word (2/4/8 bits); other widths
            # (5/6-bit GGUF imports) are dequantized at load to the compute dtype.
            w = w.dequantize()
        if isinstance(w, QuantizedTensor):
            out, inp = w.shape
            packed = np.asarray(w.weight, dtype=np.uint32)
            sb = np.stack([np.asarray(w.scales, F32), np.asarray(w.biases, F32)], axis=-1)
            row_bytes = max(packed.shape[1] * 4, sb.shape[1] * 8)
            parts = []
            for lo, hi in row_parts(out, row_bytes, self.max_binding):
                parts.append(Part(lo, hi, dev.buffer(packed[lo:hi]), dev.buffer(sb[lo:hi])))
                self.release.copied(packed[lo:hi].nbytes)
            return Matrix(parts, out, inp, "f32", (w.group_size, w.bits))
        out, inp = w.shape
        np_type = np.float16 if self.f16 else F32
        parts = []
        for lo, hi in row_parts(out, inp * np.dtype(np_type).itemsize, self.max_binding):
            block = np.asarray(w[lo:hi], dtype=np_type)
            parts.append(Part(lo, hi, dev.buffer(block)))
            self.release.copied(block.nbytes)
        return Matrix(parts, out, inp, "f16" if self.f16 else "f32")

    def embedding(self, w) -> Matrix:
        return self.matrix(w)

    def linear(self, w, bias) -> Matrix:
        m = self.matrix(w)
        if bias is not None:
            m.bias = self.dev.buffer(np.asarray(bias, F32))
        return m

    def norm(self, w) -> Any:
        return self.dev.buffer(np.asarray(w, F32))

    def tied_lm_head(self, embed: Matrix, w) -> Matrix:
        return embed  # the same buffers serve row lookups and the head
