"""Gemma 3 text models (270M, 1B, 4B, 12B, 27B text towers) in one definition.

What sets it apart from the Llama family (facts from Gemma 3's published architecture):

- the token embedding is multiplied by ``sqrt(hidden_size)`` (in the compute dtype), and the
  output head is always the embedding table (tied);
- every RMSNorm multiplies by ``1 + weight`` (Hugging Face checkpoints store ``weight``; we add
  the 1 once at load, so the backends' ``rms_norm`` stays a plain multiply);
- four norms per layer (before and after attention, before and after the MLP) and a per-head
  RMSNorm on queries and keys, applied before RoPE;
- a GELU (tanh approximation) gated MLP;
- queries scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``;
- local layers (``sliding_attention``) see only the last ``sliding_window`` positions and use
  their own RoPE base (10k); global layers (``full_attention``) see everything (RoPE base 1M,
  with linear scaling on the larger models).

Activations are flat 2-D ``[T, features]`` over the T tokens of a flattened batch, as in
``llama.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batch import BatchInput
from ..config import ModelConfig
from .common import TensorSpec

SLIDING = "sliding_attention"
FULL = "full_attention"


def weight_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a Gemma 3 text checkpoint holds, by Hugging Face name, dense shape."""
    c = config
    hd, nh, nkv, hidden = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    specs = {"model.embed_tokens.weight": TensorSpec((c.vocab_size, hidden), "embedding")}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        specs[p + "input_layernorm.weight"] = TensorSpec((hidden,), "norm")
        for name, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            specs[p + f"self_attn.{name}.weight"] = TensorSpec((out, hidden), "linear")
        specs[p + "self_attn.o_proj.weight"] = TensorSpec((hidden, nh * hd), "linear")
        specs[p + "self_attn.q_norm.weight"] = TensorSpec((hd,), "norm")
        specs[p + "self_attn.k_norm.weight"] = TensorSpec((hd,), "norm")
        specs[p + "post_attention_layernorm.weight"] = TensorSpec((hidden,), "norm")
        specs[p + "pre_feedforward_layernorm.weight"] = TensorSpec((hidden,), "norm")
        specs[p + "post_feedforward_layernorm.weight"] = TensorSpec((hidden,), "norm")
        for name, shape in (
            ("gate_proj", (c.intermediate_size, hidden)),
            ("up_proj", (c.intermediate_size, hidden)),
            ("down_proj", (hidden, c.intermediate_size)),
        ):
            specs[p + f"mlp.{name}.weight"] = TensorSpec(shape, "linear")
    specs["model.norm.weight"] = TensorSpec((hidden,), "norm")
    if c.draft_head_tokens:  # a draft's trimmed head (the full head is the embedding)
        specs["lm_head.weight"] = TensorSpec((c.draft_head_tokens, hidden), "linear")
    return specs


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    return inv.astype(np.float32)


def rope_inv_freqs(config: ModelConfig) -> dict[str, np.ndarray]:
    """float32 ``[head_dim / 2]`` inverse frequencies per layer type.

    Newer configs give ``rope_parameters`` per layer type; older ones give the global layers'
    ``rope_theta``/``rope_scaling`` and the local layers' ``rope_local_base_freq`` (unscaled).
    """
    c = config
    params = c.rope_parameters
    if params is not None:
        return {kind: _inv_freq(c.head_dim, float(p.get("rope_theta", c.rope_theta)), p)
                for kind, p in params.items() if kind in (SLIDING, FULL)}
    return {
        FULL: _inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
        SLIDING: _inv_freq(c.head_dim, c.rope_local_base_freq or 10000.0, None),
    }


def layer_windows(config: ModelConfig) -> list[int]:
    """Per layer, the attention window in positions (0: the whole context)."""
    return [config.sliding_window if kind == SLIDING else 0 for kind in config.layer_types]


@dataclass
class Layer:
    input_norm: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    q_norm: Any
    k_norm: Any
    post_attn_norm: Any
    pre_ffn_norm: Any
    post_ffn_norm: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any
    window: int  # 0 for global layers
    inv_freq: np.ndarray


@dataclass
class Params:
    """Backend-prepared weights (handles whose type only the backend knows)."""

    embed: Any
    layers: list[Layer]
    norm: Any
    lm_head: Any


