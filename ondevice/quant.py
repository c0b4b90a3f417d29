"""MLX's affine group quantization in NumPy, bit for bit in the stored layout.

A quantized matrix ``W[out, in]`` is stored as ``weight`` (uint32, ``in * bits / 32`` words per
row, element ``j`` of a word in bits ``[j*bits, (j+1)*bits)``), ``scales`` and ``biases``
(``[out, in / group_size]``); ``W ~= q * scale + bias`` group by group.
"""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedModelError

SUPPORTED_BITS = (2, 4, 8)


def _check(bits: int, group_size: int, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(f"{bits}-bit quantization is not supported (2, 4 or 8)")
    if group_size <= 0 or in_features % group_size:
        raise UnsupportedModelError(
            f"input size {in_features} is not a multiple of the group size {group_size}"
        )


def quantize(
    w: np.ndarray, group_size: int = 64, bits: int = 4, scale_dtype=np.float16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w[..., in]`` to (packed uint32 weight, scales, biases)."""
    w = np.asarray(w, dtype=np.float32)
    _check(bits, group_size, w.shape[-1])
    levels = (1 << bits) - 1
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    w_min = groups.min(axis=-1, keepdims=True)
    w_max = groups.max(axis=-1, keepdims=True)
    scale = (w_max - w_min) / np.float32(levels)
    scale = np.where(scale == 0, np.float32(1), scale)
    # Round scale and bias to their stored dtype first so that dequantization uses exactly the
    # numbers the codes were chosen for.
    scale = scale.astype(scale_dtype).astype(np.float32)
    scale = np.where(scale == 0, np.float32(np.finfo(scale_dtype).tiny), scale)
    bias = w_min.astype(scale_dtype).astype(np.float32)
    q = np.clip(np.rint((groups - bias) / scale), 0, levels).astype(np.uint32)
    q = q.reshape(*w.shape[:-1], w.shape[-1] // (32 // bits), 32 // bits)
    shifts = (np.arange(32 // bits, dtype=np.uint32) * bits).astype(np.uint32)
    packed = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    return packed, scale[..., 0].astype(scale_dtype), bias[..., 0].astype(scale_dtype)


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int
) -> np.ndarray:
    """Inverse of :func:`quantize`: float32 ``[..., in]``."""
    packed = np.asarray(packed, dtype=np.uint32)
    per_word = 32 // bits
    in_features = packed.shape[-1] * per_word
    _check(bits, group_size, in_features)
    if scales.shape != biases.shape or scales.shape[-1] * group_size != in_features:
        raise UnsupportedModelError(
            f"quantized tensor shapes disagree: weight {packed.shape}, scales {scales.shape}, "
            f"biases {biases.shape}, group size {group_size}, bits {bits}"
        )
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    q = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    q = q.reshape(*packed.shape[:-1], in_features // group_size, group_size).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    return (q * s + b).reshape(*packed.shape[:-1], in_features)


def packed_shape(shape: tuple[int, ...], group_size: int, bits: int) -> dict[str, tuple[int, ...]]:
    """Stored shapes of the three tensors of a quantized ``shape`` matrix."""
    *lead, in_features = shape
    _check(bits, group_size, in_features)
    return {
        "weight": (*lead, in_features * bits // 32),
        "scales": (*lead, in_features // group_size),
        "biases": (*lead, in_features // group_size),
    }
