"""Op conformance (in the manner of llama.cpp's test-backend-ops): every op of the ``Ops``
protocol on every available backend against the NumPy reference, on random inputs, by
normalized MSE (float32 ops <= 1e-7, ops on quantized weights <= 5e-4).

A backend takes part as soon as ``available_backends()`` reports it available. The harness
builds it from tiny model directories like any caller would (``cls(model_dir, num_blocks=...,
block_size=..., options=...)``, with ``dtype="float32"`` when its options have a dtype), reaches
its ops and weight handles as ``backend.ops`` and ``backend.params``, and moves arrays through
``backend.to_device`` / ``backend.to_host`` (all declared in the backend contract).
A backend that can also store weights and KV as float16 (wgpu with ``shader-f16``) runs a second
variant so, held to 5e-4 on the ops that read weights or KV and to the float32 bound elsewhere.
Adding an op to the protocol adds one test here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tiny import tiny_config, tiny_gemma_config, write_model

from ondevice.backends import available_backends, backend_class
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.modeldir import ModelDir
from ondevice.settings import backend_options

F32_NMSE = 1e-7
QUANT_NMSE = 5e-4
LOW_PRECISION_NMSE = 5e-4  # variants that store weights and KV as float16

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Odd sizes where the format allows them (quantized inputs must be whole groups), GQA ratios
# 1, 3, 4 and 8, biases, an untied head, llama3 RoPE scaling, two block sizes.
CASES = {
    "qwen2-gqa3-odd": dict(
        config=dict(model_type="qwen2", hidden_size=90, intermediate_size=151,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=18, vocab_size=389),
        bits=None, group_size=None, block_size=8),
    "mha-untied-llama3": dict(
        config=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=16, vocab_size=301,
                    tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING,
                    rope_theta=500000.0, attention_bias=True, mlp_bias=True),
        bits=None, group_size=None, block_size=16),
    "mqa-q4-g32": dict(
        config=dict(hidden_size=128, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=32, vocab_size=333),
        bits=4, group_size=32, block_size=8),
    "gqa8-q8-g64-untied": dict(
        config=dict(hidden_size=128, intermediate_size=192, num_attention_heads=8,
                    num_key_value_heads=1, head_dim=16, vocab_size=301,
                    tie_word_embeddings=False),
        bits=8, group_size=64, block_size=16),
}
NUM_BLOCKS = 64


def _variants() -> list[tuple[str, str, dict]]:
    """(test id, backend name, constructor keywords) of every backend that can run here."""
    out = []
    for name, (ok, device) in available_backends().items():
        if not ok:
            continue
        out.append((name, name, {}))
        if name == "mlx" and device != "cpu":  # a Mac: the CPU device as well as Metal
            out.append(("mlx-cpu", "mlx", {"device": "cpu"}))
        if name == "wgpu" and "float16" in backend_class(name).dtypes():  # declared in base
            out.append(("wgpu-f16", "wgpu", {"dtype": "float16"}))  # f16 weights and KV
        if name == "mlx":  # quantized matrices kept (mx.quantized_matmul), not expanded
            out.append(("mlx-keep-quantized", "mlx", {"quantized": "keep"}))
    return out


VARIANTS = {vid: (name, kw) for vid, name, kw in _variants()}
_dirs: dict[str, ModelDir] = {}
_pairs: dict[tuple[str, str], tuple] = {}


def _model_dir(case: str, tmp_path_factory) -> ModelDir:
    if case not in _dirs:
        spec = CASES[case]
        cfg = tiny_config(**spec["config"])
        path = tmp_path_factory.mktemp(case)
        kw = {"bits": spec["bits"], "group_size": spec["group_size"]} if spec["bits"] else {}
        write_model(path, cfg, tokenizer=False, seed=11, **kw)
        _dirs[case] = ModelDir(path)
    return _dirs[case]


def _build(name: str, kw: dict, md: ModelDir, block_size: int):
    cls = backend_class(name)
    kw = dict(kw)
    if "dtype" in {f.name for f in dataclasses.fields(cls.options_class)}:
        kw.setdefault("dtype", "float32")  # the thresholds are for float32 arithmetic
    return cls(md, num_blocks=NUM_BLOCKS, block_size=block_size,
               options=backend_options(name, kw))


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(params=list(CASES))
def pair(request, variant, tmp_path_factory):
    """(NumPy reference, backend under test, case) on the same model directory. Cached: every
    test writes the same KV into both pools, so they stay equal."""
    case = request.param
    key = (variant, case)
    if key not in _pairs:
        md = _model_dir(case, tmp_path_factory)
        bs = CASES[case]["block_size"]
        name, kw = VARIANTS[variant]
        _pairs[key] = (NumpyBackend(md, num_blocks=NUM_BLOCKS, block_size=bs),
                       _build(name, kw, md, bs), case)
    return _pairs[key]


# -- helpers ----------------------------------------------------------------------------------
def dev(be, a: np.ndarray):
    return be.to_device(np.ascontiguousarray(a, dtype=np.float32))


def host(be, x) -> np.ndarray:
    return np.asarray(be.to_host(x))


def nmse(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(((got - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def check(got, ref, tol: float) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all()
    err = nmse(got, ref)
    assert err <= tol, f"normalized MSE {err:.3g} > {tol:g}"


def stored(be, tol: float) -> float:
    """Tolerance of an op that reads weights or KV, which a float16 variant stores rounded."""
    return max(tol, LOW_PRECISION_NMSE) if be.dtype_name == "float16" else tol


def as_stored(be, a: np.ndarray) -> np.ndarray:
    """``a`` as the backend's KV pool holds it (rounded through float16 if it stores that)."""
    if be.dtype_name == "float16":
        return a.astype(np.float16).astype(np.float32)
    return a


