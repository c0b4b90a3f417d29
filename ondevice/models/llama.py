"""The Llama family in one definition: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5.

Written against the backend ``Ops`` protocol (``backends/base.py``), so NumPy runs it eagerly,
MLX lazily, wgpu as recorded dispatches and the Core ML exporter as MIL ops. Activations are
flat 2-D ``[T, features]`` over the T tokens of a flattened batch; ops reshape heads inside.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batch import BatchInput
from ..config import ModelConfig
from ..errors import ModelFormatError
from .common import TensorSpec

__all__ = ["TensorSpec", "LlamaModel", "check_layer_count", "rope_inv_freq", "weight_specs"]


_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,9})\.")


def check_layer_count(config: ModelConfig, names: Iterable[str], source: object = "") -> None:
    """Raise :class:`ModelFormatError` unless the tensor ``names`` hold exactly the layers
    ``0 .. num_hidden_layers - 1``. Cheap (one pass over the names) and meant to run before
    :func:`weight_specs`, whose size follows the claimed count, not the file."""
    present = {int(m.group(1)) for name in names if (m := _LAYER_NAME.match(name))}
    claimed = config.num_hidden_layers
    if present != set(range(claimed)):
        found = f"{len(present)} (indices {min(present)}..{max(present)})" if present else "none"
        where = f"{source}: " if source else ""
        raise ModelFormatError(
            f"{where}config.json claims {claimed} layers but the weights hold layers {found}"
        )


def weight_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of ``config`` must hold, by Hugging Face name, dense shape.

    Answers for every supported family (callers across the code import it from here), so a
    Gemma 3 config gets :func:`ondevice.models.gemma3.weight_specs`.
    """
    if config.is_gemma3:
        from .gemma3 import weight_specs as gemma3_specs  # a cycle at import time otherwise

        return gemma3_specs(config)
    c = config
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    specs = {"model.embed_tokens.weight": TensorSpec((c.vocab_size, c.hidden_size), "embedding")}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        specs[p + "input_layernorm.weight"] = TensorSpec((c.hidden_size,), "norm")
        for name, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            specs[p + f"self_attn.{name}.weight"] = TensorSpec((out, c.hidden_size), "linear")
            if c.qkv_bias:
                specs[p + f"self_attn.{name}.bias"] = TensorSpec((out,), "bias")
        specs[p + "self_attn.o_proj.weight"] = TensorSpec((c.hidden_size, nh * hd), "linear")
        if c.attention_bias:
            specs[p + "self_attn.o_proj.bias"] = TensorSpec((c.hidden_size,), "bias")
        specs[p + "post_attention_layernorm.weight"] = TensorSpec((c.hidden_size,), "norm")
        for name, shape in (
            ("gate_proj", (c.intermediate_size, c.hidden_size)),
            ("up_proj", (c.intermediate_size, c.hidden_size)),
            ("down_proj", (c.hidden_size, c.intermediate_size)),
        ):
            specs[p + f"mlp.{name}.weight"] = TensorSpec(shape, "linear")
            if c.mlp_bias:
                specs[p + f"mlp.{name}.bias"] = TensorSpec((shape[0],), "bias")
    specs["model.norm.weight"] = TensorSpec((c.hidden_size,), "norm")
    if c.draft_head_tokens:
        specs["lm_head.weight"] = TensorSpec((c.draft_head_tokens, c.hidden_size), "linear")
    elif not c.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((c.vocab_size, c.hidden_size), "linear")
    return specs


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """float32 ``[head_dim / 2]`` inverse frequencies, with llama3 or linear scaling applied."""
    d = config.head_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, blended, scaled)
    return inv.astype(np.float32)


@dataclass
class Layer:
    input_norm: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    post_norm: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any


@dataclass
class Params:
    """Backend-prepared weights (handles whose type only the backend knows)."""

    embed: Any
    layers: list[Layer]
    norm: Any
    lm_head: Any


class LlamaModel:
    """Decoder-only transformer with GQA, RMSNorm, rotate-half RoPE and a SwiGLU MLP."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.inv_freq = rope_inv_freq(config)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def load_params(self, tensors, loader) -> Params:
        """Build :class:`Params` through the backend's ``loader``.

        ``tensors.get(name)`` returns a dense array or a quantized tensor for a weight prefix
        (without ``.weight``); ``loader`` turns them into backend handles.
        """
        c = self.config

        def linear(prefix: str, bias: bool):
            return loader.linear(tensors.get(prefix), tensors.bias(prefix) if bias else None)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            layers.append(
                Layer(
                    input_norm=loader.norm(tensors.dense(p + "input_layernorm.weight")),
                    q_proj=linear(p + "self_attn.q_proj", c.qkv_bias),
                    k_proj=linear(p + "self_attn.k_proj", c.qkv_bias),
                    v_proj=linear(p + "self_attn.v_proj", c.qkv_bias),
                    o_proj=linear(p + "self_attn.o_proj", c.attention_bias),
                    post_norm=loader.norm(tensors.dense(p + "post_attention_layernorm.weight")),
                    gate_proj=linear(p + "mlp.gate_proj", c.mlp_bias),
                    up_proj=linear(p + "mlp.up_proj", c.mlp_bias),
                    down_proj=linear(p + "mlp.down_proj", c.mlp_bias),
                )
            )
        embed_w = tensors.get("model.embed_tokens")
        embed = loader.embedding(embed_w)
        if c.tie_word_embeddings and not c.draft_head_tokens:
            lm_head = loader.tied_lm_head(embed, embed_w)
        else:
            lm_head = linear("lm_head", False)
        return Params(embed, layers, loader.norm(tensors.dense("model.norm.weight")), lm_head)

    def forward(self, ops, params: Params, batch: BatchInput):
        """Logits ``[len(batch.logits_indices), vocab]`` for the rows the batch asks for."""
        c = self.config
        nh, nkv, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        h = ops.embedding(params.embed, batch.token_ids)  # [T, hidden]
        for i, layer in enumerate(params.layers):
            x = ops.rms_norm(h, layer.input_norm, eps)
            q = ops.rope(ops.linear(x, layer.q_proj), batch.positions, self.inv_freq, nh, hd)
            k = ops.rope(ops.linear(x, layer.k_proj), batch.positions, self.inv_freq, nkv, hd)
            v = ops.linear(x, layer.v_proj)  # q [T, nh*hd]; k, v [T, nkv*hd]
            ops.write_kv(i, k, v, batch.slot_mapping)
            a = ops.paged_attention(i, q, batch, nh, nkv, hd, self.scale)  # [T, nh*hd]
            h = ops.add(h, ops.linear(a, layer.o_proj))
            x = ops.rms_norm(h, layer.post_norm, eps)
            m = ops.silu_mul(ops.linear(x, layer.gate_proj), ops.linear(x, layer.up_proj))
            h = ops.add(h, ops.linear(m, layer.down_proj))  # [T, hidden]
        h = ops.take_rows(h, batch.logits_indices)  # only the rows that are sampled
        # [R, vocab] (a draft head: [R, draft_head_tokens], in draft_head.json's order)
        return ops.logits(ops.rms_norm(h, params.norm, eps), params.lm_head)
