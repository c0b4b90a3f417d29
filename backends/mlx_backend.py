"""The MLX backend: the one model definition run lazily on MLX, over the same paged KV pool.

Every op builds graph nodes; nothing runs until :meth:`MlxOps.logits` evaluates the step's
logits together with the KV pools the step wrote, so one engine step is one ``mx.eval``.

Weights stay in the checkpoint's form: MLX-quantized matrices are used as they are stored
(uint32 ``weight`` + ``scales`` + ``biases``, the mlx-lm layout) through
``mx.quantized_matmul``; dense ones are held in the compute dtype.

The KV pool is one pair of arrays per layer, ``[num_blocks * block_size, kv_heads, head_dim]``
(``num_blocks`` of the layer's KV group, see ``ondevice.kv.layout``), indexed by slot
(``block * block_size + offset``). Writes scatter by the batch's slot mapping
(in place: the pool's buffer is donated to the update, never copied); attention gathers each
sequence's keys and values through its block table and runs
``mx.fast.scaled_dot_product_attention``: decode rows of all sequences as one padded batch,
each prefill chunk on its own with a causal mask.

On the CPU device (Linux ``mlx[cpu]``, or ``device="cpu"`` on a Mac) every MLX op
runs on one thread per stream, and Linux builds do their matrix products with the reference
BLAS they ship (measured on the 2-core test machine against NumPy's OpenBLAS: 7-15x slower
for a matrix-vector product, 30-60x for 512 rows). So the CPU path spreads
each matrix product, and each long prefill chunk's attention, over one MLX stream per core;
stores dense matrices transposed (``[in, out]`` is that BLAS's fast operand order, 2x);
multiplies 8 or more rows by a per-step dequantized copy of a quantized matrix (MLX's CPU
quantized kernel costs the same per row at any batch size, twice the dense product's); and
applies RoPE from cos/sin tables. That kernel is scalar code (about 0.3 G weights/s per core
here, against 3 G/s for the dense product), so on the CPU a quantized checkpoint is expanded
once at load into dense matrices in the compute dtype when the expanded model fits in a
quarter of the memory available (option ``quantized``: ``auto`` as described, ``expand``
always, ``keep`` never): decode then runs at the dense model's speed, at the dense model's
memory. On the GPU the quantized matrices are always kept and ``mx.quantized_matmul`` used. The GPU path is plain MLX: whole matrices,
``mx.fast.rope``, and elementwise kernels fused with ``mx.compile``.

Device and dtype: Metal when present, else the CPU; float32 on the CPU, float16 on the GPU.
:class:`ondevice.settings.MlxOptions` (``device``, ``dtype``, ``threads``, ``quantized``;
defaults from the environment) overrides them.

Like the NumPy backend it exposes ``ops`` and ``params`` (tests/test_conformance.py runs each
op on them), plus ``ops.from_host`` / ``ops.to_host`` to move NumPy arrays in and out.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..batch import BatchInput
from ..config import ModelConfig
from ..errors import BackendUnavailableError, RequestError
from ..memory import available_memory_bytes
from ..modeldir import ModelDir, QuantizedTensor
from ..models import weight_specs
from ..quant import dequantize
from ..settings import MlxOptions
from .base import Backend, Capabilities, PageRelease, RopeTables

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Rows from which the CPU path dequantizes a quantized matrix per step and uses the dense
# product: per row, MLX's CPU quantized kernel costs about twice the dense product, and the
# dequantization (once per matrix and step) costs about as much as 4-8 rows (measured).
DEQUANT_MIN_ROWS = 8
# Output features below which a CPU matrix product is not split over streams: the split's
# concatenation and cross-stream synchronisation cost more than the product.
SPLIT_MIN_OUT = 256
MAX_THREADS = 8  # streams on the CPU at most (one per core below that)
# Fewest query rows of a prefill chunk worth a piece of its own on another stream.
MIN_PIECE_ROWS = 64
QUANTIZED_MODES = ("auto", "keep", "expand")
# Share of the available memory a CPU load may fill with expanded quantized matrices (auto).
EXPAND_MEMORY_SHARE = 0.25


# -- device, dtype, streams --------------------------------------------------------------------
def _metal() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:  # a build without the Metal module
        return False


def _cpu_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


def default_device(forced: str | None = None) -> str:
    """``"gpu"`` when MLX has Metal, else ``"cpu"``; ``forced`` (the ``device`` option)
    overrides it."""
    if forced:
        forced = forced.strip().lower()
        if forced not in ("cpu", "gpu"):
            raise BackendUnavailableError(f"MLX device {forced!r}: choose 'cpu' or 'gpu'")
        return forced
    return "gpu" if _metal() else "cpu"


def default_dtype(device: str, forced: str | None = None) -> str:
    """float32 on the CPU, float16 on the GPU; ``forced`` (the ``dtype`` option) overrides it."""
    if forced:
        forced = forced.strip().lower()
        if forced not in DTYPES:
            raise BackendUnavailableError(f"MLX dtype {forced!r}: choose {', '.join(DTYPES)}")
        return forced
    return "float16" if device == "gpu" else "float32"


_local = threading.local()


def _streams(device: mx.Device, count: int) -> list[mx.Stream]:
    """``count`` streams on ``device`` for the calling thread (MLX streams are per thread):
    the thread's default stream first, then streams made once and kept for the thread."""
    cache = getattr(_local, "streams", None)
    if cache is None:
        cache = _local.streams = {}
    key = (str(device), count)
    if key not in cache:
        cache[key] = [mx.default_stream(device)] + [mx.new_stream(device) for _ in range(count - 1)]
    return cache[key]