def quant_tol(case: str) -> float:
    return QUANT_NMSE if CASES[case]["bits"] else F32_NMSE


def rand(rng, *shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def linears(params) -> dict[str, object]:
    out = {}
    for i in (0, len(params.layers) - 1):
        for f in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            out[f"{i}.{f}"] = getattr(params.layers[i], f)
    return out


def in_features(ref: NumpyBackend, name: str) -> int:
    layer, field = name.split(".")
    return getattr(ref.params.layers[int(layer)], field).w.shape[1]


# -- one test per op -----------------------------------------------------------------------------
def test_embedding(pair):
    ref, be, case = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, ref.config.vocab_size, 13)
    ids[[2, 9]] = ids[5]  # repeats
    ids[0], ids[-1] = 0, ref.config.vocab_size - 1  # both ends of the table
    got = host(be, be.ops.embedding(be.params.embed, ids))
    check(got, ref.ops.embedding(ref.params.embed, ids), stored(be, quant_tol(case)))


def test_rms_norm(pair):
    ref, be, _ = pair
    rng = np.random.default_rng(2)
    x = rand(rng, 7, ref.config.hidden_size, scale=3.0)
    for layer in (0, 1):
        w_ref, w_be = ref.params.layers[layer].post_norm, be.params.layers[layer].post_norm
        got = host(be, be.ops.rms_norm(dev(be, x), w_be, ref.config.rms_norm_eps))
        check(got, ref.ops.rms_norm(x, w_ref, ref.config.rms_norm_eps), F32_NMSE)


@pytest.mark.parametrize("rows", [1, 5, 13, 40])  # decode, small batches, a prefill chunk
def test_linear(pair, rows):
    ref, be, case = pair
    rng = np.random.default_rng(3 + rows)
    ref_lin, be_lin = linears(ref.params), linears(be.params)
    for name in ref_lin:
        x = rand(rng, rows, in_features(ref, name))
        got = host(be, be.ops.linear(dev(be, x), be_lin[name]))
        check(got, ref.ops.linear(x, ref_lin[name]), stored(be, quant_tol(case)))


def test_rope(pair):
    ref, be, _ = pair
    c = ref.config
    rng = np.random.default_rng(4)
    positions = rng.integers(0, 1000, 11).astype(np.int32)
    positions[:3] = [0, 1, 999]
    inv = ref.model.inv_freq
    for heads in (c.num_attention_heads, c.num_key_value_heads):
        x = rand(rng, len(positions), heads * c.head_dim)
        got = host(be, be.ops.rope(dev(be, x), positions, inv, heads, c.head_dim))
        check(got, ref.ops.rope(x, positions, inv, heads, c.head_dim), F32_NMSE)


