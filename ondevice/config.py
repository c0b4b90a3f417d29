"""Model configuration: the subset of a Hugging Face ``config.json`` this runtime uses."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError, UnsupportedModelError

# model_type values served by the one Llama-family definition (ondevice/models/llama.py).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm")
# model_type values served by the Gemma 3 definition (ondevice/models/gemma3.py).
GEMMA3_FAMILY = ("gemma3_text",)
SUPPORTED_TYPES = LLAMA_FAMILY + GEMMA3_FAMILY
# Attention kinds of Gemma 3's ``layer_types``: windowed (local) and full (global) layers.
LAYER_TYPES = ("sliding_attention", "full_attention")
# Gemma 3's default layout when a config has no layer_types: five local layers per global one.
GEMMA3_PATTERN = 6
# Model types whose q/k/v projections always carry a bias, whatever ``attention_bias`` says.
QKV_BIAS_TYPES = ("qwen2",)


# A layer count is checked against this before anything per layer is built: the deepest
# published checkpoints have ~130 layers, and a claimed 2**24 would otherwise build millions of
# tensor specs before a single tensor is compared with the file.
MAX_LAYERS = 1024
# Every other size (width, vocabulary, context, heads): far above any real model, far below
# what would overflow the products computed from them.
MAX_SIZE = 1 << 24
ROPE_TYPES = ("llama3", "linear", "default")
# Bit widths ondevice.quant packs (its SUPPORTED_BITS; GGUF imports keep Q5_0/Q6_K as 5/6 bits).
QUANT_BITS = (2, 3, 4, 5, 6, 8)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_int(value: object) -> bool:
    # JSON true/false are Python bools, which are ints: a config saying `true` is wrong.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(name: str, value: object) -> None:
    if not _is_int(value) or value <= 0:
        raise ModelFormatError(f"config.json: {name} must be a positive integer, got {value!r}")
    limit = MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE
    if value > limit:
        raise ModelFormatError(
            f"config.json: {name} = {value} is implausibly large (at most {limit})"
        )


def _check_positive_number(name: str, value: object) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ModelFormatError(f"config.json: {name} must be a positive number, got {value!r}")
    return float(value)


def _check_rope_scaling(scaling: object) -> None:
    if not isinstance(scaling, dict):
        raise ModelFormatError(
            f"config.json: rope_scaling must be an object or null, got {scaling!r:.80}"
        )
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r:.80}")
    keys = {"linear": ("factor",), "llama3": LLAMA3_KEYS}.get(kind, ())
    for key in keys:
        if key not in scaling:
            raise ModelFormatError(f"config.json: {kind} rope_scaling has no {key!r}")
        _check_positive_number(f"rope_scaling.{key}", scaling[key])
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ModelFormatError(
            "config.json: llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
            f"{scaling['high_freq_factor']!r} and {scaling['low_freq_factor']!r}"
        )


def _check_quant_params(where: str, params: dict[str, Any], inherited: bool = False) -> None:
    bits, gs = params.get("bits"), params.get("group_size")
    if inherited and bits is None and gs is None:
        return
    if (bits is not None or not inherited) and (not _is_int(bits) or bits not in QUANT_BITS):
        raise UnsupportedModelError(
            f"unsupported quantization {where}bits {bits!r:.40} "
            f"({', '.join(map(str, QUANT_BITS))})"
        )
    if (gs is not None or not inherited) and (not _is_int(gs) or not 0 < gs <= MAX_SIZE):
        raise UnsupportedModelError(
            f"unsupported quantization {where}group_size {gs!r:.40} (a positive integer)"
        )


def _check_quantization(quant: object) -> None:
    if not isinstance(quant, dict):
        raise ModelFormatError(
            f"config.json: quantization must be an object such as "
            f'{{"group_size": 64, "bits": 4}}, got {quant!r:.80}'
        )
    _check_quant_params("", quant)
    # mlx-lm's per-layer overrides: {"model.layers.0.mlp.down_proj": {"bits": 8, ...}}.
    for name, override in quant.items():
        if isinstance(override, dict):
            _check_quant_params(f"of {name[:80]}: ", override, inherited=True)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. Built with :meth:`from_dict`, which ignores unknown keys."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    quantization: dict[str, Any] | None = None
    # Gemma 3 only: the attention kind of every layer, the query scale's divisor, the local
    # layers' RoPE base (older configs) or per-kind RoPE settings (newer ones), logit soft-cap.
    layer_types: list[str] | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_base_freq: float | None = None
    rope_parameters: dict[str, Any] | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    # A draft model's trimmed output head (``ondevice convert --draft-head``): ``lm_head``
    # holds the rows of only this many tokens, listed in ``draft_head.json``; the embedding
    # covers the whole vocabulary, so the draft reads every token of the context.
    draft_head_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Types and ranges first: the derived defaults below do arithmetic on these values.
        self._validate_sizes()
        # Derived defaults, filled in so that every consumer sees concrete numbers.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelFormatError(
                    f"config.json: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._validate()

    def _validate_sizes(self) -> None:
        if self.model_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.model_type!r} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        required = (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size", "max_position_embeddings",
        )
        for name in (*required, "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None or name in required:
                _check_size(name, value)

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            _check_positive_number(name, getattr(self, name))
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ModelFormatError(f"config.json: {name} must be true or false, got {value!r}")
        if self.sliding_window is not None:
            _check_size("sliding_window", self.sliding_window)
        if self.draft_head_tokens is not None:
            _check_size("draft_head_tokens", self.draft_head_tokens)
            if self.draft_head_tokens > self.vocab_size:
                raise ModelFormatError(
                    f"config.json: draft_head_tokens {self.draft_head_tokens} is more than "
                    f"vocab_size {self.vocab_size}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
                raise ModelFormatError(
                    f"config.json: {name} must be a token id or a list of them, got {value!r}"
                )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.is_gemma3:
            self._validate_gemma3()
        if self.quantization is not None:
            _check_quantization(self.quantization)

    def _validate_gemma3(self) -> None:
        window = self.sliding_window
        if window is None:
            raise ModelFormatError("config.json: a gemma3_text model needs sliding_window")
        if window > self.max_position_embeddings:
            raise ModelFormatError(
                f"config.json: sliding_window {window} is larger than the context "
                f"({self.max_position_embeddings})"
            )
        n = self.num_hidden_layers
        types = self.layer_types
        if types is None:  # older configs: a pattern (every Nth layer global)
            pattern = self.extra.get("sliding_window_pattern",
                                     self.extra.get("_sliding_window_pattern", GEMMA3_PATTERN))
            if not _is_int(pattern) or pattern <= 0:
                raise ModelFormatError(
                    f"config.json: sliding_window_pattern must be a positive integer, got "
                    f"{pattern!r:.40}"
                )
            types = [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(n)]
            object.__setattr__(self, "layer_types", types)
        if not isinstance(types, list) or len(types) != n:
            got = len(types) if isinstance(types, list) else repr(types)[:40]
            raise ModelFormatError(
                f"config.json: layer_types must list one attention type per layer ({n}), got {got}"
            )
        for kind in types:
            if kind not in LAYER_TYPES:
                raise ModelFormatError(
                    f"config.json: unknown layer type {kind!r:.40} in layer_types "
                    f"(known: {', '.join(LAYER_TYPES)})"
                )
        for name in ("query_pre_attn_scalar", "rope_local_base_freq", "final_logit_softcapping"):
            if getattr(self, name) is not None:
                _check_positive_number(name, getattr(self, name))
        if self.extra.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError("attention logit soft-capping (Gemma 2) is not supported")
        params = self.rope_parameters
        if params is not None:
            if not isinstance(params, dict) or not all(
                    isinstance(params.get(k), dict) for k in set(types)):
                raise ModelFormatError(
                    "config.json: rope_parameters must hold an object for each layer type, got "
                    f"{params!r:.80}"
                )
            for kind in set(types):
                p = params[kind]
                _check_positive_number(f"rope_parameters.{kind}.rope_theta",
                                       p.get("rope_theta", self.rope_theta))
                if p.get("rope_type", "default") != "default":
                    _check_rope_scaling(p)

    @property
    def is_gemma3(self) -> bool:
        return self.model_type in GEMMA3_FAMILY

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type in QKV_BIAS_TYPES

    @property
    def context_length(self) -> int:
        """Longest sequence the model is run on. A Llama-family sliding window caps it (those
        models are run without windowed attention); Gemma 3's local layers do window."""
        if self.sliding_window and not self.is_gemma3:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ModelFormatError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type is None:
            raise ModelFormatError("config.json has no model_type")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            and f.name not in data
        ]
        if missing and model_type in SUPPORTED_TYPES:
            raise ModelFormatError(f"config.json is missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        if model_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        try:
            return cls(**kwargs, extra={k: v for k, v in data.items() if k not in names})
        except TypeError as err:  # wrong value types in the JSON
            raise ModelFormatError(f"config.json: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{path}: not valid JSON ({err})") from None
        except RecursionError:  # json's C decoder recurses once per nesting level
            raise ModelFormatError(f"{path}: JSON nested too deeply") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and v is not None}
        out.update(self.extra)
        return out