# -- weights ------------------------------------------------------------------------------------
def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


@dataclass
class _Linear:
    """A matrix in the form the device multiplies fastest, split by output features.

    ``parts[i]`` computes output features ``spans[i]`` on stream ``streams[i]``: a dense
    ``[in, out_i]`` block (CPU), the whole ``[out, in]`` matrix (GPU), or a slice of rows
    ``(weight, scales, biases)`` of a quantized matrix (a view: nothing is repacked).
    """

    parts: list[Any]
    spans: list[tuple[int, int]]
    streams: list[int]
    transposed: bool  # dense parts stored [in, out_i]
    quant: tuple[int, int] | None = None  # (group_size, bits) of a quantized matrix
    q_full: tuple[mx.array, mx.array, mx.array] | None = None  # for embedding row lookups
    bias: mx.array | None = None

    @property
    def out_features(self) -> int:
        return self.spans[-1][1]


@dataclass
class _Embedding:
    """An embedding table: dense ``[vocab, hidden]``, quantized rows, or (tied, CPU) the
    transposed column blocks of the LM head, which then is the only copy in memory."""

    table: mx.array | None = None
    quantized: _Linear | None = None
    via_head: _Linear | None = None


class MlxLoader:
    """Turns checkpoint tensors into MLX arrays on the chosen device and dtype."""

    def __init__(self, model: ModelDir, dtype: mx.Dtype, cpu: bool, threads: int,
                 expand: bool = False):
        self.model = model
        self.release = PageRelease(model)
        self.expand = expand  # quantized matrices become dense ones (CPU only)
        self.dtype = dtype
        self.np_dtype = {mx.float32: np.float32, mx.float16: np.float16}.get(dtype)
        self.cpu = cpu
        self.threads = threads
        self._turn = 0  # alternates unsplit matrices between streams

    def _array(self, a: np.ndarray) -> mx.array:
        """A copy in MLX memory (the checkpoint's mapped pages are dropped as we go)."""
        a, dtype = np.asarray(a), self.dtype
        if a.dtype == np.uint32:  # packed quantized codes, kept exactly as stored
            out = mx.array(np.ascontiguousarray(a))
        elif self.np_dtype is None:  # bfloat16: NumPy has no such dtype
            out = mx.array(np.asarray(a, dtype=np.float32)).astype(dtype)
        else:
            out = mx.array(np.asarray(a, dtype=self.np_dtype))
        mx.eval(out)
        self.release.copied(out.nbytes)
        return out

    def _layout(self, out_features: int) -> tuple[list[tuple[int, int]], list[int]]:
        if not self.cpu or self.threads == 1:
            return [(0, out_features)], [0]
        if out_features < SPLIT_MIN_OUT:
            self._turn = (self._turn + 1) % self.threads
            return [(0, out_features)], [self._turn]
        spans = _spans(out_features, self.threads)
        return spans, list(range(len(spans)))

    def _quantized(self, w: QuantizedTensor) -> tuple[mx.array, mx.array, mx.array]:
        # The packed codes as stored; scales and biases in the compute dtype (float16 and
        # bfloat16 values are exact in float32, the CPU's).
        return self._array(w.weight), self._array(w.scales), self._array(w.biases)

    def _linear(self, w, bias: np.ndarray | None) -> _Linear:
        b = None if bias is None else self._array(bias)
        if isinstance(w, QuantizedTensor) and self.expand:
            w = dequantize(w.weight, w.scales, w.biases, w.group_size, w.bits)
        if isinstance(w, QuantizedTensor):
            full = self._quantized(w)
            spans, streams = self._layout(w.shape[0])
            parts = [tuple(t[lo:hi] for t in full) for lo, hi in spans]
            mx.eval(parts)
            return _Linear(parts, spans, streams, False, (w.group_size, w.bits), full, b)
        spans, streams = self._layout(w.shape[0])
        if self.cpu:
            parts = [self._array(np.ascontiguousarray(np.asarray(w[lo:hi]).T)) for lo, hi in spans]
            return _Linear(parts, spans, streams, True, None, None, b)
        return _Linear([self._array(w)], spans, streams, False, None, None, b)

    def embedding(self, w) -> _Embedding:
        if isinstance(w, QuantizedTensor) and self.expand:
            w = dequantize(w.weight, w.scales, w.biases, w.group_size, w.bits)
        if isinstance(w, QuantizedTensor):
            lin = self._linear(w, None)
            return _Embedding(quantized=lin)
        return _Embedding(table=self._array(w))

    def linear(self, w, bias) -> _Linear:
        return self._linear(w, bias)

    def norm(self, w) -> mx.array:
        return self._array(w)

    def tied_lm_head(self, embed: _Embedding, w) -> _Linear:
        if embed.quantized is not None:
            return embed.quantized  # the same row slices serve lookups and the head
        if not self.cpu:
            return _Linear([embed.table], [(0, embed.table.shape[0])], [0], False)
        # CPU: the head wants [hidden, vocab] blocks; lookups read columns of those blocks, so
        # the [vocab, hidden] table can go and the largest matrix is held once.
        spans, streams = self._layout(embed.table.shape[0])
        table = np.asarray(embed.table) if self.np_dtype else np.asarray(w, np.float32)
        parts = [self._array(np.ascontiguousarray(table[lo:hi].T)) for lo, hi in spans]
        head = _Linear(parts, spans, streams, True)
        embed.table, embed.via_head = None, head
        return head