def test_write_kv_then_read_blocks(pair):
    ref, be, _ = pair
    c, bs = ref.config, ref.block_size
    rng = np.random.default_rng(5)
    width = c.num_key_value_heads * c.head_dim
    blocks = rng.permutation(NUM_BLOCKS)[:4]
    # Slots scattered over four blocks, the last block only partly written.
    slots = np.concatenate([b * bs + rng.permutation(bs)[: bs if i < 3 else bs // 2 + 1]
                            for i, b in enumerate(blocks)]).astype(np.int32)
    k, v = rand(rng, len(slots), width), rand(rng, len(slots), width)
    for layer in range(c.num_hidden_layers):
        ref.ops.write_kv(layer, k, v, slots)
        be.ops.write_kv(layer, dev(be, k), dev(be, v), slots)
    got = be.read_blocks(blocks.tolist())
    assert got.dtype == np.float32 and got.shape == be.kv_block_shape(len(blocks))
    check(got, ref.read_blocks(blocks.tolist()), stored(be, F32_NMSE))


def _fill_pools(ref, be, rng) -> None:
    """The same random KV in every block of both pools."""
    data = rand(rng, *ref.kv_block_shape(NUM_BLOCKS))
    ids = list(range(NUM_BLOCKS))
    ref.write_blocks(ids, data)
    be.write_blocks(ids, data)


def _tables(rng, lengths: list[int], bs: int) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) block tables for sequences of these lengths."""
    free = rng.permutation(NUM_BLOCKS).tolist()
    return [[free.pop() for _ in range(-(-n // bs))] for n in lengths]


def _batch(rng, layout: str, bs: int) -> BatchInput:
    """(new tokens, computed) per sequence; most end mid-block."""
    layouts = {
        # prefill chunk after context, decode rows around it, a long chunk from 0
        "mixed": [(11, 20), (1, 16), (1, 0), (150, 0), (1, 40)],
        "decode-batch": [(1, n) for n in (0, 6, 7, 8, 32, 63, 100)],
        "prefill-after-context": [(130, 37)],
        "single-decode": [(1, 200)],
    }
    seqs = layouts[layout]
    tables = _tables(rng, [n + c for n, c in seqs], bs)
    return BatchInput.build([([7] * n, c, t) for (n, c), t in zip(seqs, tables, strict=True)], bs)


def _explicit_batch(rng, bs: int) -> BatchInput:
    """Queries that are not the last rows of their sequences (a mask the reference builds
    from positions): three rows of a 20-token sequence and one row of a 12-token one."""
    tables = _tables(rng, [20, 12], bs)
    width = max(map(len, tables))
    bt = np.zeros((2, width), np.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    positions = np.array([3, 11, 19, 5], np.int32)
    seq_of = np.array([0, 0, 0, 1])
    slots = bt[seq_of, positions // bs] * bs + positions % bs
    return BatchInput(
        token_ids=np.full(4, 7, np.int32), positions=positions, slot_mapping=slots.astype(np.int32),
        block_tables=bt, seq_lens=np.array([20, 12], np.int32),
        query_start_loc=np.array([0, 3, 4], np.int32), logits_indices=np.array([2, 3], np.int32),
    )


@pytest.mark.parametrize("layout", ["mixed", "decode-batch", "prefill-after-context",
                                    "single-decode", "explicit-positions"])
def test_paged_attention(pair, layout):
    ref, be, _ = pair
    c, bs = ref.config, ref.block_size
    rng = np.random.default_rng(6)
    _fill_pools(ref, be, rng)
    batch = _explicit_batch(rng, bs) if layout == "explicit-positions" else _batch(rng, layout, bs)
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = rand(rng, batch.num_tokens, nh * hd)
    layer = c.num_hidden_layers - 1
    scale = ref.model.scale
    got = host(be, be.ops.paged_attention(layer, dev(be, q), batch, nh, nkv, hd, scale))
    check(got, ref.ops.paged_attention(layer, q, batch, nh, nkv, hd, scale), stored(be, F32_NMSE))


def test_silu_mul(pair):
    ref, be, _ = pair
    rng = np.random.default_rng(7)
    width = ref.config.intermediate_size
    gate, up = rand(rng, 9, width, scale=4.0), rand(rng, 9, width)
    gate[0, :4] = [-100.0, -30.0, 30.0, 0.0]  # saturated and zero gates
    got = host(be, be.ops.silu_mul(dev(be, gate), dev(be, up)))
    check(got, ref.ops.silu_mul(gate, up), F32_NMSE)


def test_add(pair):
    ref, be, _ = pair
    rng = np.random.default_rng(8)
    a, b = rand(rng, 5, ref.config.hidden_size), rand(rng, 5, ref.config.hidden_size)
    check(host(be, be.ops.add(dev(be, a), dev(be, b))), ref.ops.add(a, b), F32_NMSE)


def test_take_rows(pair):
    ref, be, _ = pair
    rng = np.random.default_rng(9)
    x = rand(rng, 17, ref.config.hidden_size)
    for rows in ([16], [0, 5, 5, 16], list(range(17)), []):
        rows = np.asarray(rows, np.int32)
        check(host(be, be.ops.take_rows(dev(be, x), rows)), ref.ops.take_rows(x, rows), F32_NMSE)


def test_logits(pair):
    ref, be, case = pair
    rng = np.random.default_rng(10)
    for rows in (1, 3):
        x = rand(rng, rows, ref.config.hidden_size)
        got = be.ops.logits(dev(be, x), be.params.lm_head)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        check(got, ref.ops.logits(x, ref.params.lm_head), stored(be, quant_tol(case)))


# -- the contract around the ops ------------------------------------------------------------
def test_forward_prefill_chunks_then_decode(pair):
    """Whole forward passes: a chunked prefill next to another sequence, then decode steps."""
    ref, be, case = pair
    bs, vocab = ref.block_size, ref.config.vocab_size
    rng = np.random.default_rng(12)
    a, b = rng.integers(0, vocab, 45).tolist(), rng.integers(0, vocab, 9).tolist()
    ta, tb = _tables(rng, [60, 20], bs)
    steps = [
        [(a[:30], 0, ta), (b, 0, tb)],
        [(a[30:], 30, ta), ([3], 9, tb)],
        [([4], 45, ta), ([5], 10, tb)],
        [([6], 46, ta)],
    ]
    for i, seqs in enumerate(steps):
        batch = BatchInput.build(seqs, bs, logits_for="all" if i == 0 else "last")
        got, want = be.forward(batch), ref.forward(batch)
        assert got.dtype == np.float32 and got.shape == (len(batch.logits_indices), vocab)
        check(got, want, stored(be, quant_tol(case)))


def test_copy_blocks_and_block_io(pair):
    ref, be, _ = pair
    rng = np.random.default_rng(13)
    _fill_pools(ref, be, rng)
    pairs = [(3, 40), (41, 7), (0, 63)]
    ref.copy_blocks(pairs)
    be.copy_blocks(pairs)
    everything = list(range(NUM_BLOCKS))
    check(be.read_blocks(everything), as_stored(be, ref.read_blocks(everything)), 0.0)
    data = rand(rng, *ref.kv_block_shape(2))
    be.write_blocks([9, 2], data)
    np.testing.assert_array_equal(be.read_blocks([9, 2]), as_stored(be, data))
    assert be.read_blocks([]).shape == be.kv_block_shape(0)


# -- Gemma 3's ops (a Gemma-shaped model: q/k norms, GELU-tanh gate, windowed local layers) ----
GEMMA_BLOCK = 8
GEMMA_WINDOW = 20  # 2.5 blocks: windows that start mid-block
_gemma_pairs: dict[str, tuple] = {}


@pytest.fixture
def gemma_pair(variant, tmp_path_factory):
    if variant not in _gemma_pairs:
        path = tmp_path_factory.mktemp("gemma")
        write_model(path, tiny_gemma_config(sliding_window=GEMMA_WINDOW), tokenizer=False, seed=11)
        md = ModelDir(path)
        name, kw = VARIANTS[variant]
        _gemma_pairs[variant] = (NumpyBackend(md, num_blocks=NUM_BLOCKS, block_size=GEMMA_BLOCK),
                                 _build(name, kw, md, GEMMA_BLOCK))
    return _gemma_pairs[variant]


def test_gelu_tanh_mul(gemma_pair):
    ref, be = gemma_pair
    rng = np.random.default_rng(14)
    width = ref.config.intermediate_size
    gate, up = rand(rng, 9, width, scale=4.0), rand(rng, 9, width)
    gate[0, :5] = [-100.0, -30.0, 30.0, 0.0, 100.0]  # saturated tanh both ways, zero
    got = host(be, be.ops.gelu_tanh_mul(dev(be, gate), dev(be, up)))
    check(got, ref.ops.gelu_tanh_mul(gate, up), F32_NMSE)


def test_head_rms_norm(gemma_pair):
    ref, be = gemma_pair
    c = ref.config
    rng = np.random.default_rng(15)
    for heads, field in ((c.num_attention_heads, "q_norm"), (c.num_key_value_heads, "k_norm")):
        x = rand(rng, 7, heads * c.head_dim, scale=3.0)
        w_ref, w_be = getattr(ref.params.layers[0], field), getattr(be.params.layers[0], field)
        got = host(be, be.ops.head_rms_norm(dev(be, x), w_be, c.rms_norm_eps, heads, c.head_dim))
        check(got, ref.ops.head_rms_norm(x, w_ref, c.rms_norm_eps, heads, c.head_dim), F32_NMSE)


def test_scale(gemma_pair):
    ref, be = gemma_pair
    rng = np.random.default_rng(16)
    x = rand(rng, 6, ref.config.hidden_size)
    factor = ref.model.embed_scale
    check(host(be, be.ops.scale(dev(be, x), factor)), ref.ops.scale(x, factor), F32_NMSE)


@pytest.mark.parametrize("layout", ["mixed", "decode-batch", "prefill-after-context",
                                    "single-decode", "explicit-positions"])
@pytest.mark.parametrize("window", [GEMMA_WINDOW, 8, 1])
def test_paged_attention_window(gemma_pair, layout, window):
    """Windowed attention; table entries before each window point at a block another sequence
    uses, which a kernel that reads them would mix in."""
    ref, be = gemma_pair
    c, bs = ref.config, ref.block_size
    rng = np.random.default_rng(17)
    _fill_pools(ref, be, rng)
    batch = _explicit_batch(rng, bs) if layout == "explicit-positions" else _batch(rng, layout, bs)
    first = batch.positions[batch.query_start_loc[:-1]]
    for s, p in enumerate(first):
        dead = max(0, int(p) - window + 1) // bs
        batch.block_tables[s, :dead] = batch.block_tables[(s + 1) % batch.num_seqs, 0]
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = rand(rng, batch.num_tokens, nh * hd)
    scale = ref.model.scale
    got = host(be, be.ops.paged_attention(0, dev(be, q), batch, nh, nkv, hd, scale, window=window))
    want = ref.ops.paged_attention(0, q, batch, nh, nkv, hd, scale, window=window)
    check(got, want, stored(be, F32_NMSE))


def test_paged_attention_window_reference():
    """The reference's window against a direct dense computation."""
    rng = np.random.default_rng(18)
    bs, n, hd, window = 4, 23, 8, 6
    kv = rand(rng, 1, 2, 8, bs, 1, hd)
    from ondevice.backends.numpy_backend import NumpyOps

    ops = NumpyOps(kv, bs)
    table = [5, 0, 7, 2, 3, 6]
    batch = BatchInput.build([([1] * n, 0, table)], bs, logits_for="all")
    q = rand(rng, n, hd)
    got = ops.paged_attention(0, q, batch, 1, 1, hd, 0.5, window=window)
    k = kv[0, 0, table].reshape(-1, hd)[:n]
    v = kv[0, 1, table].reshape(-1, hd)[:n]
    for t in range(n):
        lo = max(0, t - window + 1)
        sc = 0.5 * (k[lo:t + 1] @ q[t])
        w = np.exp(sc - sc.max())
        np.testing.assert_allclose(got[t], (w / w.sum()) @ v[lo:t + 1], rtol=1e-5, atol=1e-6)


