"""MLX's affine group quantization in NumPy, bit for bit in MLX's stored layout.

A quantized matrix ``W[out, in]`` is stored as ``weight`` (uint32, ``in * bits / 32`` words per
row), ``scales`` and ``biases`` (``[out, in / group_size]``); ``W ~= q * scale + bias`` group by
group, with codes ``q`` in ``[0, 2**bits)``.

The codes of a row form one little-endian bit stream: code ``j`` occupies stream bits
``[j*bits, (j+1)*bits)``, and word ``k`` holds stream bits ``[32k, 32k+32)``. For 2, 4 and 8
bits a code never straddles a word (element ``j`` of a word sits at bits ``j*bits``); for 3,
5 and 6 bits some do, and 32 codes fill exactly ``bits`` words. This is what ``mx.quantize``
writes and ``mx.dequantize`` / ``mx.quantized_matmul`` read (checked in the tests).
"""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedModelError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Widths whose codes tile a 32-bit word; the others need the straddling path.
WORD_ALIGNED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(
            f"{bits}-bit quantization is not supported ({', '.join(map(str, SUPPORTED_BITS))})"
        )


def _check(bits: int, group_size: int, in_features: int) -> None:
    _check_bits(bits)
    if group_size <= 0 or in_features % group_size:
        raise UnsupportedModelError(
            f"input size {in_features} is not a multiple of the group size {group_size}"
        )
    if in_features * bits % 32:
        raise UnsupportedModelError(
            f"input size {in_features} at {bits} bits does not fill whole 32-bit words"
        )


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[..., n]`` (each below ``2**bits``) into uint32 ``[..., n*bits/32]``."""
    codes = np.asarray(codes)
    *lead, n = codes.shape
    if bits not in SUPPORTED_BITS or n * bits % 32:
        raise UnsupportedModelError(f"cannot pack {n} codes at {bits} bits into 32-bit words")
    if bits in WORD_ALIGNED_BITS:
        per = 32 // bits
        q = codes.reshape(*lead, n // per, per).astype(np.uint32)
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
        return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    # 32 codes make exactly `bits` words; build them in 64-bit lanes so that a code crossing
    # a word boundary can be split with one shift.
    q = codes.reshape(*lead, n // 32, 32).astype(np.uint64)
    words = np.zeros((*lead, n // 32, bits), np.uint64)
    for i in range(32):
        k, shift = divmod(i * bits, 32)
        v = q[..., i] << np.uint64(shift)
        words[..., k] |= v & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[..., k + 1] |= v >> np.uint64(32)
    return words.astype(np.uint32).reshape(*lead, n * bits // 32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 codes ``[..., words*32/bits]``."""
    packed = np.asarray(packed, dtype=np.uint32)
    *lead, nw = packed.shape
    if bits not in SUPPORTED_BITS or nw * 32 % bits:
        raise UnsupportedModelError(f"cannot unpack {nw} words at {bits} bits")
    mask = (1 << bits) - 1
    if bits in WORD_ALIGNED_BITS:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
        q = (packed[..., None] >> shifts) & np.uint32(mask)
        return q.astype(np.uint8).reshape(*lead, nw * per)
    if nw % bits:
        raise UnsupportedModelError(f"{nw} words are not whole runs of 32 {bits}-bit codes")
    words = packed.reshape(*lead, nw // bits, bits)
    out = np.empty((*lead, nw // bits, 32), np.uint8)
    for i in range(32):
        k, shift = divmod(i * bits, 32)
        v = words[..., k].astype(np.uint64) >> np.uint64(shift)
        if shift + bits > 32:
            v |= words[..., k + 1].astype(np.uint64) << np.uint64(32 - shift)
        out[..., i] = v & np.uint64(mask)
    return out.reshape(*lead, nw * 32 // bits)


def quantize(
    w: np.ndarray, group_size: int = 64, bits: int = 4, scale_dtype=np.float16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w[..., in]`` to (packed uint32 weight, scales, biases).

    Each group maps its minimum to code 0 and its maximum to the top code (our choice of
    codes; MLX's own ``mx.quantize`` picks slightly different ones, but both read the same
    layout).
    """
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
    q = np.clip(np.rint((groups - bias) / scale), 0, levels).astype(np.uint8)
    packed = pack(q.reshape(w.shape), bits)
    return packed, scale[..., 0].astype(scale_dtype), bias[..., 0].astype(scale_dtype)


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int
) -> np.ndarray:
    """Inverse of :func:`quantize`: float32 ``[..., in]``, computed as ``q * scale + bias``
    in float32 (the order of operations the GGUF import's exactness relies on)."""
    packed = np.asarray(packed, dtype=np.uint32)
    _check_bits(bits)
    in_features = packed.shape[-1] * 32 // bits
    _check(bits, group_size, in_features)
    if scales.shape != biases.shape or scales.shape[-1] * group_size != in_features \
            or scales.shape[:-1] != packed.shape[:-1]:
        raise UnsupportedModelError(
            f"quantized tensor shapes disagree: weight {packed.shape}, scales {scales.shape}, "
            f"biases {biases.shape}, group size {group_size}, bits {bits}"
        )
    q = unpack(packed, bits)
    q = q.reshape(*packed.shape[:-1], in_features // group_size, group_size).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    q *= s
    q += b
    return q.reshape(*packed.shape[:-1], in_features)


def packed_shape(shape: tuple[int, ...], group_size: int, bits: int) -> dict[str, tuple[int, ...]]:
    """Stored shapes of the three tensors of a quantized ``shape`` matrix."""
    *lead, in_features = shape
    _check(bits, group_size, in_features)
    return {
        "weight": (*lead, in_features * bits // 32),
        "scales": (*lead, in_features // group_size),
        "biases": (*lead, in_features // group_size),
    }
