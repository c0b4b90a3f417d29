"""What ``ondevice info`` reports about a model directory."""

from __future__ import annotations

import math

from .default_model import resolve_model
from .modeldir import ModelDir
from .models.llama import weight_specs


def model_info(model: str | None) -> dict[str, object]:
    md = ModelDir(resolve_model(model))
    c = md.config
    params = sum(math.prod(s.shape) for s in weight_specs(c).values())
    tok = md.tokenizer
    q = c.quantization
    return {
        "path": str(md.path),
        "architecture": c.model_type,
        "parameters": f"{params / 1e6:.1f}M",
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "heads": f"{c.num_attention_heads} query, {c.num_key_value_heads} key/value",
        "head_dim": c.head_dim,
        "context_length": c.context_length,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "quantization": f"{q['bits']}-bit, group {q['group_size']}" if q else "none",
        "weights_on_disk": f"{md.weight_bytes / 2**20:.1f} MiB",
        "chat_template": "yes" if tok.chat_template else "no",
        "eos_token_ids": sorted(tok.eos_token_ids),
    }
