"""Every op of the ``Ops`` protocol as WGSL dispatches recorded into the step's encoder, and
the device-side top-k that greedy steps read back instead of whole logits rows.

Precision: activations are always float32; dense weights and the KV pool are f16 or f32 (the
backend's dtype), quantized weights stay packed. Matrix products with up to ``GEMV_MAX_ROWS``
rows of x run the GEMV kernels, larger ones the tiled kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...batch import BatchInput
from .device import BUF, Device, GTensor, WgpuError
from .kvpool import KVPool
from .loader import Matrix, Part
from .recorder import MAX_GROUPS, StepRecorder, grid
from .wgsl import element_subst

F32 = np.float32
# Rows of x up to which the GEMV kernels run (each invocation: 8 weight rows against every x
# row); above it, the tiled kernels. On lavapipe the GEMV kernel at 8 rows takes about a third
# of the tiled kernel's time on the same product and the same time at 32 rows
# (1536x576 f32, measured), so decode batches of up to 8 sequences stay on it.
GEMV_MAX_ROWS = 8
GEMV_ROWS = 8  # weight rows per invocation of the GEMV kernels (each x load serves all of them)
TILE = 8  # rows of x per invocation of the prefill kernels (by 4 dense or TILE quantized weight rows)


def rope_table(inv_freq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[size, len(inv_freq)]`` of positions ``0..size-1``: the reference's float32
    angles and NumPy's cos/sin, so that the shader's rotation matches the NumPy backend's."""
    angles = np.arange(size, dtype=F32)[:, None] * np.asarray(inv_freq, F32)[None, :]
    return np.cos(angles), np.sin(angles)