class Gemma3Model:
    """Gemma 3 decoder: GQA with q/k norms, sandwich norms, GELU-tanh gated MLP, and
    interleaved local (sliding-window) and global attention layers."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.inv_freqs = rope_inv_freqs(config)
        self.windows = layer_windows(config)
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.scale = 1.0 / math.sqrt(scalar)
        # sqrt(hidden) rounded to float32 first: the reference multiplies in the compute dtype.
        self.embed_scale = float(np.float32(math.sqrt(config.hidden_size)))
        self.softcap = config.final_logit_softcapping

    def load_params(self, tensors, loader) -> Params:
        """Build :class:`Params` through the backend's ``loader`` (see ``LlamaModel``).

        Norm weights get their ``1 +`` here, in float32, so that every backend's ``rms_norm``
        (a plain ``x * rsqrt(mean(x^2) + eps) * w``) computes Gemma's norm.
        """
        c = self.config

        def norm(name: str):
            return loader.norm(np.asarray(tensors.dense(name), np.float32) + np.float32(1))

        def linear(prefix: str):
            return loader.linear(tensors.get(prefix), None)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            kind = c.layer_types[i]
            layers.append(
                Layer(
                    input_norm=norm(p + "input_layernorm.weight"),
                    q_proj=linear(p + "self_attn.q_proj"),
                    k_proj=linear(p + "self_attn.k_proj"),
                    v_proj=linear(p + "self_attn.v_proj"),
                    o_proj=linear(p + "self_attn.o_proj"),
                    q_norm=norm(p + "self_attn.q_norm.weight"),
                    k_norm=norm(p + "self_attn.k_norm.weight"),
                    post_attn_norm=norm(p + "post_attention_layernorm.weight"),
                    pre_ffn_norm=norm(p + "pre_feedforward_layernorm.weight"),
                    post_ffn_norm=norm(p + "post_feedforward_layernorm.weight"),
                    gate_proj=linear(p + "mlp.gate_proj"),
                    up_proj=linear(p + "mlp.up_proj"),
                    down_proj=linear(p + "mlp.down_proj"),
                    window=self.windows[i],
                    inv_freq=self.inv_freqs[kind],
                )
            )
        embed_w = tensors.get("model.embed_tokens")
        embed = loader.embedding(embed_w)
        lm_head = linear("lm_head") if c.draft_head_tokens else \
            loader.tied_lm_head(embed, embed_w)
        return Params(embed, layers, norm("model.norm.weight"), lm_head)

    def forward(self, ops, params: Params, batch: BatchInput):
        """Logits ``[len(batch.logits_indices), vocab]`` for the rows the batch asks for."""
        c = self.config
        nh, nkv, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        pos = batch.positions
        h = ops.scale(ops.embedding(params.embed, batch.token_ids), self.embed_scale)  # [T, hidden]
        for i, layer in enumerate(params.layers):
            x = ops.rms_norm(h, layer.input_norm, eps)
            q = ops.head_rms_norm(ops.linear(x, layer.q_proj), layer.q_norm, eps, nh, hd)
            k = ops.head_rms_norm(ops.linear(x, layer.k_proj), layer.k_norm, eps, nkv, hd)
            q = ops.rope(q, pos, layer.inv_freq, nh, hd)  # [T, nh*hd]
            k = ops.rope(k, pos, layer.inv_freq, nkv, hd)  # [T, nkv*hd]
            v = ops.linear(x, layer.v_proj)  # [T, nkv*hd]
            ops.write_kv(i, k, v, batch.slots_for(i))  # the slots of the layer's KV group
            a = ops.paged_attention(i, q, batch, nh, nkv, hd, self.scale, window=layer.window)
            a = ops.rms_norm(ops.linear(a, layer.o_proj), layer.post_attn_norm, eps)
            h = ops.add(h, a)  # [T, hidden]
            x = ops.rms_norm(h, layer.pre_ffn_norm, eps)
            m = ops.gelu_tanh_mul(ops.linear(x, layer.gate_proj), ops.linear(x, layer.up_proj))
            m = ops.rms_norm(ops.linear(m, layer.down_proj), layer.post_ffn_norm, eps)
            h = ops.add(h, m)  # [T, hidden]
        h = ops.take_rows(h, batch.logits_indices)  # only the rows that are sampled
        logits = ops.logits(ops.rms_norm(h, params.norm, eps), params.lm_head)  # [R, vocab]
        if self.softcap:  # cap * tanh(logits / cap), on the host array
            cap = np.float32(self.softcap)
            logits = np.tanh(logits / cap) * cap
        return logits
