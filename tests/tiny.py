"""Tiny random-weight models in the model directory format, for fast tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ondevice.config import ModelConfig
from ondevice.models.llama import weight_specs
from ondevice.quant import quantize

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! héllo wörld, 日本語 🙂 numbers 12345 and code: def f(x): return x + 1",
    "Once upon a time there was a tiny model that answered every question.",
] * 20


@lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_config(**overrides) -> dict:
    vocab = Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size()
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def tiny_gemma_config(**overrides) -> dict:
    """A Gemma 3-shaped config in the Hugging Face layout: MQA with q/k norms, head_dim
    larger than hidden / heads, local layers with a 32-token window around one global layer,
    distinct RoPE bases per layer type."""
    vocab = Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size()
    cfg = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "max_position_embeddings": 1024, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "sliding_window": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    # Gemma checkpoints store norm weights w of a (1 + w) multiplier: small values around 0.
    norm_base = 0.0 if config.get("model_type") == "gemma3_text" else 1.0
    for name, spec in weight_specs(ModelConfig.from_dict(config)).items():
        if spec.kind == "norm":
            out[name] = (norm_base + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        else:
            out[name] = (0.15 * rng.standard_normal(spec.shape)).astype(np.float32)
    return out


def write_model(
    path: Path, config: dict | None = None, weights: dict | None = None, *,
    bits: int | None = None, group_size: int = 32, seed: int = 0, tokenizer: bool = True,
) -> Path:
    """Write a model directory; ``bits`` stores embedding/linear weights MLX-quantized."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    weights = dict(weights or random_weights(config, seed))
    if bits:
        config["quantization"] = {"group_size": group_size, "bits": bits}
        specs = weight_specs(ModelConfig.from_dict(config))
        for name, spec in specs.items():
            if spec.kind in ("embedding", "linear"):
                prefix = name.removesuffix(".weight")
                w, s, b = quantize(weights.pop(name), group_size, bits)
                weights.update({name: w, prefix + ".scales": s, prefix + ".biases": b})
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(path / "model.safetensors"))
    if tokenizer:
        (path / "tokenizer.json").write_text(tiny_tokenizer_json())
        (path / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        }))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path
