"""The ``cpu`` backend: quantized weights stay packed in memory and are computed on by numba
kernels (``cpu_kernels.py``) on every physical core.

Quantized linears (MLX affine, 4/5/6/8 bits, groups that are multiples of 32) are kept as
their packed codes plus 16-bit scales and biases: MLX's 4- and 8-bit words are read as bytes
as they are stored; 5- and 6-bit codes, which straddle 32-bit words, are repacked at load
into a 4-bit plane and a plane of high bits of the same total size. A decode step streams
those bytes once per matrix (``qgemv``); a prefill chunk (``qgemm``) has each thread
dequantize 16 rows at a time into a small buffer and multiply every activation row with them.
The packed path never calls BLAS: OpenBLAS's spinning threads and numba's would fight over
the cores (3.6x slower end to end, measured). Dense (float32/float16) weights are multiplied
by a numba kernel up to 32 rows (decode, verification) and by NumPy's BLAS beyond (prefill),
so this backend serves every model the ``numpy`` backend does.

Fusion is done in the loader, not in the model definition: after loading, each layer's
q/k/v projections (and gate/up) that share a format are concatenated into one matrix, and
their handles become views into it. ``ops.linear`` on the first of them runs one product for
all and keeps the others' outputs for the calls that follow with the same input.

The KV pool is float32 ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (the
``numpy`` layout; one such pool per KV group, see ``ondevice.kv.layout``), written by slot and
read through the layer's group's block tables by one parallel attention kernel for all decode
rows and prefill chunks of a step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from ..batch import BatchInput
from ..modeldir import ModelDir, QuantizedTensor
from ..quant import unpack
from ..settings import CpuOptions
from . import cpu_kernels as K
from .base import Backend, Capabilities, PageRelease, RopeTables
from .numpy_backend import HostKV

F32 = np.float32
PACKED_BITS = frozenset({4, 5, 6, 8})
# Up to this many rows a product dots the packed codes with each activation row directly
# (group sums factored out); beyond it, blocks of dequantized rows are multiplied four by
# four. Measured on the default model's matrices (2 threads): 1 row 16.4 vs 25.3 ms, 2 rows
# 23.7 vs 27.3 ms, 4 rows 44.2 vs 27.5 ms, 16 rows 134 vs 44.5 ms (qgemv vs qgemm).
GEMV_MAX_ROWS = 2
# float32 products of up to this many rows use the numba kernel, not BLAS (see `dense_gemm`;
# one row too: 20.1 against 24.7 ms per f32 decode step, with no BLAS threads to wake).
DENSE_KERNEL_MAX_ROWS = 32
NO_HIGH = np.zeros((1, 1), np.uint8)  # 4- and 8-bit weights have no high-bit plane


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads share a core's vector units)."""
    import psutil

    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or logical
    per_core = max(1, (psutil.cpu_count(logical=True) or physical) // physical)
    return max(1, min(physical, logical // per_core))


# -- weight handles ------------------------------------------------------------------------
class _Dense:
    """A float32 matrix ``[out, in]``: `dense_gemm` up to 32 rows, NumPy's BLAS beyond."""

    __slots__ = ("w", "b", "group", "part")

    def __init__(self, w: np.ndarray, b: np.ndarray | None):
        self.w, self.b = w, b
        self.group: _Fused | None = None
        self.part = 0

    @property
    def out_features(self) -> int:
        return self.w.shape[0]

    def key(self) -> tuple:
        return ("dense", self.w.shape[1], self.b is not None)


class _Packed:
    """A quantized matrix ``[out, in]`` in kernel form.

    ``w``: uint8 codes, ``[out, in / 2]`` nibble pairs (4, 5, 6 bits) or ``[out, in]`` (8);
    ``hi``: uint8 high bits of 5/6-bit codes, ``[out, in * (bits - 4) / 8]``; ``scales`` and
    ``biases``: ``[out, in / group]``, uint16 bit patterns read through ``table`` (float16 or
    bfloat16) or float32.
    """

    __slots__ = ("w", "hi", "scales", "biases", "table", "group_size", "bits", "in_features",
                 "b", "group", "part")

    def __init__(self, w, hi, scales, biases, table, group_size, bits, in_features, b):
        self.w, self.hi, self.scales, self.biases, self.table = w, hi, scales, biases, table
        self.group_size, self.bits, self.in_features, self.b = group_size, bits, in_features, b
        self.group: _Fused | None = None
        self.part = 0

    @property
    def out_features(self) -> int:
        return self.w.shape[0]

    @property
    def nbytes(self) -> int:
        hi = self.hi.nbytes if self.hi is not NO_HIGH else 0
        return self.w.nbytes + hi + self.scales.nbytes + self.biases.nbytes

    def key(self) -> tuple:
        return ("packed", self.bits, self.group_size, self.in_features, self.scales.dtype.str,
                id(self.table), self.b is not None)

    def rows(self, lo: int, hi: int) -> _Packed:
        """A view of output rows ``lo:hi`` (shares memory)."""
        return _Packed(self.w[lo:hi], self.hi if self.hi is NO_HIGH else self.hi[lo:hi],
                       self.scales[lo:hi], self.biases[lo:hi], self.table, self.group_size,
                       self.bits, self.in_features, None if self.b is None else self.b[lo:hi])


class _Fused:
    """Several linears on the same input computed as one matrix (q/k/v, gate/up)."""

    __slots__ = ("whole", "bounds")

    def __init__(self, whole, bounds: list[tuple[int, int]]):
        self.whole = whole
        self.bounds = bounds


def _scales_form(scales: np.ndarray, biases: np.ndarray):
    """(scales, biases, table) in the most compact exact form the kernels read."""
    s, b = np.asarray(scales), np.asarray(biases)
    if s.dtype == np.float16 and b.dtype == np.float16:
        return s.view(np.uint16).copy(), b.view(np.uint16).copy(), K.F16_TABLE
    s, b = s.astype(F32), b.astype(F32)
    if np.array_equal(s.astype(np.float16).astype(F32), s) and \
            np.array_equal(b.astype(np.float16).astype(F32), b):
        return s.astype(np.float16).view(np.uint16), b.astype(np.float16).view(np.uint16), \
            K.F16_TABLE
    sb, bb = s.view(np.uint32), b.view(np.uint32)
    if not (sb & 0xFFFF).any() and not (bb & 0xFFFF).any():  # bfloat16 widened at read
        return (sb >> 16).astype(np.uint16), (bb >> 16).astype(np.uint16), K.BF16_TABLE
    return np.ascontiguousarray(s), np.ascontiguousarray(b), K.NO_TABLE


def _repack_codes(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's packed words as (code bytes, high-bit plane) for the kernels."""
    words = np.ascontiguousarray(weight, dtype=np.uint32)
    if bits in (4, 8):  # little-endian bytes are already the kernel's layout
        return words.view(np.uint8).copy(), NO_HIGH
    codes = unpack(words, bits)  # uint8 [out, in], one row at a time would save peak memory
    low = codes & 15
    w = (low[:, 0::2] | (low[:, 1::2] << 4)).astype(np.uint8)
    high = (codes >> 4).astype(np.uint8)
    per = 8 // (bits - 4)  # high parts per byte
    high = high.reshape(codes.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint8) * (bits - 4)).astype(np.uint8)
    hi = np.bitwise_or.reduce(high << shifts, axis=-1).astype(np.uint8)
    return w, np.ascontiguousarray(hi)


class CpuLoader:
    """Checkpoint tensors -> kernel handles: packed where the kernels take the format,
    float32 otherwise; the checkpoint's mapped pages are dropped as they are copied."""

    def __init__(self, model_dir: ModelDir):
        self.release = PageRelease(model_dir)

    def _dense(self, w) -> np.ndarray:
        out = w.dequantize() if isinstance(w, QuantizedTensor) else np.array(w, dtype=F32,
                                                                              order="C")
        self.release.copied(out.nbytes)
        return out

    def _packable(self, w) -> bool:
        return (isinstance(w, QuantizedTensor) and w.bits in PACKED_BITS
                and w.group_size % 32 == 0 and w.shape[-1] % w.group_size == 0)

    def _packed(self, w: QuantizedTensor, bias) -> _Packed:
        codes, hi = _repack_codes(w.weight, w.bits)
        scales, biases, table = _scales_form(w.scales, w.biases)
        out = _Packed(codes, hi, scales, biases, table, w.group_size, w.bits, w.shape[-1],
                      None if bias is None else np.array(bias, dtype=F32))
        self.release.copied(out.nbytes)
        return out

    def embedding(self, w):
        return self._packed(w, None) if self._packable(w) else self._dense(w)

    def linear(self, w, bias):
        if self._packable(w):
            return self._packed(w, bias)
        return _Dense(self._dense(w), None if bias is None else self._dense(bias))

    def norm(self, w) -> np.ndarray:
        return self._dense(w)

    def tied_lm_head(self, embed, w):
        return embed if isinstance(embed, _Packed) else _Dense(embed, None)


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fuse(handles: list) -> None:
    """Concatenate same-format linears into one matrix; their handles become its row views."""
    sizes = [h.out_features for h in handles]
    bounds, lo = [], 0
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    first = handles[0]
    cat = lambda name: np.concatenate([getattr(h, name) for h in handles])  # noqa: E731
    b = None if first.b is None else cat("b")
    if isinstance(first, _Dense):
        whole = _Dense(cat("w"), b)
        parts = [_Dense(whole.w[a:z], None if b is None else b[a:z]) for a, z in bounds]
    else:
        hi = NO_HIGH if first.hi is NO_HIGH else cat("hi")
        whole = _Packed(cat("w"), hi, cat("scales"), cat("biases"), first.table,
                        first.group_size, first.bits, first.in_features, b)
        parts = [whole.rows(a, z) for a, z in bounds]
    group = _Fused(whole, bounds)
    for i, (part, old) in enumerate(zip(parts, handles, strict=True)):
        part.group, part.part = group, i
        # Swap contents in place: the layer keeps its handle objects, now views.
        for slot in type(old).__slots__:
            setattr(old, slot, getattr(part, slot))


def fuse_layers(params) -> None:
    """Fuse q/k/v and gate/up of every layer whose fields carry those names and share a
    format (same kind, bits, group size, input size, scale form and bias presence)."""
    for layer in getattr(params, "layers", []):
        if not dataclasses.is_dataclass(layer):
            continue
        names = {f.name for f in dataclasses.fields(layer)}
        for group in FUSED_GROUPS:
            if not set(group) <= names:
                continue
            handles = [getattr(layer, n) for n in group]
            if all(isinstance(h, _Dense | _Packed) for h in handles) and \
                    len({h.key() for h in handles}) == 1 and \
                    len({type(h) for h in handles}) == 1:
                _fuse(handles)


# -- ops --------------------------------------------------------------------------------------
class CpuOps:
    """The ``Ops`` protocol on float32 NumPy arrays, computed by the numba kernels."""

    def __init__(self, kv: list[np.ndarray], block_size: int,
                 layer_pools: list[tuple[int, int]]):
        self.kv = kv  # one pool per KV group; layer i is layer_pools[i] = (group, index)
        self.layer_pools = layer_pools
        self.block_size = block_size
        self.rope_tables = RopeTables()
        self._plan: tuple[BatchInput, tuple[Any, ...]] | None = None
        # The outputs of the last fused product: (input, group, outputs, parts not yet taken).
        self._fused: tuple[Any, _Fused, list[np.ndarray], set[int]] | None = None
        self.fused_products = 0  # products run for fused groups (one per group per layer)

    # products ----------------------------------------------------------------------------
    def _product(self, x: np.ndarray, w) -> np.ndarray:
        if isinstance(w, _Dense):
            t = x.shape[0]
            if t <= DENSE_KERNEL_MAX_ROWS:
                y = np.empty((t, w.w.shape[0]), F32)
                K.dense_gemm(x, w.w, y)
            else:
                y = x @ w.w.T
        else:
            t, n = x.shape[0], w.out_features
            y = np.empty((t, n), F32)
            kernel = K.qgemv if t <= GEMV_MAX_ROWS else K.qgemm
            kernel(x, w.w, w.hi, w.scales, w.biases, w.table, w.group_size, w.bits, y)
        if w.b is not None:
            y += w.b
        return y

    def linear(self, x, w) -> np.ndarray:
        group = w.group
        if group is None:
            return self._product(np.ascontiguousarray(x, dtype=F32), w)
        # The caller's object is the key: ``ascontiguousarray`` returns a new view of arrays
        # that numba kernels returned, so its result would never match the next call's.
        cached = self._fused
        if cached is not None and cached[0] is x and cached[1] is group and w.part in cached[3]:
            cached[3].discard(w.part)
            if not cached[3]:
                self._fused = None
            return cached[2][w.part]
        y = self._product(np.ascontiguousarray(x, dtype=F32), group.whole)
        outs = [np.ascontiguousarray(y[:, a:z]) for a, z in group.bounds]
        rest = set(range(len(outs))) - {w.part}
        self._fused = (x, group, outs, rest) if rest else None
        self.fused_products += 1
        return outs[w.part]

    def logits(self, x, lm_head) -> np.ndarray:
        return self.linear(x, lm_head)

    # the rest --------------------------------------------------------------------------------
    def embedding(self, table, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(table, _Packed):
            out = np.empty((len(ids), table.in_features), F32)
            K.gather_rows(table.w, table.hi, table.scales, table.biases, table.table,
                          table.group_size, table.bits, ids, out)
            return out
        return table[ids]

    def rms_norm(self, x, weight, eps: float) -> np.ndarray:
        return K.rms_norm(np.ascontiguousarray(x, dtype=F32), weight, F32(eps))

    def rope(self, x, positions, inv_freq, heads, head_dim) -> np.ndarray:
        cos, sin = self.rope_tables(positions, inv_freq)
        return K.rope(np.ascontiguousarray(x, dtype=F32), cos, sin, heads, head_dim)

    def write_kv(self, layer, k, v, slot_mapping) -> None:
        group, index = self.layer_pools[layer]
        K.write_kv(self.kv[group], index, np.ascontiguousarray(k, dtype=F32),
                   np.ascontiguousarray(v, dtype=F32), np.asarray(slot_mapping, np.int64))

    def plan(self, batch: BatchInput) -> tuple[Any, ...]:
        """(sequence of each query row, positions, sequence lengths, block tables of each
        layer) as the attention kernel takes them, built by the first layer of a step."""
        if self._plan is None or self._plan[0] is not batch:
            qsl = batch.query_start_loc.astype(np.int64)
            row_seq = np.repeat(np.arange(len(qsl) - 1, dtype=np.int64), np.diff(qsl))
            tables: dict[int, np.ndarray] = {}  # one conversion per distinct table
            per_layer = []
            for layer in range(len(self.layer_pools)):
                t = batch.tables_for(layer)
                if id(t) not in tables:
                    tables[id(t)] = np.ascontiguousarray(t, dtype=np.int64)
                per_layer.append(tables[id(t)])
            self._plan = (batch, (row_seq, batch.positions.astype(np.int64),
                                  batch.seq_lens.astype(np.int64), per_layer))
        return self._plan[1]

    def paged_attention(self, layer, q, batch: BatchInput, heads, kv_heads, head_dim, scale,
                        window: int = 0):
        row_seq, positions, lens, tables = self.plan(batch)
        group, index = self.layer_pools[layer]
        return K.paged_attention(self.kv[group], index, np.ascontiguousarray(q, dtype=F32),
                                 row_seq, positions, lens, tables[layer], heads, F32(scale),
                                 int(window))

    @staticmethod
    def _gated(gate, up, gelu: bool) -> np.ndarray:
        kernel = K.gated_mul if gate.shape[0] <= GEMV_MAX_ROWS else K.gated_mul_rows
        return kernel(np.ascontiguousarray(gate, dtype=F32), np.ascontiguousarray(up, dtype=F32),
                      gelu)

    def silu_mul(self, gate, up) -> np.ndarray:
        return self._gated(gate, up, False)

    def gelu_tanh_mul(self, gate, up) -> np.ndarray:
        return self._gated(gate, up, True)

    def head_rms_norm(self, x, weight, eps, heads, head_dim) -> np.ndarray:
        t = x.shape[0]
        rows = np.ascontiguousarray(x, dtype=F32).reshape(t * heads, head_dim)
        return K.rms_norm(rows, weight, F32(eps)).reshape(t, heads * head_dim)

    def scale(self, x, factor) -> np.ndarray:
        return x * F32(factor)

    def add(self, a, b) -> np.ndarray:
        return a + b

    def take_rows(self, x, rows) -> np.ndarray:
        return x[rows]


class CpuBackend(HostKV, Backend):
    name = "cpu"
    options_class = CpuOptions
    capabilities = Capabilities(packed_bits=PACKED_BITS)

    def __init__(self, model_dir: ModelDir, *, num_blocks, block_size: int = 16,
                 options: CpuOptions | None = None, kv_layout=None):
        super().__init__(model_dir, num_blocks=num_blocks, block_size=block_size, options=options,
                         kv_layout=kv_layout)
        import numba

        self.threads = max(1, min(self.options.threads or physical_cores(),
                                  numba.config.NUMBA_NUM_THREADS))
        c = self.config
        self.params = self.model.load_params(model_dir, CpuLoader(model_dir))
        fuse_layers(self.params)
        self.kv_pools = []
        for group, blocks in enumerate(self.group_blocks):
            shape = (len(self.kv_layout.layers(group)), 2, blocks, block_size,
                     c.num_key_value_heads, c.head_dim)
            pool = np.empty(shape, dtype=F32)
            K.touch(pool.reshape(-1))  # fault every page in now, on every thread
            self.kv_pools.append(pool)
        self.ops = CpuOps(self.kv_pools, block_size, self.layer_pools)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        import numba

        return True, f"cpu (numba {numba.__version__}, {physical_cores()} cores)"

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["threads"] = self.threads
        out["packed_weight_bytes"] = sum(
            h.nbytes for h in _handles(self.params) if isinstance(h, _Packed))
        return out

    def _threads(self) -> None:
        # numba's thread count is per calling thread; the engine may run us on its own.
        import numba

        if numba.get_num_threads() != self.threads:
            numba.set_num_threads(self.threads)

    def forward(self, batch: BatchInput) -> np.ndarray:
        self.check_batch(batch)
        self._threads()
        return self.model.forward(self.ops, self.params, batch)



def _handles(params) -> list:
    """Every distinct weight handle of ``params`` (fused groups counted once)."""
    seen: dict[int, Any] = {}

    def visit(h) -> None:
        if isinstance(h, _Dense | _Packed):
            target = h.group.whole if h.group is not None else h
            seen.setdefault(id(target), target)

    for name in ("embed", "lm_head"):
        visit(getattr(params, name, None))
    for layer in getattr(params, "layers", []):
        for f in dataclasses.fields(layer):
            visit(getattr(layer, f.name))
    return list(seen.values())


BACKEND = CpuBackend
