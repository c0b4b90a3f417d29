"""ggml's quantized blocks as MLX affine groups of 32, without a second quantization.

Every supported ggml type is an affine grid over runs of 32 values (a whole block, or a
sub-block of a 256-value K-quant super-block): ``value = code * scale + bias``. Decoding a
block's fields gives those codes, scales and biases directly, so a GGUF tensor becomes MLX's
affine layout (:mod:`ondevice.quant`) with the same dequantized values, bit for bit:

======  ====  ===========================  =====================================
type    bits  scale                        bias
======  ====  ===========================  =====================================
Q4_0    4     d                            -8 d
Q4_1    4     d                            m
Q5_0    5     d                            -16 d
Q5_1    5     d                            m
Q8_0    8     d                            -128 d      (code = int8 + 128)
Q4_K    4     d * sc[j]   (6-bit sc)       -(dmin * m[j])   (6-bit m)
Q5_K    5     d * sc[j]                    -(dmin * m[j])
Q6_K    8     see below
======  ====  ===========================  =====================================

Exactness: ``d`` and ``m`` are float16 and the codes have at most 8 bits, so every product
above is exact in float32, and ``code * scale + bias`` in float32 rounds (at most once, in
the final addition of Q4_1/Q5_1/K-quants) exactly like ggml's own ``d * q + m`` /
``d * q - dm``. Scales and biases are returned as float32; the caller stores them as float16
where that is exact (:func:`f16_exact`).

Q6_K uses sub-blocks of 16 values with signed 8-bit sub-scales (``value = d * sc * (q - 32)``,
q 6-bit), which no 32-value affine grid of 6 bits can hold. It is imported as 8 bits per
group of 32 with float16 scales: a group whose two sub-blocks share one integer lattice of at
most 256 points (e.g. equal sub-scales) is stored exactly; any other group is re-fitted to
256 levels between its minimum and maximum, a step about a quarter of Q6_K's own, so the
error added is a small fraction of what Q6_K already lost (measured in the tests).

Block layouts (byte offsets within one block) are ggml's ``block_q*`` structs
(ggml-common.h); the ``gguf`` package's dequantizers are the reference they are tested
against.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..quant import pack, unpack
from ..quant import quantize as affine_quantize

Q = GGMLQuantizationType
GROUP = 32
# Bits of the MLX layout each importable type maps onto.
BITS = {
    Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 8,
}
# Types whose values are reproduced exactly (Q6_K is re-fitted where it has to be).
EXACT_TYPES = frozenset(BITS) - {Q.Q6_K}
F32 = np.float32


def f16_exact(*arrays: np.ndarray) -> bool:
    """Whether every float32 value survives a round trip through float16 unchanged."""
    with np.errstate(over="ignore"):
        return all(
            np.array_equal(a.astype(np.float16).astype(F32), a) for a in arrays
        )


def _blocks(data: np.ndarray, qtype: Q) -> np.ndarray:
    """``[rows, bytes]`` tensor bytes as ``[rows * blocks per row, block bytes]``."""
    _, size = GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return data.reshape(-1, size)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """A little-endian float16 field of every block, as float32 ``[n, 1]``."""
    return blocks[:, offset:offset + 2].copy().view("<f2").astype(F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: the low nibbles are values 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits_of_u32(raw: np.ndarray) -> np.ndarray:
    """4 little-endian bytes -> their 32 bits, bit i as element i (uint8 0/1)."""
    return np.unpackbits(raw, axis=-1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block from its 12 packed bytes.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scale (low nibble) and min (high nibble)
    4-7.
    """
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(F32), mn.astype(F32)