def test_gemma_forward_past_the_window(gemma_pair):
    """Whole Gemma forward passes: chunked prefill past the window next to another sequence,
    then decode steps."""
    ref, be = gemma_pair
    bs, vocab = ref.block_size, ref.config.vocab_size
    rng = np.random.default_rng(19)
    a, b = rng.integers(0, vocab, 45).tolist(), rng.integers(0, vocab, 9).tolist()
    ta, tb = _tables(rng, [60, 20], bs)
    steps = [
        [(a[:30], 0, ta), (b, 0, tb)],
        [(a[30:], 30, ta), ([3], 9, tb)],
        [([4], 45, ta), ([5], 10, tb)],
        [([6], 46, ta)],
    ]
    for i, seqs in enumerate(steps):
        batch = BatchInput.build(seqs, bs, logits_for="all" if i == 0 else "last")
        got, want = be.forward(batch), ref.forward(batch)
        assert got.dtype == np.float32 and got.shape == (len(batch.logits_indices), vocab)
        check(got, want, stored(be, F32_NMSE))


# -- the cpu backend's packed weights: every width and group size it keeps packed ------------
PACKED_NMSE = 1e-6  # packed products against NumPy on the same dequantized weights
CPU_PACKED = [(bits, gs) for bits in (4, 5, 6, 8) for gs in (32, 64, 128)]
_cpu_pairs: dict[tuple[int, int], tuple] = {}


