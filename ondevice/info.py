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
        "quantization": _quantization(q),
        "weights_on_disk": f"{md.weight_bytes / 2**20:.1f} MiB",
        "chat_template": "yes" if tok.chat_template else "no",
        "eos_token_ids": sorted(tok.eos_token_ids),
    }


def _quantization(q: dict | None) -> str:
    """``4-bit, group 32`` plus the per-module layouts that differ (GGUF mixes such as Q4_K_M:
    ``; 8-bit g32 x3, 6-bit g32 x9``)."""
    if not q:
        return "none"
    text = f"{q['bits']}-bit, group {q['group_size']}"
    counts: dict[str, int] = {}
    for value in q.values():
        if isinstance(value, dict) and "bits" in value:
            layout = f"{value['bits']}-bit g{value.get('group_size', q['group_size'])}"
            counts[layout] = counts.get(layout, 0) + 1
    if counts:
        text += "; overrides: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
    return text