# -- ops ----------------------------------------------------------------------------------------
@dataclass
class _Attention:
    """How one batch's queries are grouped for attention (built once per step)."""

    decode_rows: mx.array | None  # [D] rows of the single-token sequences
    decode_slots: mx.array | None  # [D, Lmax] slot of each key, padded with slot 0
    decode_mask: mx.array | None  # [D, 1, 1, Lmax] key visible to the row's query, or None
    contiguous_decode: tuple[int, int] | None  # decode rows as one slice, when they are
    # (start, end, slots [L], mask, stream index) per prefill chunk or piece of one
    chunks: list[tuple[int, int, mx.array, Any, int]]
    restore: mx.array | None  # gathers grouped outputs back into row order (None: in order)


class MlxOps:
    """Every op of the ``Ops`` protocol, building an MLX graph; ``logits`` evaluates it."""

    def __init__(self, k_pools: list[mx.array], v_pools: list[mx.array], block_size: int,
                 device: mx.Device, dtype: mx.Dtype, threads: int):
        self.k = k_pools
        self.v = v_pools
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.cpu = device.type == mx.cpu
        # The GPU's choices (the CPU's reasons are at their use): mx.fast.rope, and
        # mx.compile'd elementwise kernels (see _silu_mul_fused).
        self.fast_rope = not self.cpu
        self.fuse = not self.cpu
        self.rope_tables = RopeTables()
        self._dirty: set[int] = set()
        self._step: dict[int, tuple[Any, Any]] | None = None  # per-forward conversions
        self._window_plans: dict[tuple[int, int, int],
                                 tuple[BatchInput, np.ndarray, _Attention]] = {}

    # Host <-> device, for the conformance harness and the backend's own bookkeeping.
    def from_host(self, a: np.ndarray) -> mx.array:
        a = np.asarray(a)
        return mx.array(a).astype(self.dtype) if a.dtype.kind == "f" else mx.array(a)

    def to_host(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32) if x.dtype != mx.float32 else x, copy=True)

    def streams(self) -> list[mx.Stream]:
        return _streams(self.device, self.threads)

    def _cached(self, key: Any, build):
        """Per-step memo: the model passes the same index arrays to every layer."""
        if self._step is None:
            return build()
        hit = self._step.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        value = build()
        self._step[id(key)] = (key, value)
        return value

    def _ints(self, a: np.ndarray) -> mx.array:
        return self._cached(a, lambda: mx.array(np.asarray(a, dtype=np.int32)))

    def begin_step(self) -> None:
        """Start memoizing per-step conversions (``forward`` brackets the model with these)."""
        self._step = {}

    def end_step(self) -> None:
        self._step = None

    # -- the protocol --------------------------------------------------------------------
    def embedding(self, table: _Embedding, ids: np.ndarray) -> mx.array:
        idx = self._ints(ids)
        if table.table is not None:
            return mx.take(table.table, idx, axis=0)
        if table.quantized is not None:
            lin = table.quantized
            w, s, b = (mx.take(t, idx, axis=0) for t in lin.q_full)
            gs, bits = lin.quant
            return mx.dequantize(w, s, b, group_size=gs, bits=bits)
        # Tied head on the CPU: each id's row is a column of one of the head's blocks.
        out = None
        for part, (lo, hi) in zip(table.via_head.parts, table.via_head.spans, strict=True):
            rows = mx.take(part, mx.clip(idx - lo, 0, hi - lo - 1), axis=1).T
            if out is None:
                out = rows
            else:
                inside = ((idx >= lo) & (idx < hi))[:, None]
                out = mx.where(inside, rows, out)
        return out

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    def _part(self, x: mx.array, w: _Linear, i: int, stream: mx.Stream) -> mx.array:
        # Every op of the part (views too) on its stream, so that streams wait only for x.
        with mx.stream(stream):
            part = w.parts[i]
            if w.quant is None:
                return mx.matmul(x, part if w.transposed else part.T)
            q, s, b = part
            gs, bits = w.quant
            if self.cpu and x.shape[0] >= DEQUANT_MIN_ROWS:
                dense = mx.dequantize(q, s, b, group_size=gs, bits=bits)
                return mx.matmul(x, mx.contiguous(dense.T))
            return mx.quantized_matmul(x, q, s, b, transpose=True, group_size=gs, bits=bits)

    def linear(self, x: mx.array, w: _Linear) -> mx.array:
        streams = self.streams()
        outs = [self._part(x, w, i, streams[si % len(streams)]) for i, si in enumerate(w.streams)]
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1, stream=streams[0])
        return y if w.bias is None else y + w.bias

    def rope(self, x, positions, inv_freq, heads, head_dim) -> mx.array:
        t = x.shape[0]
        if self.fast_rope:
            # [T, heads, 1, head_dim]: each token its own batch entry, offset by its position.
            y = mx.fast.rope(x.reshape(t, heads, 1, head_dim), head_dim, traditional=False,
                             base=None, scale=1.0, offset=self._ints(positions),
                             freqs=self._freqs(inv_freq))
            return y.reshape(t, heads * head_dim)
        # CPU: mx.fast.rope runs there as a dozen small ops (about 3x the time of these four,
        # measured); cos and sin are looked up once per step for every layer, and the result
        # rounds exactly like the NumPy reference's.
        # Per step and positions, one entry per RoPE base (Gemma 3's local and global layers
        # use different bases).
        tables = self._cached(positions, dict)
        hit = tables.get(id(inv_freq))
        if hit is None or hit[0] is not inv_freq:
            hit = tables[id(inv_freq)] = (inv_freq, self._cos_sin(positions, inv_freq))
        cos, sin = hit[1]
        half = head_dim // 2
        x = x.reshape(t, heads, head_dim)
        rotated = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
        return (x * cos + rotated * sin).reshape(t, heads * head_dim)

    def _cos_sin(self, positions: np.ndarray, inv_freq: np.ndarray) -> tuple[mx.array, mx.array]:
        """``[T, 1, head_dim]`` cos and sign-folded sin (``-sin`` on the first half), from the
        shared per-step tables (the same float32 numbers as the NumPy reference's)."""
        cos, sin = self.rope_tables(positions, inv_freq)
        return (mx.array(np.concatenate([cos, cos], axis=1)).astype(self.dtype)[:, None, :],
                mx.array(np.concatenate([-sin, sin], axis=1)).astype(self.dtype)[:, None, :])

    def _freqs(self, inv_freq: np.ndarray) -> mx.array:
        return self._cached(inv_freq, lambda: mx.array(
            (1.0 / np.asarray(inv_freq, dtype=np.float64)).astype(np.float32)))

    def write_kv(self, layer, k, v, slot_mapping) -> None:
        slots = self._ints(slot_mapping)
        kp, vp = self.k[layer], self.v[layer]
        shape = (k.shape[0], *kp.shape[1:])
        # Item assignment rebinds the pool to the scatter's result; the old buffer has no
        # other reader, so MLX updates it in place.
        kp[slots] = k.reshape(shape).astype(kp.dtype)
        vp[slots] = v.reshape(shape).astype(vp.dtype)
        self._dirty.add(layer)

    def _plan(self, batch: BatchInput, tables: np.ndarray, window: int = 0) -> _Attention:
        """The step's plan for the layers that read ``tables`` (their KV group's) with
        ``window``."""
        if not window:
            return self._cached(tables, lambda: self._build_plan(batch, tables))
        # Windowed layers (Gemma 3's local ones) share one plan per step and window.
        key = (id(batch), id(tables), window)
        hit = self._window_plans.get(key)
        if hit is None or hit[0] is not batch or hit[1] is not tables:
            if self._window_plans and next(iter(self._window_plans.values()))[0] is not batch:
                self._window_plans.clear()
            hit = self._window_plans[key] = (batch, tables,
                                             self._build_plan(batch, tables, window))
        return hit[2]

    def _build_plan(self, batch: BatchInput, tables: np.ndarray, window: int = 0) -> _Attention:
        """``window`` > 0: each query at position p sees only keys p-window+1 .. p, and only
        those keys are gathered (the blocks before them may already be back in the pool)."""
        bs = self.block_size
        qsl = batch.query_start_loc.astype(np.int64)
        lens = batch.seq_lens.astype(np.int64)
        pos = batch.positions.astype(np.int64)
        tables = tables.astype(np.int64)
        n = qsl[1:] - qsl[:-1]
        order: list[np.ndarray] = []
        dec = np.flatnonzero(n == 1)
        d_rows = d_slots = d_mask = None
        contiguous = None
        if dec.size:
            rows = qsl[dec]
            # Keys of row r are positions first[r] + j; without a window first is 0.
            first = np.maximum(pos[rows] - window + 1, 0) if window else np.zeros_like(rows)
            lmax = int((lens[dec] - first).max())
            kpos = first[:, None] + np.arange(lmax)[None]  # [D, Lmax]
            cols = np.minimum(kpos // bs, tables.shape[1] - 1)
            blocks = np.take_along_axis(tables[dec], cols, axis=1)
            slots = blocks * bs + kpos % bs
            visible = (kpos < lens[dec, None]) & (kpos <= pos[rows, None])
            slots = np.where(visible, slots, 0)
            d_slots = mx.array(slots.astype(np.int32))
            # Without padding or hidden keys (one sequence, or equal lengths) no mask at all.
            d_mask = None if visible.all() else mx.array(visible[:, None, None, :])
            if np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
                contiguous = (int(rows[0]), int(rows[0] + rows.size))
            else:
                d_rows = mx.array(rows.astype(np.int32))
            order.append(rows)
        chunks = []
        for s in np.flatnonzero(n > 1):
            start, end, length = int(qsl[s]), int(qsl[s + 1]), int(lens[s])
            p = pos[start:end]
            if window:
                j = np.arange(max(int(p.min()) - window + 1, 0), length)
                slots = (tables[s, j // bs] * bs + j % bs).astype(np.int32)
                mask = mx.array((j[None, :] <= p[:, None]) & (j[None, :] > p[:, None] - window))
                chunks.append((start, end, mx.array(slots), mask, 0))
                order.append(np.arange(start, end))
                continue
            j = np.arange(length)
            slots = (tables[s, j // bs] * bs + j % bs).astype(np.int32)
            if np.array_equal(p, np.arange(length - (end - start), length)):
                # Causal (lower-right aligned: the last query sees every key). On the CPU the
                # chunk is cut into pieces of equal work, one per stream; each piece is again
                # a causal chunk over the keys up to its last query.
                for i, (a, b) in enumerate(self._pieces(length - (end - start), end - start)):
                    keys = length - (end - start) + b
                    chunks.append((start + a, start + b, mx.array(slots[:keys]), "causal", i))
            else:
                mask = mx.array(j[None, :] <= p[:, None])
                chunks.append((start, end, mx.array(slots), mask, 0))
            order.append(np.arange(start, end))
        restore = None
        if order:
            flat = np.concatenate(order)
            if not np.array_equal(flat, np.arange(flat.size)):
                inverse = np.empty(batch.num_tokens, dtype=np.int64)
                inverse[flat] = np.arange(flat.size)
                restore = mx.array(inverse.astype(np.int32))
        return _Attention(d_rows, d_slots, d_mask, contiguous, chunks, restore)

    def _pieces(self, context: int, rows: int) -> list[tuple[int, int]]:
        """Split ``rows`` causal queries after ``context`` keys into per-stream pieces of
        about equal work (query ``i`` attends to ``context + i + 1`` keys)."""
        parts = min(self.threads if self.cpu else 1, rows // MIN_PIECE_ROWS) or 1
        if parts == 1:
            return [(0, rows)]
        work = np.cumsum(context + np.arange(1, rows + 1, dtype=np.float64))
        cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts)
        edges = [0, *sorted({int(c) for c in cuts if 0 < c < rows}), rows]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def paged_attention(self, layer, q, batch: BatchInput, heads, kv_heads, head_dim, scale,
                        window: int = 0):
        plan = self._plan(batch, batch.tables_for(layer), window)
        kp, vp = self.k[layer], self.v[layer]
        streams = self.streams()
        outs = []
        if plan.decode_slots is not None:
            if plan.contiguous_decode is not None:
                a, b = plan.contiguous_decode
                qd = q[a:b]
            else:
                qd = mx.take(q, plan.decode_rows, axis=0)
            k = mx.take(kp, plan.decode_slots, axis=0)  # [D, Lmax, kv_heads, head_dim]
            v = mx.take(vp, plan.decode_slots, axis=0)
            decode = self._decode_cpu if self.cpu else self._decode_sdpa
            outs.append(decode(qd, k, v, plan.decode_mask, heads, kv_heads, head_dim, scale))
        for start, end, slots, mask, si in plan.chunks:
            with mx.stream(streams[si % len(streams)]):
                m = end - start
                qc = q[start:end].reshape(m, heads, head_dim).transpose(1, 0, 2)[None]
                k = mx.take(kp, slots, axis=0).transpose(1, 0, 2)[None]  # [1, kvh, L, hd]
                v = mx.take(vp, slots, axis=0).transpose(1, 0, 2)[None]
                o = mx.fast.scaled_dot_product_attention(qc, k, v, scale=scale, mask=mask)
                outs.append(o[0].transpose(1, 0, 2).reshape(m, heads * head_dim))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return out if plan.restore is None else mx.take(out, plan.restore, axis=0)

    @staticmethod
    def _decode_sdpa(q, k, v, mask, heads, kv_heads, head_dim, scale) -> mx.array:
        d = q.shape[0]
        o = mx.fast.scaled_dot_product_attention(
            q.reshape(d, heads, 1, head_dim), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            scale=scale, mask=mask)
        return o.reshape(d, heads * head_dim)

    def _decode_cpu(self, q, k, v, mask, heads, kv_heads, head_dim, scale) -> mx.array:
        """Decode rows on the CPU: the query heads of each KV head as one small matrix
        product (mx.fast's attention runs there as generic ops that cost 1.4x this), the KV
        heads spread over the streams. Scaled after the product, as the reference does."""
        d, g = q.shape[0], heads // kv_heads
        streams = self.streams()
        q = q.reshape(d, kv_heads, g, head_dim)
        parts = []
        for i, (a, b) in enumerate(_spans(kv_heads, min(len(streams), kv_heads))):
            with mx.stream(streams[i]):
                s = (q[:, a:b] @ k[:, :, a:b].transpose(0, 2, 3, 1)) * scale  # [D, n, g, L]
                if mask is not None:
                    s = mx.where(mask, s, -mx.inf)
                p = mx.softmax(s, axis=-1, precise=True)
                parts.append(p @ v[:, :, a:b].transpose(0, 2, 1, 3))  # [D, n, g, head_dim]
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        return out.reshape(d, heads * head_dim)

    def silu_mul(self, gate, up) -> mx.array:
        return _silu_mul_fused(gate, up) if self.fuse else _silu_mul(gate, up)

    def gelu_tanh_mul(self, gate, up) -> mx.array:
        return _gelu_tanh_mul_fused(gate, up) if self.fuse else _gelu_tanh_mul(gate, up)

    def head_rms_norm(self, x, weight, eps, heads, head_dim) -> mx.array:
        t = x.shape[0]
        return mx.fast.rms_norm(x.reshape(t, heads, head_dim), weight, eps).reshape(
            t, heads * head_dim)

    def scale(self, x, factor) -> mx.array:
        return x * factor  # a Python scalar keeps x's dtype

    def add(self, a, b) -> mx.array:
        return a + b

    def take_rows(self, x, rows) -> mx.array:
        rows = np.asarray(rows)
        if rows.size == x.shape[0] and np.array_equal(rows, np.arange(rows.size)):
            return x
        return mx.take(x, self._ints(rows), axis=0)

    def logits(self, x, lm_head: _Linear) -> np.ndarray:
        pools = [p for i in sorted(self._dirty) for p in (self.k[i], self.v[i])]
        self._dirty.clear()
        if x.shape[0] == 0:
            mx.eval(pools)
            return np.zeros((0, lm_head.out_features), dtype=np.float32)
        y = self.linear(x, lm_head)
        if y.dtype != mx.float32:
            y = y.astype(mx.float32)
        mx.eval(y, pools)  # the step's one evaluation: logits and the KV it wrote
        return np.array(y, copy=True)


def _silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up


_GELU_C = math.sqrt(2 / math.pi)


def _gelu_tanh_mul(gate: mx.array, up: mx.array) -> mx.array:
    # GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as the
    # NumPy reference evaluates it.
    inner = _GELU_C * (gate + 0.044715 * gate * gate * gate)
    return 0.5 * gate * (1 + mx.tanh(inner)) * up


# One fused kernel instead of three on the GPU. Not on the CPU: there MLX compiles fused
# kernels with the system's C++ compiler at run time, and saves about 1% of a decode step.
_silu_mul_fused = mx.compile(_silu_mul, shapeless=True)
_gelu_tanh_mul_fused = mx.compile(_gelu_tanh_mul, shapeless=True)


def _expand_quantized(mode: str, config: ModelConfig, itemsize: int) -> bool:
    """Whether a CPU load expands quantized matrices (see the module's docstring)."""
    mode = mode.strip().lower() or "auto"
    if mode not in QUANTIZED_MODES:
        raise BackendUnavailableError(
            f"MLX quantized={mode!r}: choose {', '.join(QUANTIZED_MODES)}")
    if mode != "auto":
        return mode == "expand"
    dense = sum(int(np.prod(spec.shape)) for spec in weight_specs(config).values()
                if len(spec.shape) == 2) * itemsize
    return dense <= EXPAND_MEMORY_SHARE * available_memory_bytes()


# -- backend -----------------------------------------------------------------------------------
class MlxBackend(Backend):
    """The model on MLX: Metal GPU when present, else MLX's CPU device."""

    name = "mlx"
    options_class = MlxOptions
    # Packed where MLX's quantized matmul takes them (on the CPU device a load may expand them
    # instead; see the module's docstring and ``describe()``).
    capabilities = Capabilities(packed_bits=frozenset({2, 3, 4, 5, 6, 8}))

    def __init__(self, model_dir: ModelDir, *, num_blocks, block_size: int = 16,
                 options: MlxOptions | None = None, kv_layout=None):
        super().__init__(model_dir, num_blocks=num_blocks, block_size=block_size, options=options,
                         kv_layout=kv_layout)
        opts: MlxOptions = self.options
        self.device_name = default_device(opts.device)
        self.device = mx.Device(mx.cpu if self.device_name == "cpu" else mx.gpu)
        if not mx.is_available(self.device):
            raise BackendUnavailableError(f"MLX has no {self.device_name} device here")
        self.dtype_name = default_dtype(self.device_name, opts.dtype)
        self.dtype = DTYPES[self.dtype_name]
        cpu = self.device_name == "cpu"
        self.threads = (opts.threads or _cpu_threads()) if cpu else 1
        self.expanded = cpu and model_dir.is_quantized and _expand_quantized(
            opts.quantized or "", self.config, self.dtype.size)
        model = model_dir
        c = self.config
        with mx.stream(self.device):
            self.params = self.model.load_params(
                model, MlxLoader(model, self.dtype, cpu, self.threads, self.expanded)
            )
            # Each layer's pool holds its KV group's blocks.
            shapes = [(self.group_blocks[g] * block_size, c.num_key_value_heads, c.head_dim)
                      for g, _ in self.layer_pools]
            k = [mx.zeros(shape, dtype=self.dtype) for shape in shapes]
            v = [mx.zeros(shape, dtype=self.dtype) for shape in shapes]
            mx.eval(k, v)  # allocate and zero now, not during the first requests
        self.ops = MlxOps(k, v, block_size, self.device, self.dtype, self.threads)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            device = default_device(MlxOptions.from_env().device)
        except (BackendUnavailableError, RequestError) as err:
            return False, str(err)
        if device == "gpu":
            if not _metal():
                return False, "MLX device gpu was asked for, but MLX has no Metal device here"
            return True, "gpu (Metal)"
        try:
            mx.eval(mx.add(mx.array([1.0]), 1.0, stream=mx.cpu))
        except Exception as err:  # an MLX build without a CPU backend
            return False, f"MLX cannot run on the CPU here ({err}); install mlx[cpu]"
        return True, "cpu"

    @classmethod
    def kv_bytes_per_token(cls, config: ModelConfig, options: MlxOptions | None = None) -> int:
        """KV bytes per token in the dtype the device computes in (float16 on Metal holds
        twice the tokens of the same budget)."""
        opts = options or MlxOptions.from_env()
        try:
            itemsize = DTYPES[default_dtype(default_device(opts.device), opts.dtype)].size
        except BackendUnavailableError:
            itemsize = 4
        return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                * itemsize)

    def to_device(self, array: np.ndarray) -> mx.array:
        return self.ops.from_host(array)

    def to_host(self, x: mx.array) -> np.ndarray:
        return self.ops.to_host(x)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device_name, "dtype": self.dtype_name,
                "weights": "expanded" if self.expanded else "as stored", "threads": self.threads}

    def forward(self, batch: BatchInput) -> np.ndarray:
        self.check_batch(batch)
        self.ops.begin_step()
        try:
            with mx.stream(self.ops.streams()[0]):
                return self.model.forward(self.ops, self.params, batch)
        finally:
            self.ops.end_step()

    def _block_slots(self, block_ids) -> mx.array:
        ids = np.asarray(block_ids, dtype=np.int64)
        slots = ids[:, None] * self.block_size + np.arange(self.block_size)
        return mx.array(slots.reshape(-1).astype(np.int32))

    def copy_blocks(self, pairs: list[tuple[int, int]], group: int = 0) -> None:
        if not pairs:
            return
        src, dst = np.array(pairs, dtype=np.int64).T
        s, d = self._block_slots(src), self._block_slots(dst)
        with mx.stream(self.ops.streams()[0]):
            for pools in (self.ops.k, self.ops.v):
                for layer in self.kv_layout.layers(group):
                    pools[layer][d] = pools[layer][s]
            mx.eval(self.ops.k, self.ops.v)

    def read_blocks(self, block_ids: list[int], group: int = 0) -> np.ndarray:
        n = len(block_ids)
        if not n:
            return np.zeros(self.kv_block_shape(0, group), np.float32)
        slots = self._block_slots(block_ids)
        with mx.stream(self.ops.streams()[0]):
            kv = mx.stack([mx.stack([self.ops.k[i][slots], self.ops.v[i][slots]])
                           for i in self.kv_layout.layers(group)])
            out = self.ops.to_host(kv)
        return out.reshape(self.kv_block_shape(n, group))

    def write_blocks(self, block_ids: list[int], data: np.ndarray, group: int = 0) -> None:
        n = len(block_ids)
        if not n:
            return
        c = self.config
        layers = self.kv_layout.layers(group)
        slots = self._block_slots(block_ids)
        data = np.asarray(data, dtype=np.float32).reshape(
            len(layers), 2, n * self.block_size, c.num_key_value_heads, c.head_dim)
        with mx.stream(self.ops.streams()[0]):
            for j, i in enumerate(layers):
                self.ops.k[i][slots] = mx.array(data[j, 0]).astype(self.dtype)
                self.ops.v[i][slots] = mx.array(data[j, 1]).astype(self.dtype)
            mx.eval(self.ops.k, self.ops.v)

    def close(self) -> None:
        self.ops.k.clear()
        self.ops.v.clear()
        self.params = None


BACKEND = MlxBackend
