"""The ``cpu`` backend beyond op conformance (tests/test_conformance.py) and the engine's
guarantees (tests/test_engine_backends.py): the registry, weights kept packed in memory
(MLX's exact layout, checked against ``mx.quantize`` for 5 and 6 bits), threads, the compile
cache location, and the real default model: imported Q4_1 weights give the same greedy tokens
as NumPy on the same dequantized values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_config, write_model

import ondevice
from ondevice.backends import _auto_order, available_backends
from ondevice.batch import BatchInput
from ondevice.modeldir import ModelDir, QuantizedTensor
from ondevice.sampling import SamplingParams
from ondevice.settings import CpuOptions

pytest.importorskip("numba", reason="the cpu backend needs numba (pip install 'ondevice[cpu]')")

from ondevice.backends import cpu_kernels  # noqa: E402
from ondevice.backends.cpu_backend import CpuBackend, CpuLoader, _Packed  # noqa: E402
from ondevice.backends.numpy_backend import NumpyBackend  # noqa: E402

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


# -- registry ----------------------------------------------------------------------------------
def test_registry_and_auto_order():
    ok, device = available_backends()["cpu"]
    assert ok and device.startswith("cpu")
    assert _auto_order("linux", "x86_64")[0] == "cpu"
    assert _auto_order("win32", "AMD64")[:2] == ("cpu", "numpy")
    assert _auto_order("darwin", "arm64") == ("mlx", "cpu", "numpy")
    assert CpuBackend.capabilities.packed_bits == frozenset({4, 5, 6, 8})


def test_without_numba_the_backend_is_unavailable_with_the_extra_to_install():
    code = ("import sys; sys.modules['numba'] = None\n"
            "from ondevice.backends import available_backends\n"
            "print(available_backends()['cpu'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "False" in out and "numba" in out and "ondevice[cpu]" in out


def test_compile_cache_lives_in_the_ondevice_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["ONDEVICE_HOME"] = str(tmp_path)
    code = ("import numba; from ondevice.backends import cpu_kernels; "
            "print(numba.config.CACHE_DIR)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, env=env).stdout.strip()
    assert Path(out) == tmp_path / "cache" / "numba"


# -- weights stay packed ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cpu-q4") / "model"
    return write_model(path, tiny_config(), bits=4, group_size=32)


def _packed_file_bytes(md: ModelDir) -> int:
    size = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2}
    total = 0
    for name in md.weights:
        if name.endswith((".scales", ".biases")) or md.weights.dtype(name) == "U32":
            total += int(np.prod(md.weights.shape(name))) * size[md.weights.dtype(name)]
    return total


def test_quantized_weights_stay_packed(q4_dir):
    md = ModelDir(q4_dir)
    be = CpuBackend(md, num_blocks=8, block_size=8)
    layer = be.params.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        h = getattr(layer, name)
        assert isinstance(h, _Packed) and h.w.dtype == np.uint8 and h.scales.dtype == np.uint16
    assert layer.q_proj.group is layer.k_proj.group is layer.v_proj.group  # fused q/k/v
    assert layer.gate_proj.group is layer.up_proj.group
    # q/k/v are views into one fused matrix, not copies.
    assert np.shares_memory(layer.q_proj.w, layer.q_proj.group.whole.w)
    assert isinstance(be.params.embed, _Packed) and be.params.lm_head is be.params.embed
    assert be.describe()["packed_weight_bytes"] == _packed_file_bytes(md)


def test_fused_groups_run_one_product_per_layer(q4_dir, monkeypatch):
    """A forward pass computes q/k/v once and gate/up once per layer, not once per part
    (inputs that numba kernels returned must still be recognised as the same input)."""
    be = CpuBackend(ModelDir(q4_dir), num_blocks=8, block_size=8)
    calls = []
    for name in ("qgemv", "qgemm"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name,
                            lambda *a, _k=kernel: (calls.append(a[1].shape), _k(*a))[1])
    layers = len(be.params.layers)
    for rows in (1, 9):  # decode rows (qgemv) and a prefill chunk (qgemm)
        calls.clear()
        be.ops.fused_products = 0
        be.forward(BatchInput.build([(list(range(3, 3 + rows)), 0, [0, 1])], 8))
        assert be.ops.fused_products == 2 * layers
        assert len(calls) == 4 * layers + 1  # qkv, o, gate/up, down; the head


def test_fast_exp_accuracy():
    """The kernels' vectorizable exp: relative error <= 2e-7 over float32's normal range,
    0 for -inf and below it, a finite saturated value above it."""
    from numba import njit

    @njit
    def exps(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = cpu_kernels.fast_exp(x[i])
        return out

    x = np.linspace(-87.3, 88.37, 200_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(exps(x).astype(np.float64) - want) / want
    assert rel.max() <= 2e-7
    edge = exps(np.array([-np.inf, -100.0, 0.0, 1000.0, np.inf], np.float32))
    assert edge[0] == 0 and edge[1] == 0 and edge[2] == 1
    assert np.isfinite(edge[3:]).all() and (edge[3:] > 2e38).all()  # saturates, no inf


def test_dense_gemm_equals_blas():
    """The float32 small-batch product (one weight row against four activation rows up to
    8 rows, four by four beyond) on shapes with ragged edges: every row and column filled."""
    rng = np.random.default_rng(5)
    for out_features, in_features in ((37, 24), (50, 130)):
        w = rng.standard_normal((out_features, in_features), dtype=np.float32)
        for rows in (1, 2, 3, 4, 5, 8, 9, 12, 13, 17, 32):
            x = rng.standard_normal((rows, in_features), dtype=np.float32)
            y = np.full((rows, out_features), np.nan, np.float32)
            cpu_kernels.dense_gemm(x, w, y)
            np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_layout_is_mlx_own(bits):
    """Kernel dequantization of ``mx.quantize``'s output equals ``mx.dequantize``."""
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((7, 256)).astype(np.float32)
    for gs in (32, 64, 128):
        packed, scales, biases = mx.quantize(mx.array(w), group_size=gs, bits=bits)
        want = np.array(mx.dequantize(packed, scales, biases, group_size=gs, bits=bits))
        qt = QuantizedTensor(np.array(packed), np.array(scales), np.array(biases), gs, bits)

        class _NoRelease:
            def copied(self, nbytes):
                pass

        loader = CpuLoader.__new__(CpuLoader)
        loader.release = _NoRelease()
        h = loader.linear(qt, None)
        got = np.empty((7, 256), np.float32)
        cpu_kernels.dequantize_rows(h.w, h.hi, h.scales, h.biases, h.table, gs, bits, 0, got)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert h.nbytes <= qt.weight.nbytes + 4 * scales.size * 2  # still packed size


