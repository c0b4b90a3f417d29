"""numba kernels of the ``cpu`` backend: products with packed (MLX affine) weights, paged
attention with an online softmax, and the small row-wise ops.

Packed weights are read where they lie. MLX's 4-bit layout, seen as bytes, holds elements
``2i`` (low nibble) and ``2i + 1`` (high nibble) of a row in byte ``i``; 8-bit codes are one
byte each, in order. Instead of reading ``x`` with a stride of two (which stops LLVM from
vectorizing the inner loop), the activation row is rearranged once per call, group by group,
into its even elements followed by its odd elements, so every load in the inner loop is
contiguous. 5- and 6-bit codes (which straddle 32-bit words in MLX's layout) are repacked at
load into the same nibble plane plus a plane of their high bits (the same bytes in total).

Scales and biases stay 16-bit (float16 or bfloat16, read through a 65,536-entry table) or
float32: a decode step reads every byte of them, and expanding them to float32 would add
a fifth to the bytes a 4-bit decode step streams.

For one activation row the group sum is factored out, ``sum_j (q_j s + b) x_j = s sum_j q_j
x_j + b sum_j x_j``, so the inner loop is one convert and one multiply-add per weight.

The numba compile cache lives under the ondevice home (``cache/numba``) unless
``NUMBA_CACHE_DIR`` is set, so only the first start on a machine pays the JIT.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ..settings import home_dir

# libgomp's settings for numba's worker threads, read when numba first starts its pool:
# - OMP_WAIT_POLICY=PASSIVE: a worker waiting for the next parallel region sleeps instead of
#   spinning for long. Measured on the shared 2-core machine (load ~12): decode 45 ms/token
#   passive against 430-770 ms with libgomp spinning (default or GOMP_SPINCOUNT=20000),
#   since a spinning worker takes the core the Python thread needs.
# - GOMP_SPINCOUNT=3000: ...but it spins that many rounds first. Waking a sleeping worker
#   cost 52 us per parallel region (2.8 us spinning), and a forward pass runs over 150 of
#   them a few us of Python apart: passive alone, a q4 decode step of the default model took
#   15.7 ms against 11.1 ms with this, and f32 28.6 against 20.1 ms. With four busy
#   processes on the two cores it was no slower than passive (44-76 against 41-63 ms).
# A value the user set wins. These apply to every OpenMP runtime in the process (llama.cpp
# too), so `ondevice bench` runs its llama.cpp peer in a child process without the ones set
# here (THREAD_ENV_SET).
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
THREAD_ENV_SET = tuple(name for name in THREAD_ENV if name not in os.environ)
for _name in THREAD_ENV_SET:
    os.environ[_name] = THREAD_ENV[_name]

if not os.environ.get("NUMBA_CACHE_DIR"):
    # Read when each cached function is first compiled or loaded, so setting it here (before
    # the decorators below run) is enough even when numba was imported earlier.
    numba.config.CACHE_DIR = str(home_dir() / "cache" / "numba")

F32 = np.float32
# Fast-math without the no-NaN/no-Inf assumptions: the online softmax starts from -inf and
# SiLU's exp overflows to inf for very negative gates, both on purpose.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT = dict(cache=True, fastmath=FAST, nogil=True)
PAR = dict(JIT, parallel=True)
# Small helpers of the hot loops are inlined in numba's IR, so LLVM sees one loop nest
# (called as functions, the two-row dot ran 3x slower).
INLINE = dict(JIT, inline="always")

# float16 / bfloat16 bit patterns -> float32, exact (bfloat16 is the top half of a float32).
F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(F32)
BF16_TABLE = (np.arange(1 << 16, dtype=np.uint32) << 16).view(F32)
NO_TABLE = np.zeros(1, F32)  # scales stored as float32 need none


def _to_f32(v, table):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_to_f32, inline="always")
def _to_f32_impl(v, table):
    if isinstance(v, types.Integer):
        return lambda v, table: table[v]
    return lambda v, table: np.float32(v)


# -- a vectorizable exp ----------------------------------------------------------------------
# ``np.exp`` in a numba kernel is a scalar libm call per element (numba's vector math needs
# an SVML-patched LLVM, which the pip wheels are not), so loops over keys or activations
# did not vectorize (the gated activations ran at ~4 ns per element). This is Cephes' expf
# (range reduction by ln 2, a degree-6 polynomial; relative error about 1e-7) in plain
# arithmetic, with 2^n built from its exponent bits, so LLVM vectorizes the loops using it.
@intrinsic
def _i32_bits_as_f32(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(**INLINE)
def fast_exp(x):
    """exp(x) in float32; 0 below -87.33 (so exp(-inf) is 0), exp(88.37) above 88.37 (the
    largest power of two the exponent bits hold is 2^127)."""
    z = min(max(x, F32(-87.33)), F32(88.37))
    n = np.floor(z * F32(1.44269504) + F32(0.5))
    r = z - n * F32(0.693359375) + n * F32(2.12194440e-4)
    p = F32(1.9875691500e-4)
    p = p * r + F32(1.3981999507e-3)
    p = p * r + F32(8.3334519073e-3)
    p = p * r + F32(4.1665795894e-2)
    p = p * r + F32(1.6666665459e-1)
    p = p * r + F32(5.0000001201e-1)
    p = p * r * r + r + F32(1)
    e = p * _i32_bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
    return e if x > F32(-87.33) else F32(0)


# -- activations prepared once per product -------------------------------------------------
@njit(**JIT)
def _prepare_x(x, g):
    """Each group of ``x`` rows as [even elements, odd elements], and each group's sum."""
    t_rows, k = x.shape
    half = g // 2
    xd = np.empty((t_rows, k), F32)
    xs = np.empty((t_rows, k // g), F32)
    for t in range(t_rows):
        for gi in range(k // g):
            base = gi * g
            s = F32(0)
            for i in range(half):
                e = x[t, base + 2 * i]
                o = x[t, base + 2 * i + 1]
                xd[t, base + i] = e
                xd[t, base + half + i] = o
                s += e + o
            xs[t, gi] = s
    return xd, xs


# -- products with packed weights ------------------------------------------------------------
# Inner loops index row slices from 0: numba then emits no negative-index wraparound and LLVM
# sees contiguous loads (with ``w[n, b0 + i]`` it gathers lane by lane, 6x slower here), and
# codes are widened to int32, not numba's default int64, so a vector holds 16 of them.
@njit(**INLINE)
def _dot4(wr, xe, xo):
    a = F32(0)
    for i in range(wr.shape[0]):
        byte = np.int32(wr[i])
        a += F32(np.int32(byte & 15)) * xe[i] + F32(np.int32(byte >> 4)) * xo[i]
    return a


@njit(**INLINE)
def _dot(wr, xr):
    """One row dotted with another: 8-bit codes or float32 weights with an activation row."""
    a = F32(0)
    for i in range(wr.shape[0]):
        a += F32(wr[i]) * xr[i]
    return a


@njit(**INLINE)
def _dot_high(hr, xr, bits):
    """sum_j 16 * high_j * x_j over one group: the part of 5/6-bit codes above 4 bits."""
    a = F32(0)
    if bits == 5:  # one high bit per element, 8 per byte, in element order
        for i in range(xr.shape[0]):
            a += F32(np.int32((hr[i >> 3] >> (i & 7)) & 1)) * xr[i]
    else:  # two per element, 4 per byte
        for i in range(xr.shape[0]):
            a += F32(np.int32((hr[i >> 2] >> (2 * (i & 3))) & 3)) * xr[i]
    return F32(16) * a


@njit(**INLINE)
def _dot4x2(w0, w1, xe, xo):
    """``_dot4`` for two weight rows at once: each activation load feeds both (1.5x faster
    than one row at a time here; four rows at a time was slower again at groups of 32)."""
    a = F32(0)
    b = F32(0)
    for i in range(w0.shape[0]):
        c0 = np.int32(w0[i])
        c1 = np.int32(w1[i])
        e = xe[i]
        o = xo[i]
        a += F32(np.int32(c0 & 15)) * e + F32(np.int32(c0 >> 4)) * o
        b += F32(np.int32(c1 & 15)) * e + F32(np.int32(c1 >> 4)) * o
    return a, b


@njit(**INLINE)
def _dot8x2(w0, w1, xr):
    a = F32(0)
    b = F32(0)
    for i in range(w0.shape[0]):
        e = xr[i]
        a += F32(w0[i]) * e
        b += F32(w1[i]) * e
    return a, b


@njit(**INLINE)
def _group_dot(w, hi, n, xd, x, t, g, bits, gi):
    """sum_j q_j x_j over group ``gi`` of weight row ``n`` (codes only)."""
    k0 = gi * g
    half = g // 2
    if bits == 8:
        return _dot(w[n, k0:k0 + g], x[t, k0:k0 + g])
    a = _dot4(w[n, k0 // 2:k0 // 2 + half], xd[t, k0:k0 + half], xd[t, k0 + half:k0 + g])
    if bits != 4:
        hb = g * (bits - 4) // 8  # bytes of high bits per group
        a += _dot_high(hi[n, gi * hb:gi * hb + hb], x[t, k0:k0 + g], bits)
    return a


@njit(**INLINE)
def _group_dot2(w, hi, n, xd, x, t, g, bits, gi):
    """``_group_dot`` for rows ``n`` and ``n + 1``."""
    k0 = gi * g
    half = g // 2
    if bits == 8:
        return _dot8x2(w[n, k0:k0 + g], w[n + 1, k0:k0 + g], x[t, k0:k0 + g])
    b0 = k0 // 2
    a, b = _dot4x2(w[n, b0:b0 + half], w[n + 1, b0:b0 + half], xd[t, k0:k0 + half],
                   xd[t, k0 + half:k0 + g])
    if bits != 4:
        hb = g * (bits - 4) // 8
        a += _dot_high(hi[n, gi * hb:gi * hb + hb], x[t, k0:k0 + g], bits)
        b += _dot_high(hi[n + 1, gi * hb:gi * hb + hb], x[t, k0:k0 + g], bits)
    return a, b


@njit(**PAR)
def qgemv(x, w, hi, scales, biases, table, g, bits, y):
    """``y[t, n] = sum_j W[n, j] x[t, j]`` for a few rows ``t`` (decode), W packed.

    Pairs of W rows are split over threads; each weight row is read once and dotted with
    every row of ``x`` while it is in L1.
    """
    t_rows, k = x.shape
    n_rows = w.shape[0]
    ng = k // g
    xd, xs = _prepare_x(x, g)
    for n2 in prange((n_rows + 1) // 2):
        n = 2 * n2
        for t in range(t_rows):
            if n + 1 < n_rows:
                acc0 = F32(0)
                acc1 = F32(0)
                for gi in range(ng):
                    a, b = _group_dot2(w, hi, n, xd, x, t, g, bits, gi)
                    xsg = xs[t, gi]
                    acc0 += (_to_f32(scales[n, gi], table) * a
                             + _to_f32(biases[n, gi], table) * xsg)
                    acc1 += (_to_f32(scales[n + 1, gi], table) * b
                             + _to_f32(biases[n + 1, gi], table) * xsg)
                y[t, n] = acc0
                y[t, n + 1] = acc1
            else:
                acc = F32(0)
                for gi in range(ng):
                    a = _group_dot(w, hi, n, xd, x, t, g, bits, gi)
                    acc += (_to_f32(scales[n, gi], table) * a
                            + _to_f32(biases[n, gi], table) * xs[t, gi])
                y[t, n] = acc


@njit(**INLINE)
def _code_pair(w, hi, n, k0, i, bits):
    """The codes of elements ``k0 + 2i`` and ``k0 + 2i + 1`` of row ``n`` (4, 5 or 6 bits:
    the nibbles of byte ``k0 / 2 + i``, plus 16 times their high bits for 5 and 6)."""
    byte = np.int32(w[n, k0 // 2 + i])
    lo = byte & 15
    hh = byte >> 4
    j = 2 * i
    if bits == 5:
        h0 = k0 // 8
        lo += 16 * np.int32((hi[n, h0 + (j >> 3)] >> (j & 7)) & 1)
        hh += 16 * np.int32((hi[n, h0 + ((j + 1) >> 3)] >> ((j + 1) & 7)) & 1)
    elif bits == 6:
        h0 = k0 // 4
        lo += 16 * np.int32((hi[n, h0 + (j >> 2)] >> (2 * (j & 3))) & 3)
        hh += 16 * np.int32((hi[n, h0 + ((j + 1) >> 2)] >> (2 * ((j + 1) & 3))) & 3)
    return lo, hh


@njit(**JIT)
def _dequantize_row(w, hi, scales, biases, table, g, bits, n, out):
    """Row ``n`` of W as float32 into ``out[:]`` (``q * scale + bias``, in the reference's
    order of operations)."""
    k = out.shape[0]
    for gi in range(k // g):
        s = _to_f32(scales[n, gi], table)
        b = _to_f32(biases[n, gi], table)
        k0 = gi * g
        if bits == 8:
            wr = w[n, k0:k0 + g]
            o = out[k0:k0 + g]
            for i in range(g):
                o[i] = F32(wr[i]) * s + b
            continue
        for i in range(g // 2):
            lo, hh = _code_pair(w, hi, n, k0, i, bits)
            out[k0 + 2 * i] = F32(lo) * s + b
            out[k0 + 2 * i + 1] = F32(hh) * s + b


DENSE_NARROW_ROWS = 8  # rows up to which dense_gemm streams one weight row at a time
ROW_BLOCK = 16  # weight rows a prefill product dequantizes at a time (per thread)


@njit(**JIT)
def _dequantize_row_split(w, hi, scales, biases, table, g, bits, n, out):
    """Row ``n`` of W as float32 into ``out[:]`` in ``_prepare_x``'s order (each group's
    even elements, then its odd ones), so every store is contiguous and the loop vectorizes
    (in natural order the interleaved stores made dequantizing cost 2.5x more than the
    products it feeds). 8-bit rows keep their natural order."""
    if bits == 8:
        _dequantize_row(w, hi, scales, biases, table, g, bits, n, out)
        return
    k = out.shape[0]
    half = g // 2
    for gi in range(k // g):
        s = _to_f32(scales[n, gi], table)
        b = _to_f32(biases[n, gi], table)
        k0 = gi * g
        wr = w[n, k0 // 2:k0 // 2 + half]
        oe = out[k0:k0 + half]
        oo = out[k0 + half:k0 + g]
        if bits == 4:  # the common case, kept free of the high-bit branches
            for i in range(half):
                byte = np.int32(wr[i])
                oe[i] = F32(np.int32(byte & 15)) * s + b
                oo[i] = F32(np.int32(byte >> 4)) * s + b
            continue
        for i in range(half):
            lo, hh = _code_pair(w, hi, n, k0, i, bits)
            oe[i] = F32(lo) * s + b
            oo[i] = F32(hh) * s + b


@njit(**INLINE)
def _tile4x4(buf, r, x, t):
    """Dot products of weight rows ``r .. r+3`` of ``buf`` with activation rows ``t .. t+3``:
    sixteen accumulators, eight loads per sixteen multiply-adds (one weight row against four
    activation rows needed five loads per four)."""
    w0 = buf[r]
    w1 = buf[r + 1]
    w2 = buf[r + 2]
    w3 = buf[r + 3]
    x0 = x[t]
    x1 = x[t + 1]
    x2 = x[t + 2]
    x3 = x[t + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = F32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = F32(0)
    for i in range(w0.shape[0]):
        p0 = w0[i]
        p1 = w1[i]
        p2 = w2[i]
        p3 = w3[i]
        q0 = x0[i]
        q1 = x1[i]
        q2 = x2[i]
        q3 = x3[i]
        a00 += p0 * q0
        a01 += p1 * q0
        a02 += p2 * q0
        a03 += p3 * q0
        a10 += p0 * q1
        a11 += p1 * q1
        a12 += p2 * q1
        a13 += p3 * q1
        a20 += p0 * q2
        a21 += p1 * q2
        a22 += p2 * q2
        a23 += p3 * q2
        a30 += p0 * q3
        a31 += p1 * q3
        a32 += p2 * q3
        a33 += p3 * q3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(**PAR)
def qgemm(x, w, hi, scales, biases, table, g, bits, y):
    """``y = x @ W.T`` for several rows of ``x`` (prefill chunks, many decode rows), W
    packed: each thread dequantizes ``ROW_BLOCK`` weight rows into its own small buffer
    (L1/L2-resident, in ``_prepare_x``'s order) and multiplies them with every activation
    row, four weight rows by four activation rows at a time."""
    t_rows, k = x.shape
    n_rows = w.shape[0]
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    t4 = t_rows - t_rows % 4
    xd = x
    if bits != 8:
        xd, _ = _prepare_x(x, g)
    for blk in prange(n_blocks):
        r0 = blk * ROW_BLOCK
        nr = min(n_rows, r0 + ROW_BLOCK) - r0
        buf = np.zeros((ROW_BLOCK, k), F32)  # rows past the matrix stay zero
        for r in range(nr):
            _dequantize_row_split(w, hi, scales, biases, table, g, bits, r0 + r, buf[r])
        for t in range(0, t4, 4):
            for r in range(0, nr, 4):
                a = _tile4x4(buf, r, xd, t)
                for u in range(4):
                    for v in range(min(4, nr - r)):
                        y[t + u, r0 + r + v] = a[4 * u + v]
        for t in range(t4, t_rows):
            for r in range(nr):
                y[t, r0 + r] = _dot(buf[r], xd[t])


@njit(**INLINE)
def _dot1x4(wr, x, t):
    """Dot products of one weight row with activation rows ``t .. t+3``."""
    x0 = x[t]
    x1 = x[t + 1]
    x2 = x[t + 2]
    x3 = x[t + 3]
    a0 = a1 = a2 = a3 = F32(0)
    for i in range(wr.shape[0]):
        p = wr[i]
        a0 += p * x0[i]
        a1 += p * x1[i]
        a2 += p * x2[i]
        a3 += p * x3[i]
    return a0, a1, a2, a3


@njit(**PAR)
def dense_gemm(x, w, y):
    """``y = x @ W.T`` for a few rows of ``x`` (speculative verification, small batches), W
    float32 ``[out, in]``: W is streamed from memory once and each of its rows is used for
    every activation row while it sits in L1. BLAS packs W for a small-M product and took
    3x a one-row product at two rows (a 49,152 x 576 head: 12.3 against 3.9 ms).

    Up to ``DENSE_NARROW_ROWS`` rows, one weight row meets four activation rows at a time
    (the product stays bound by W's bytes); beyond, four weight rows meet four activation
    rows (`_tile4x4`, fewer loads per multiply-add once arithmetic dominates)."""
    t_rows = x.shape[0]
    n_rows = w.shape[0]
    t4 = t_rows - t_rows % 4
    wide = t_rows > DENSE_NARROW_ROWS
    for blk in prange((n_rows + 15) // 16):
        r0 = blk * 16
        r1 = min(n_rows, r0 + 16)
        r4 = r0 + (r1 - r0) // 4 * 4 if wide else r0
        for r in range(r0, r4, 4):
            for t in range(0, t4, 4):
                a = _tile4x4(w, r, x, t)
                for u in range(4):
                    for v in range(4):
                        y[t + u, r + v] = a[4 * u + v]
            for t in range(t4, t_rows):
                for v in range(4):
                    y[t, r + v] = _dot(w[r + v], x[t])
        for r in range(r4, r1):
            wr = w[r]
            for t in range(0, t4, 4):
                a = _dot1x4(wr, x, t)
                for u in range(4):
                    y[t + u, r] = a[u]
            for t in range(t4, t_rows):
                y[t, r] = _dot(wr, x[t])


@njit(**PAR)
def dequantize_rows(w, hi, scales, biases, table, g, bits, r0, out):
    """Rows ``r0 .. r0 + len(out)`` of W as float32 into ``out``."""
    for r in prange(out.shape[0]):
        _dequantize_row(w, hi, scales, biases, table, g, bits, r0 + r, out[r])


@njit(**JIT)
def gather_rows(w, hi, scales, biases, table, g, bits, ids, out):
    """Embedding lookup in a packed table: row ``ids[t]`` of W into ``out[t]``."""
    for t in range(ids.shape[0]):
        _dequantize_row(w, hi, scales, biases, table, g, bits, ids[t], out[t])


# -- small row-wise ops -------------------------------------------------------------------
@njit(**JIT)
def rms_norm(x, weight, eps):
    t_rows, d = x.shape
    out = np.empty((t_rows, d), F32)
    for t in range(t_rows):
        ss = np.float64(0)
        for i in range(d):
            ss += np.float64(x[t, i]) * x[t, i]
        r = F32(1.0 / np.sqrt(ss / d + eps))
        for i in range(d):
            out[t, i] = x[t, i] * r * weight[i]
    return out


@njit(**JIT)
def rope(x, cos, sin, heads, head_dim):
    """Rotate-half RoPE on ``x[T, heads * head_dim]`` with per-row cos/sin ``[T, hd / 2]``."""
    t_rows = x.shape[0]
    half = head_dim // 2
    out = np.empty((t_rows, heads * head_dim), F32)
    for t in range(t_rows):
        for h in range(heads):
            b = h * head_dim
            for i in range(half):
                x1 = x[t, b + i]
                x2 = x[t, b + half + i]
                c = cos[t, i]
                s = sin[t, i]
                out[t, b + i] = x1 * c - x2 * s
                out[t, b + half + i] = x2 * c + x1 * s
    return out


@njit(**INLINE)
def _silu_mul_row(gate, up, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        out[t, i] = g / (F32(1) + fast_exp(-g)) * up[t, i]


@njit(**INLINE)
def _gelu_tanh_mul_row(gate, up, out, t):
    """0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * up, constants in float32, with
    tanh(z) = 1 - 2 / (exp(2z) + 1) on the vectorizable exp."""
    c = F32(0.7978845608028654)
    for i in range(gate.shape[1]):
        g = gate[t, i]
        inner = c * (g + F32(0.044715) * g * g * g)
        th = F32(1) - F32(2) / (fast_exp(F32(2) * inner) + F32(1))
        out[t, i] = F32(0.5) * g * (F32(1) + th) * up[t, i]


@njit(**INLINE)
def _gated_row(gate, up, out, t, gelu):
    if gelu:
        _gelu_tanh_mul_row(gate, up, out, t)
    else:
        _silu_mul_row(gate, up, out, t)


# Gated activations (SiLU or GELU-tanh gate times up): one thread for a few rows (a parallel
# region costs more than the work), every thread for prefill chunks.
@njit(**JIT)
def gated_mul(gate, up, gelu):
    out = np.empty(gate.shape, F32)
    for t in range(gate.shape[0]):
        _gated_row(gate, up, out, t, gelu)
    return out


@njit(**PAR)
def gated_mul_rows(gate, up, gelu):
    out = np.empty(gate.shape, F32)
    for t in prange(gate.shape[0]):
        _gated_row(gate, up, out, t, gelu)
    return out


@njit(**JIT)
def write_kv(kv, layer, k, v, slots):
    """K/V rows into the pool ``[layers, 2, blocks, block_size, kv_heads, head_dim]``."""
    bs, kvh, hd = kv.shape[3], kv.shape[4], kv.shape[5]
    for t in range(slots.shape[0]):
        blk = slots[t] // bs
        off = slots[t] % bs
        for h in range(kvh):
            for i in range(hd):
                kv[layer, 0, blk, off, h, i] = k[t, h * hd + i]
                kv[layer, 1, blk, off, h, i] = v[t, h * hd + i]


# -- paged attention -----------------------------------------------------------------------
@njit(**PAR)
def paged_attention(kv, layer, q, row_seq, positions, seq_lens, block_tables, heads, scale,
                    window):
    """Causal attention of every query row over its sequence's paged K/V (with ``window``
    > 0, the query at position p sees only keys p - window + 1 .. p).

    One work item per (row, KV head): the query heads that share the KV head are processed
    together, so each key and value is loaded once per group. Keys are taken a block at a
    time, with an online softmax (running max and sum, rescaled once per block).
    """
    t_rows = q.shape[0]
    bs, kvh, hd = kv.shape[3], kv.shape[4], kv.shape[5]
    grp = heads // kvh
    out = np.empty((t_rows, heads * hd), F32)
    for item in prange(t_rows * kvh):
        t = item // kvh
        g = item % kvh
        s = row_seq[t]
        length = min(positions[t] + 1, seq_lens[s])
        first = max(0, positions[t] - window + 1) if window > 0 else 0
        m = np.full(grp, -np.inf, dtype=F32)
        den = np.zeros(grp, F32)
        acc = np.zeros((grp, hd), F32)
        qq = np.empty((grp, hd), F32)
        for h in range(grp):
            for i in range(hd):
                qq[h, i] = q[t, (g * grp + h) * hd + i] * scale
        sc = np.empty((grp, bs), F32)
        n_blocks = (length + bs - 1) // bs
        for b in range(first // bs, n_blocks):
            blk = block_tables[s, b]
            j0 = max(0, first - b * bs)
            n = min(bs, length - b * bs)
            for h in range(grp):
                mb = m[h]
                for j in range(j0, n):
                    d = F32(0)
                    for i in range(hd):
                        d += qq[h, i] * kv[layer, 0, blk, j, g, i]
                    sc[h, j] = d
                    if d > mb:
                        mb = d
                corr = np.exp(m[h] - mb)
                den[h] *= corr
                for i in range(hd):
                    acc[h, i] *= corr
                m[h] = mb
                for j in range(j0, n):
                    p = np.exp(sc[h, j] - mb)
                    den[h] += p
                    for i in range(hd):
                        acc[h, i] += p * kv[layer, 1, blk, j, g, i]
        for h in range(grp):
            inv = F32(1) / den[h]
            for i in range(hd):
                out[t, (g * grp + h) * hd + i] = acc[h, i] * inv
    return out


@njit(**PAR)
def touch(a):
    """Write zeros over a flat array with every thread, faulting its pages in now."""
    for i in prange(a.shape[0]):
        a[i] = 0