@pytest.fixture(params=CPU_PACKED, ids=[f"q{b}-g{g}" for b, g in CPU_PACKED])
def cpu_packed_pair(request, tmp_path_factory):
    """(NumPy, cpu) on a tiny model quantized at (bits, group size): GQA 2, an odd
    vocabulary (the tied head's odd row count), head_dim 64."""
    if "cpu" not in VARIANTS:
        pytest.skip("the cpu backend is not available here")
    bits, gs = request.param
    if request.param not in _cpu_pairs:
        cfg = tiny_config(hidden_size=128, intermediate_size=384, num_attention_heads=6,
                          num_key_value_heads=3, head_dim=64, vocab_size=333)
        path = tmp_path_factory.mktemp(f"cpu-q{bits}-g{gs}")
        write_model(path, cfg, tokenizer=False, seed=3, bits=bits, group_size=gs)
        md = ModelDir(path)
        _cpu_pairs[request.param] = (NumpyBackend(md, num_blocks=NUM_BLOCKS, block_size=16),
                                     _build("cpu", {}, md, 16))
    return _cpu_pairs[request.param]


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 40])  # decode rows (GEMV), small batches, chunks (GEMM)
def test_cpu_packed_linear_and_logits(cpu_packed_pair, rows):
    ref, be = cpu_packed_pair
    rng = np.random.default_rng(20 + rows)
    ref_lin, be_lin = linears(ref.params), linears(be.params)
    for name in ref_lin:
        x = rand(rng, rows, in_features(ref, name))
        check(be.ops.linear(x, be_lin[name]), ref.ops.linear(x, ref_lin[name]), PACKED_NMSE)
    x = rand(rng, rows, ref.config.hidden_size)
    check(be.ops.logits(x, be.params.lm_head), ref.ops.logits(x, ref.params.lm_head),
          PACKED_NMSE)
    ids = rng.integers(0, ref.config.vocab_size, rows)
    check(be.ops.embedding(be.params.embed, ids), ref.ops.embedding(ref.params.embed, ids),
          F32_NMSE)


def test_cpu_packed_forward(cpu_packed_pair):
    """Prefill chunks and decode rows of several sequences in one batch, then decode steps."""
    ref, be = cpu_packed_pair
    bs, vocab = ref.block_size, ref.config.vocab_size
    rng = np.random.default_rng(21)
    a, b = rng.integers(0, vocab, 37).tolist(), rng.integers(0, vocab, 5).tolist()
    ta, tb = _tables(rng, [50, 20], bs)
    steps = [[(a[:20], 0, ta), (b, 0, tb)], [(a[20:], 20, ta), ([3], 5, tb)],
             [([4], 37, ta), ([5], 6, tb)]]
    for seqs in steps:
        batch = BatchInput.build(seqs, bs)
        check(be.forward(batch), ref.forward(batch), PACKED_NMSE)
