"""The one Llama-family definition on the NumPy backend vs an independent float64 reference."""

import numpy as np
import pytest
from reference import reference_logits
from tiny import random_weights, tiny_config, write_model

from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.config import ModelConfig
from ondevice.modeldir import ModelDir
from ondevice.models.llama import rope_inv_freq

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama-gqa-tied": {},
    "llama-mha-untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "llama-mqa": {"num_key_value_heads": 1},
    "llama3-rope-scaling": {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
    "mistral": {"model_type": "mistral", "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen2-bias": {"model_type": "qwen2", "num_key_value_heads": 2},
    "smollm-head-dim": {"head_dim": 32, "num_attention_heads": 4, "hidden_size": 96},
    "attention-and-mlp-bias": {"attention_bias": True, "mlp_bias": True},
}


def _load(tmp_path, overrides, blocks=64, block_size=4, **kw):
    cfg = tiny_config(**overrides)
    weights = random_weights(cfg, seed=3)
    write_model(tmp_path, cfg, weights, tokenizer=False, **kw)
    md = ModelDir(tmp_path)
    return md, weights, NumpyBackend(md, num_blocks=blocks, block_size=block_size)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_reference(tmp_path, variant):
    md, weights, backend = _load(tmp_path, VARIANTS[variant])
    ids = list(np.random.default_rng(0).integers(0, md.config.vocab_size, 19))
    table = [9, 2, 31, 4, 17]  # scattered blocks: attention must read through the table
    logits = backend.forward(BatchInput.build([(ids, 0, table)], 4, "all"))
    assert logits.dtype == np.float32
    assert logits.shape == (19, md.config.vocab_size)
    ref = reference_logits(md.config, weights, ids)
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=1e-4)


def test_qwen2_has_qkv_bias_and_llama_does_not():
    assert ModelConfig.from_dict(tiny_config(model_type="qwen2")).qkv_bias
    assert not ModelConfig.from_dict(tiny_config()).qkv_bias


def test_llama3_rope_scaling_changes_only_low_frequencies():
    plain = rope_inv_freq(ModelConfig.from_dict(tiny_config(rope_theta=500000.0)))
    scaled = rope_inv_freq(ModelConfig.from_dict(
        tiny_config(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)))
    assert scaled.dtype == np.float32
    assert scaled[0] == plain[0]  # highest frequency untouched
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # lowest divided by factor
    assert np.all(scaled <= plain)


def test_chunked_prefill_decode_and_mixed_batch_agree(tmp_path):
    md, weights, backend = _load(tmp_path, {}, blocks=32, block_size=4)
    rng = np.random.default_rng(1)
    a = list(rng.integers(0, md.config.vocab_size, 13))  # ends mid-block
    b = list(rng.integers(0, md.config.vocab_size, 6))
    ref_a = reference_logits(md.config, weights, a)
    ref_b = reference_logits(md.config, weights, b)
    ta, tb = [5, 1, 20, 7], [30, 12]
    # Sequence a: a prefill chunk of 8, then, in one batch, a's last 5 tokens next to b's prompt.
    first = backend.forward(BatchInput.build([(a[:8], 0, ta)], 4, "all"))
    mixed = backend.forward(BatchInput.build([(a[8:], 8, ta), (b, 0, tb)], 4, "all"))
    np.testing.assert_allclose(first, ref_a[:8], atol=2e-4)
    np.testing.assert_allclose(mixed[:5], ref_a[8:], atol=2e-4)
    np.testing.assert_allclose(mixed[5:], ref_b, atol=2e-4)
    # One decode row for each sequence in the same step.
    na, nb = a + [3], b + [4]
    dec = backend.forward(BatchInput.build([([3], 13, ta), ([4], 6, tb)], 4))
    np.testing.assert_allclose(dec[0], reference_logits(md.config, weights, na)[-1], atol=2e-4)
    np.testing.assert_allclose(dec[1], reference_logits(md.config, weights, nb)[-1], atol=2e-4)


def test_copy_blocks_copies_every_layer(tmp_path):
    md, _, backend = _load(tmp_path, {}, blocks=8, block_size=4)
    backend.kv[:, :, 2] = np.random.default_rng(0).standard_normal(backend.kv[:, :, 2].shape)
    backend.copy_blocks([(2, 5)])
    np.testing.assert_array_equal(backend.kv[:, :, 5], backend.kv[:, :, 2])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_runs_dequantized(tmp_path, bits):
    md, weights, backend = _load(tmp_path, {}, bits=bits, group_size=32)
    assert md.is_quantized
    # The reference runs on the dequantized weights: the backend must match them exactly,
    # and they must be a faithful quantization of the originals.
    deq = {}
    for name, w in weights.items():
        t = md.get(name.removesuffix(".weight")) if name.endswith(".weight") else w
        deq[name] = t.dequantize() if hasattr(t, "dequantize") else np.asarray(t)
        step = (np.abs(w).max() * 2) / ((1 << bits) - 1)
        assert np.abs(deq[name] - w).max() <= step
    ids = [5, 6, 7, 8, 9]
    logits = backend.forward(BatchInput.build([(ids, 0, [0, 1])], 4, "all"))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference_logits(md.config, deq, ids), atol=2e-4)