class WgpuOps(StepRecorder):
    """The ``Ops`` protocol on ``dev``, the KV pools ``kv`` (one per KV group; layer i in
    pool ``layer_pools[i] = (group, index)``) and ``f16`` storage."""

    def __init__(self, dev: Device, kv: list[KVPool], *, f16: bool, block_size: int,
                 max_binding: int, max_positions: int,
                 layer_pools: list[tuple[int, int]] | None = None):
        super().__init__(dev)
        self.kv = kv
        self.layer_pools = layer_pools or [(0, i) for i in range(kv[0].layers)]
        self.f16 = f16
        self.block_size = block_size
        self.max_binding = max_binding
        self.max_positions = max_positions
        self._rope: dict[bytes, tuple[Any, Any, int]] = {}
        self._part_biases: dict[tuple[int, int], Any] = {}
        self._held: list[GTensor] = []

    def subst(self, wtype: str, vec: int = 1) -> dict[str, str]:
        return element_subst(self.f16, wtype, vec)

    # -- per-step tables (each a candidate for a helper shared by every backend) -------------
    def rope_tables(self, inv_freq: np.ndarray, need: int) -> tuple[Any, Any]:
        """Device cos/sin tables for positions up to at least ``need``, per RoPE base: made
        once over the model's whole context (or ``need`` if larger) and kept."""
        inv = np.asarray(inv_freq, dtype=F32)
        hit = self._rope.get(inv.tobytes())
        if hit is None or hit[2] < need:
            size = max(need, self.max_positions, 1)
            cos, sin = rope_table(inv, size)
            hit = (self.dev.buffer(cos), self.dev.buffer(sin), size)
            self._rope[inv.tobytes()] = hit
        return hit[0], hit[1]

    def attention_inputs(self, batch: BatchInput, layer: int = 0) -> list[Any]:
        """The step's attention metadata on the device (``layer``'s KV group's block tables,
        sequence lengths, query start offsets, positions): uploaded by the first layer that
        needs each, reused by the rest."""
        return [self.ints(batch.tables_for(layer)), self.ints(batch.seq_lens),
                self.ints(batch.query_start_loc), self.ints(batch.positions)]

    # -- the protocol ------------------------------------------------------------------------
    def _gather(self, m: Matrix, ids: Any, n: int) -> GTensor:
        out = self.new(n, m.in_features)
        groups = grid(-(-n * m.in_features // 256))
        for part in m.parts:
            params = (n, m.in_features, part.lo, part.hi)
            if m.quant is None:
                self.dispatch("embedding", self.subst(m.wtype), None, params,
                              [part.w, ids, out.buf], groups)
            else:
                gs, bits = m.quant
                self.dispatch("embedding_q", None, {"BITS": bits, "GS": gs}, params,
                              [part.w, part.sb, ids, out.buf], groups)
        return out

    def embedding(self, table: Matrix, ids: np.ndarray) -> GTensor:
        ids = np.asarray(ids)
        return self._gather(table, self.ints(ids), len(ids))

    def rms_norm(self, x: GTensor, weight: Any, eps: float) -> GTensor:
        out = self.new(x.rows, x.cols)
        if x.rows:
            self.dispatch("rms_norm", None, None, (x.rows, x.cols, float(eps)),
                          [x.buf, weight, out.buf], (x.rows, 1, 1))
        return out

    def linear(self, x: GTensor, w: Matrix) -> GTensor:
        if x.cols != w.in_features:
            raise WgpuError(f"linear: input has {x.cols} features, weight expects "
                            f"{w.in_features}")
        out = self.new(x.rows, w.out_features)
        if x.rows == 0:
            return out
        has_bias = int(w.bias is not None)
        for part in w.parts:
            self._linear_part(x, w, part, out, has_bias)
        return out

    def _linear_part(self, x: GTensor, w: Matrix, part: Part, out: GTensor,
                     has_bias: int) -> None:
        n_out = part.hi - part.lo
        bias = w.bias if w.bias is not None else self._dummy
        if w.bias is not None and len(w.parts) > 1:
            bias = self._part_bias(w, part)
        gemv = x.rows <= GEMV_MAX_ROWS
        if gemv:
            workgroups = (*grid(-(-n_out // (64 * GEMV_ROWS))), 1)
            rt = x.rows
        else:
            ct = TILE if w.quant is not None else 4  # matmul.wgsl: 4 weight rows
            workgroups = (-(-n_out // (8 * ct)), -(-x.rows // (8 * TILE)), 1)
            rt = TILE
        if w.quant is not None:
            gs, bits = w.quant
            params = (x.rows, w.in_features, n_out, w.out_features, part.lo, has_bias)
            name = "gemv_q" if gemv else "matmul_q"
            subst = {"RT": rt} | ({"CR": GEMV_ROWS} if gemv else {"CT": TILE})
            self.dispatch(name, subst, {"BITS": bits, "GS": gs}, params,
                          [part.w, part.sb, x.buf, bias, out.buf], workgroups)
            return
        buffers = [part.w, x.buf, bias, out.buf]
        if gemv and w.wtype == "f16" and w.in_features % 8 == 0:
            params = (x.rows, w.in_features, n_out, w.out_features, part.lo, has_bias)
            self.dispatch("gemv_f16", {"RT": rt, "CR": GEMV_ROWS}, None, params, buffers,
                          workgroups)
            return
        vec = 4 if w.in_features % 4 == 0 else 1
        params = (x.rows, w.in_features // vec, n_out, w.out_features, part.lo, has_bias)
        subst = self.subst(w.wtype, vec) | {"RT": rt, "CR": GEMV_ROWS}
        self.dispatch("gemv" if gemv else "matmul", subst, None, params, buffers, workgroups)

    def _part_bias(self, w: Matrix, part: Part) -> Any:
        # Biases of split matrices: a per-part copy made once (biases are small).
        key = (id(w), part.lo)
        if key not in self._part_biases:
            enc = self.commands()
            n = part.hi - part.lo
            buf = self.device.create_buffer(size=max(16, -(-n * 4 // 16) * 16),
                                            usage=BUF.STORAGE | BUF.COPY_DST)
            enc.copy_buffer_to_buffer(w.bias, part.lo * 4, buf, 0, n * 4)
            self._part_biases[key] = buf
        return self._part_biases[key]

    def rope(self, x: GTensor, positions: np.ndarray, inv_freq: np.ndarray, heads: int,
             head_dim: int) -> GTensor:
        out = self.new(x.rows, x.cols)
        if x.rows == 0:
            return out
        cos, sin = self.rope_tables(inv_freq, int(np.max(positions)) + 1)
        n = x.rows * heads * (head_dim // 2)
        self.dispatch("rope", None, None, (x.rows, heads, head_dim),
                      [x.buf, self.ints(positions), cos, sin, out.buf],
                      (*grid(-(-n // 256)), 1))
        return out

    def write_kv(self, layer: int, k: GTensor, v: GTensor, slot_mapping: np.ndarray) -> None:
        if k.rows == 0:
            return
        group, index = self.layer_pools[layer]
        kv = self.kv[group]
        n = k.rows * k.cols
        subst = self.subst(kv.kv_type) | {"POOLS": kv.write_code}
        self.dispatch("kv_write", subst, None,
                      (k.rows, k.cols, self.block_size, kv.blocks_per_part),
                      [k.buf, v.buf, self.ints(slot_mapping), *kv.layer_buffers(index)],
                      (*grid(-(-n // 256)), 1))

    def paged_attention(self, layer: int, q: GTensor, batch: BatchInput, heads: int,
                        kv_heads: int, head_dim: int, scale: float, window: int = 0) -> GTensor:
        out = self.new(q.rows, q.cols)
        if q.rows == 0:
            return out
        if q.rows > MAX_GROUPS:
            raise WgpuError(f"paged_attention: {q.rows} query rows in one step "
                            f"(at most {MAX_GROUPS})")
        group, index = self.layer_pools[layer]
        kv = self.kv[group]
        subst = self.subst(kv.kv_type) | {"G": heads // kv_heads, "HD": head_dim,
                                          "DPT": -(-head_dim // 64),
                                          "POOLS": kv.attention_code}
        params = (kv_heads, self.block_size, batch.tables_for(layer).shape[1], batch.num_seqs,
                  float(scale), kv.blocks_per_part, int(window))
        self.dispatch("paged_attention", subst, None, params,
                      [q.buf, *self.attention_inputs(batch, layer), out.buf,
                       *kv.layer_buffers(index)], (q.rows, kv_heads, 1))
        return out

    def _elementwise(self, shader: str, a: GTensor, b: GTensor) -> GTensor:
        if a.shape != b.shape:
            raise WgpuError(f"{shader}: shapes {a.shape} and {b.shape} differ")
        out = self.new(a.rows, a.cols)
        n = a.rows * a.cols
        if n:
            self.dispatch(shader, None, None, (n,), [a.buf, b.buf, out.buf],
                          (*grid(-(-n // 256)), 1))
        return out

    def silu_mul(self, gate: GTensor, up: GTensor) -> GTensor:
        return self._elementwise("silu_mul", gate, up)

    def add(self, a: GTensor, b: GTensor) -> GTensor:
        return self._elementwise("add", a, b)

    def gelu_tanh_mul(self, gate: GTensor, up: GTensor) -> GTensor:
        return self._elementwise("gelu_tanh_mul", gate, up)

    def head_rms_norm(self, x: GTensor, weight: Any, eps: float, heads: int,
                      head_dim: int) -> GTensor:
        # rms_norm.wgsl over [T * heads, head_dim] rows: the same buffers, another row view.
        out = self.new(x.rows, x.cols)
        if x.rows:
            rows = x.rows * heads
            self.dispatch("rms_norm", None, None, (rows, head_dim, float(eps)),
                          [x.buf, weight, out.buf], (rows, 1, 1))
            # Held until the step is submitted: with the input's buffer back in the pool at
            # once, lavapipe gave wrong keys in multi-row decode steps of Gemma 3 (reproduced,
            # cause not found; holding it costs one small buffer per layer and step).
            self._held.append(x)
        return out

    def flush(self, reads=()):
        out = super().flush(reads)
        self._held.clear()
        return out

    def scale(self, x: GTensor, factor: float) -> GTensor:
        out = self.new(x.rows, x.cols)
        n = x.rows * x.cols
        if n:
            self.dispatch("scale", None, None, (n, float(factor)), [x.buf, out.buf],
                          (*grid(-(-n // 256)), 1))
        return out

    def take_rows(self, x: GTensor, rows: np.ndarray) -> GTensor:
        rows = np.asarray(rows)
        if rows.size == x.rows and np.array_equal(rows, np.arange(rows.size)):
            return x
        out = self.new(rows.size, x.cols)
        if rows.size:  # the embedding gather, with the activation as the table
            params = (rows.size, x.cols, 0, x.rows)
            self.dispatch("embedding", self.subst("f32"), None, params,
                          [x.buf, self.ints(rows), out.buf],
                          (*grid(-(-rows.size * x.cols // 256)), 1))
        return out

    # -- the step's output -------------------------------------------------------------------
    def _logit_chunks(self, x: GTensor, lm_head: Matrix) -> list[tuple[int, int]]:
        # Rows per logits buffer, so that none exceeds one storage binding.
        per = max(1, self.max_binding // (lm_head.out_features * 4))
        return [(lo, min(x.rows, lo + per)) for lo in range(0, x.rows, per)]

    def logits(self, x: GTensor, lm_head: Matrix) -> np.ndarray:
        """The step's float32 logits: ends the encoder, submits it, reads back."""
        vocab = lm_head.out_features
        if x.rows == 0:
            self.flush()
            return np.zeros((0, vocab), F32)
        outs = []
        for lo, hi in self._logit_chunks(x, lm_head):
            xs = x if (lo, hi) == (0, x.rows) else self.take_rows(x, np.arange(lo, hi))
            outs.append(self.linear(xs, lm_head))
        raws = self.flush([(o.buf, o.nbytes) for o in outs])
        return np.concatenate([np.frombuffer(r, F32).reshape(-1, vocab) for r in raws]).copy()

    def topk(self, x: GTensor, lm_head: Matrix, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids int32, logits float32) ``[rows, k]`` of the logits of ``x``, computed
        on the GPU: the readback is ``rows * k`` pairs, not ``rows * vocab`` floats. Ties go
        to the lower id."""
        if not 1 <= k <= 64:
            raise WgpuError(f"topk: k={k} (1..64)")
        if x.rows == 0:
            self.flush()
            return np.zeros((0, k), np.int32), np.zeros((0, k), F32)
        ids_all, vals_all = [], []
        for lo, hi in self._logit_chunks(x, lm_head):
            xs = x if (lo, hi) == (0, x.rows) else self.take_rows(x, np.arange(lo, hi))
            logits = self.linear(xs, lm_head)
            n = hi - lo
            ids, vals = self.new(n, k), self.new(n, k)
            self.dispatch("topk", {"K": k}, None, (lm_head.out_features,),
                          [logits.buf, ids.buf, vals.buf], (n, 1, 1))
            ids_all.append(ids)
            vals_all.append(vals)
        reads = [(t.buf, t.nbytes) for t in ids_all] + [(t.buf, t.nbytes) for t in vals_all]
        raws = self.flush(reads)
        m = len(ids_all)
        ids = np.concatenate([np.frombuffer(r, np.int32).reshape(-1, k) for r in raws[:m]])
        vals = np.concatenate([np.frombuffer(r, F32).reshape(-1, k) for r in raws[m:]])
        return ids.copy(), vals.copy()


class TopkOps:
    """``ops`` with ``logits`` replaced by the device top-k (for ``forward_topk``): the model
    definition runs unchanged and its last op reads back ``k`` pairs per row."""

    def __init__(self, ops: WgpuOps, k: int):
        self._ops, self._k = ops, k
        self.result: tuple[np.ndarray, np.ndarray] | None = None

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def logits(self, x, lm_head):
        self.result = self._ops.topk(x, lm_head, self._k)
        return self.result