def _q4_k_codes(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 codes: bytes 32i..32i+31 carry sub-block 2i (low nibbles) and 2i+1."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 256)


def decode(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8 ``[rows, cols]``), scales and biases (float32 ``[rows, cols / 32]``) of
    ``data``, one GGUF tensor's rows as ``[rows, bytes per row]`` in ``qtype``."""
    rows = data.shape[0]
    b = _blocks(data, qtype)
    codes, scales, biases = _DECODERS[qtype](b)
    return (codes.reshape(rows, -1), scales.reshape(rows, -1).astype(F32, copy=False),
            biases.reshape(rows, -1).astype(F32, copy=False))


def params(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """Only the scales and biases of :func:`decode` (cheap: the codes are not unpacked)."""
    b = _blocks(data, qtype)
    scales, biases = _PARAMS[qtype](b)
    rows = data.shape[0]
    return scales.reshape(rows, -1), biases.reshape(rows, -1)


def packed(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX affine ``(weight uint32, scales f32, biases f32)`` of ``data`` (see :func:`decode`)."""
    codes, scales, biases = decode(data, qtype)
    return pack(codes, BITS[qtype]), scales, biases


# --- the 32-value types -----------------------------------------------------------------


def _q4_0_params(b):
    d = _f16(b, 0)
    return d, d * F32(-8)


def _q4_0(b):
    s, bias = _q4_0_params(b)
    return _nibbles(b[:, 2:18]), s, bias


def _q4_1_params(b):
    return _f16(b, 0), _f16(b, 2)


def _q4_1(b):
    s, bias = _q4_1_params(b)
    return _nibbles(b[:, 4:20]), s, bias


def _q5_0_params(b):
    d = _f16(b, 0)
    return d, d * F32(-16)


def _q5_0(b):
    s, bias = _q5_0_params(b)
    return _nibbles(b[:, 6:22]) | (_bits_of_u32(b[:, 2:6]) << 4), s, bias


def _q5_1_params(b):
    return _f16(b, 0), _f16(b, 2)


def _q5_1(b):
    s, bias = _q5_1_params(b)
    return _nibbles(b[:, 8:24]) | (_bits_of_u32(b[:, 4:8]) << 4), s, bias


def _q8_0_params(b):
    d = _f16(b, 0)
    return d, d * F32(-128)


def _q8_0(b):
    s, bias = _q8_0_params(b)
    # int8 q -> code q + 128: flipping the sign bit of the two's complement byte.
    return b[:, 2:34] ^ np.uint8(0x80), s, bias


# --- K-quants: super-blocks of 256 values in 8 sub-blocks of 32 --------------------------


def _k_params(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    return d * sc, -(dmin * mn)


def _q4_k(b):
    s, bias = _k_params(b)
    return _q4_k_codes(b[:, 16:144]), s, bias


def _q5_k(b):
    s, bias = _k_params(b)
    low = _q4_k_codes(b[:, 48:176])
    # qh byte l holds bit 4 of value l of every sub-block: sub-block j in bit j.
    high = np.unpackbits(b[:, 16:48, None], axis=-1, bitorder="little")  # [n, 32 (l), 8 (j)]
    return low | (high.transpose(0, 2, 1).reshape(-1, 256) << 4), s, bias


def _q6_k_values(b) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K as integer multiples of ``d``: ``n = sc * (q - 32)`` ``[blocks, 256]`` and ``d``.

    Layout: ql (128 bytes), qh (64), 16 int8 sub-scales, d (f16). Each half h of the block
    (128 values) uses ql[64h:64h+64] and qh[32h:32h+32]; its four runs of 32 values t = 0-3
    take their low 4 bits from ql byte 64h + 32(t % 2) + l (low nibble for t < 2, high for
    t >= 2) and their top 2 bits from bits 2t, 2t+1 of qh byte 32h + l.
    """
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [n, half, t % 2, l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [n, half, -, l]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, t, l]
    high = (qh >> (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]) & 0x03
    q = (low | (high << 4)).reshape(-1, 256).astype(np.int32) - 32
    sc = b[:, 192:208].copy().view(np.int8).astype(np.int32)  # [n, 16]
    n = (q.reshape(-1, 16, 16) * sc[:, :, None]).reshape(-1, 256)
    return n, _f16(b, 208)


def _q6_k_lattice(n: np.ndarray, d: np.ndarray):
    """Per group of 32: whether its values ``n * d`` fit one lattice of <= 256 points with
    float16 scale and bias, and that lattice's codes, scale and bias."""
    groups = n.reshape(-1, 8, GROUP)
    lo = groups.min(axis=-1)
    step = np.maximum(np.gcd.reduce(groups - lo[..., None], axis=-1), 1)
    codes = (groups - lo[..., None]) // step[..., None]
    scale = (d * step).astype(F32)  # exact: step <= 8192, d has 11 significant bits
    bias = (d * lo).astype(F32)
    ok = (codes.max(axis=-1) <= 255) & f16_exact_mask(scale) & f16_exact_mask(bias)
    return ok, codes, scale, bias


def _q6_k(b):
    n, d = _q6_k_values(b)
    values = (n * d).astype(F32)  # exact: |n| <= 4096 and d has 11 significant bits
    # Re-fit every group to 256 levels with float16 scale and bias ...
    w, s16, b16 = affine_quantize(values, GROUP, 8, np.float16)
    codes = unpack(w, 8).reshape(-1, 8, GROUP)
    scales, biases = s16.astype(F32), b16.astype(F32)
    # ... then keep exactly the groups that lie on one small lattice.
    ok, lattice, exact_s, exact_b = _q6_k_lattice(n, d)
    codes = np.where(ok[..., None], lattice, codes).astype(np.uint8)
    return (codes.reshape(-1, 256), np.where(ok, exact_s, scales),
            np.where(ok, exact_b, biases))


def _q6_k_params(b):
    _, scales, biases = _q6_k(b)
    return scales, biases


def f16_exact_mask(a: np.ndarray) -> np.ndarray:
    """Elementwise :func:`f16_exact`."""
    with np.errstate(over="ignore"):
        return a.astype(np.float16).astype(F32) == a


def q6_k_exact_groups(data: np.ndarray) -> np.ndarray:
    """Which groups of 32 of a Q6_K tensor are imported exactly (bool ``[rows, cols / 32]``)."""
    ok, *_ = _q6_k_lattice(*_q6_k_values(_blocks(data, Q.Q6_K)))
    return ok.reshape(data.shape[0], -1)


_DECODERS = {
    Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
    Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
_PARAMS = {
    Q.Q4_0: _q4_0_params, Q.Q4_1: _q4_1_params, Q.Q5_0: _q5_0_params,
    Q.Q5_1: _q5_1_params, Q.Q8_0: _q8_0_params, Q.Q4_K: _k_params, Q.Q5_K: _k_params,
    Q.Q6_K: _q6_k_params,
}
