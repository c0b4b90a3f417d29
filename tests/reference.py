"""An independent, deliberately naive float64 Llama forward pass (full attention, no paging)."""

from __future__ import annotations

import numpy as np

from ondevice.config import ModelConfig
from ondevice.models.llama import rope_inv_freq


def reference_logits(config: ModelConfig, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    c = config
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    f = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    n = len(ids)
    inv = rope_inv_freq(c).astype(np.float64)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * g

    def rot(x):  # x [n, h, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    def lin(x, name):
        y = x @ f[name + ".weight"].T
        return y + f[name + ".bias"] if name + ".bias" in f else y

    h = f["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, f[p + "input_layernorm.weight"])
        q = rot(lin(x, p + "self_attn.q_proj").reshape(n, nh, hd))
        k = rot(lin(x, p + "self_attn.k_proj").reshape(n, nkv, hd))
        v = lin(x, p + "self_attn.v_proj").reshape(n, nkv, hd)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = s + np.triu(np.full((n, n), -np.inf), 1)
        p_ = np.exp(s - s.max(-1, keepdims=True))
        p_ /= p_.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", p_, v).reshape(n, nh * hd)
        h = h + lin(a, p + "self_attn.o_proj")
        x = norm(h, f[p + "post_attention_layernorm.weight"])
        g = lin(x, p + "mlp.gate_proj")
        h = h + lin(g / (1 + np.exp(-g)) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = norm(h, f["model.norm.weight"])
    head = f["model.embed_tokens.weight"] if c.tie_word_embeddings else f["lm_head.weight"]
    return h @ head.T
