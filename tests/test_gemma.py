"""Gemma 3: the real 270M model (its Q4_K_M GGUF dequantized to float32) against the golden
file on every float32 backend (numpy, cpu, mlx on its CPU device, wgpu), its GGUF import (config, norms, tokenizer), and config checks.

Golden: prompt ids exact (BOS added), 32 greedy tokens (eos ignored) identical, top-5 logits of
the prompt's last position within 1e-3. One prompt (822 tokens) runs past the 512-token window
of the local layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_gemma_config

import ondevice
from ondevice.backends import available_backends
from ondevice.config import ModelConfig
from ondevice.engine.engine import score_tokens
from ondevice.errors import ModelFormatError, UnsupportedModelError
from ondevice.sampling import SamplingParams

GOLDEN = Path(__file__).resolve().parent / "data" / "gemma3_270m_greedy.json"
FLOAT32 = {
    "numpy": None,
    "cpu": None,
    "mlx": lambda: ondevice.MlxOptions(device="cpu", dtype="float32"),
    "wgpu": lambda: ondevice.WgpuOptions(dtype="float32"),
}
AVAILABLE = {name for name, (ok, _) in available_backends().items() if ok}


@pytest.fixture(scope="session")
def golden() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="module", params=list(FLOAT32))
def gemma(request, gemma_f32_dir):
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"backend {name} is not available here")
    options = FLOAT32[name]() if FLOAT32[name] else None
    model = ondevice.load(gemma_f32_dir, backend=name, options=options)
    yield model
    model.close()


def test_golden_prompt_ids_greedy_and_top5(gemma, golden):
    rt = gemma.runtime
    for case in golden:
        assert gemma.tokenizer.encode(case["prompt"], add_special_tokens=True) == case["prompt_ids"]
        # register: the prompt's full blocks stay in the prefix cache, so the greedy run
        # below prefills only the last partial block again.
        logits = rt.loop.call(lambda c=case: score_tokens(rt.engine, c["prompt_ids"],
                                                          logits_for="last", register=True))[-1]
        assert logits.dtype == np.float32
        assert np.argsort(-logits, kind="stable")[:5].tolist() == case["top5_ids"]
        err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
        assert err < 1e-3, (len(case["prompt_ids"]), err)
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        got = [c.token_id for c in gemma.stream(case["prompt_ids"], params)]
        assert got == case["greedy_ids"], len(case["prompt_ids"])


def test_gguf_import_config_norms_and_tokenizer(gemma_f32_dir, gemma_gguf):
    cfg = json.loads((gemma_f32_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] == 512
    assert cfg["layer_types"].count("full_attention") == 3 and len(cfg["layer_types"]) == 18
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rope_local_base_freq"] == 10000.0
    assert "hidden_act" not in cfg and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    # llama.cpp stores 1 + w; the directory holds Hugging Face's w (centred near 0, not 1).
    from safetensors import safe_open

    with safe_open(gemma_f32_dir / "model.safetensors", "np") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    from gguf import GGUFReader

    raw = next(t for t in GGUFReader(gemma_gguf).tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_array_equal(norm + np.float32(1), np.asarray(raw.data, np.float32))
    tok = json.loads((gemma_f32_dir / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["bos_token"] == "<bos>"
    assert "chat_template" not in tok  # the base model has none


# -- config checks (one-line errors) ------------------------------------------------------------
@pytest.mark.parametrize("overrides, error, words", [
    ({"sliding_window": 0}, ModelFormatError, "sliding_window must be a positive integer"),
    ({"sliding_window": 4096}, ModelFormatError, "larger than the context"),
    ({"layer_types": ["sliding_attention"] * 2}, ModelFormatError, "one attention type per layer"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     ModelFormatError, "unknown layer type 'chunked_attention'"),
    ({"layer_types": "full_attention"}, ModelFormatError, "one attention type per layer"),
    ({"query_pre_attn_scalar": -1}, ModelFormatError, "query_pre_attn_scalar"),
    ({"attn_logit_softcapping": 50.0}, UnsupportedModelError, "soft-capping"),
    ({"rope_parameters": {"full_attention": 3}}, ModelFormatError, "rope_parameters"),
])
def test_bad_gemma_configs_are_one_line_errors(overrides, error, words):
    with pytest.raises(error) as exc:
        ModelConfig.from_dict(tiny_gemma_config(**overrides))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_gemma_config_defaults():
    cfg = dict(tiny_gemma_config(num_hidden_layers=12))
    del cfg["layer_types"]  # older configs: every sixth layer is global
    c = ModelConfig.from_dict(cfg)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11]
    assert c.context_length == 1024  # the window does not cap Gemma's context


# -- chat on a base model -----------------------------------------------------------------------
def test_chat_on_a_base_model_says_so_and_completes_raw_text(tmp_path):
    """No chat template (like the base Gemma 3 270M): `ondevice chat` says it is a base model
    and continues the raw text, exactly what a raw `generate` of the same text gives."""
    import subprocess
    import sys

    from tiny import write_model

    src = write_model(tmp_path / "base", tiny_gemma_config())
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    cli = [sys.executable, "-m", "ondevice"]
    common = ["-m", str(src), "--backend", "numpy", "-n", "6", "--temperature", "0"]
    chat = subprocess.run([*cli, "chat", *common], input="Once upon a time", text=True,
                          capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "is a base model" in chat.stderr and "raw text" in chat.stderr
    raw = subprocess.run([*cli, "generate", *common, "--raw", "-p", "Once upon a time"],
                         text=True, capture_output=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    assert chat.stdout.strip() == raw.stdout.strip()