def test_threads_option(q4_dir):
    import numba

    be = CpuBackend(ModelDir(q4_dir), num_blocks=8, block_size=8, options=CpuOptions(threads=1))
    assert be.threads == 1 and be.describe()["threads"] == 1
    be.forward(BatchInput.build([([5, 6, 7], 0, [0])], 8))
    assert numba.get_num_threads() == 1
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_packed_engine_batched_equals_alone(q4_dir):
    """Decode rows of several sequences (GEMV) and prefill chunks (GEMM) batched together
    give each request the tokens it gets alone."""
    from test_engine import mixed_prompts, run_all

    from ondevice.engine import Engine

    md = ModelDir(q4_dir)

    def engine() -> Engine:
        return Engine(CpuBackend(md, num_blocks=256, block_size=8), md.tokenizer,
                      context_length=md.config.context_length, model_id="tiny-q4")

    prompts = mixed_prompts(md.config.vocab_size, count=6, lengths=(5, 120))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reqs = [(p, params) for p in prompts]
    alone = [out for r in reqs for out in run_all(engine(), [r])]
    assert run_all(engine(), reqs) == alone


# -- the real default model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def keep_dir(real_model_dir) -> Path:
    """The default model as shipped: Q4_1 imported losslessly (4-bit groups of 32, an 8-bit
    embedding table)."""
    from ondevice.default_model import default_model_dir

    return default_model_dir(quantize="keep", quiet=True)


@pytest.mark.real_model
def test_golden_on_cpu_with_f32_weights(real_model_dir, golden_cases):
    model = ondevice.load(real_model_dir, backend="cpu", kv_memory="64MiB")
    try:
        for case in golden_cases:
            logits = model.runtime.logits_for(case["prompt_ids"])[-1]
            assert logits.dtype == np.float32
            assert np.argsort(-logits, kind="stable")[:5].tolist() == case["top5_ids"]
            err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
            assert err < 1e-3, err
            got = [c.token_id for c in model.stream(case["prompt_ids"], GREEDY)]
            assert got == case["greedy_ids"], case.get("prompt_text")
    finally:
        model.close()


@pytest.mark.real_model
def test_imported_q4_1_greedy_tokens_equal_numpy_on_the_same_values(keep_dir, golden_cases):
    md = ModelDir(keep_dir)
    assert md.config.quantization["bits"] == 4 and md.config.quantization["group_size"] == 32
    cpu = ondevice.load(keep_dir, backend="cpu", kv_memory="64MiB")
    try:
        be = cpu.runtime.backend
        packed = be.describe()["packed_weight_bytes"]
        assert packed < 110e6  # ~98 MB as stored, not 513 MB of float32
        ours = [[c.token_id for c in cpu.stream(case["prompt_ids"], GREEDY)]
                for case in golden_cases]
    finally:
        cpu.close()
    ref = ondevice.load(keep_dir, backend="numpy", kv_memory="64MiB")  # dequantized at load
    try:
        theirs = [[c.token_id for c in ref.stream(case["prompt_ids"], GREEDY)]
                  for case in golden_cases]
    finally:
        ref.close()
    assert ours == theirs


@pytest.mark.real_model
def test_imported_q4_1_logits_match_numpy(keep_dir):
    md = ModelDir(keep_dir)
    cpu = CpuBackend(md, num_blocks=64, block_size=16)
    ref = NumpyBackend(md, num_blocks=64, block_size=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, md.config.vocab_size, 70).tolist()
    steps = [BatchInput.build([(ids[:64], 0, [3, 9, 1, 30, 5])], 16),
             BatchInput.build([(ids[64:65], 64, [3, 9, 1, 30, 5])], 16)]
    for batch in steps:
        got, want = cpu.forward(batch), ref.forward(batch)
        nmse = float(((got - want) ** 2).sum() / (want**2).sum())
        assert nmse < 1e-8, nmse
