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
# Model types whose q/k/v projections always carry a bias, whatever ``attention_bias`` says.
QKV_BIAS_TYPES = ("qwen2",)


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
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Derived defaults, filled in so that every consumer sees concrete numbers.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ModelFormatError(
                    f"config.json: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._validate()

    def _validate(self) -> None:
        if self.model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"unsupported architecture {self.model_type!r} "
                f"(supported: {', '.join(LLAMA_FAMILY)})"
            )
        positive = (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFormatError(f"config.json: {name} must be a positive integer, got {value!r}")
            if value > 1 << 24:
                raise ModelFormatError(f"config.json: {name} = {value} is implausibly large")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelFormatError(f"config.json: {name} must be a positive number, got {value!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}")
        if self.quantization is not None:
            bits = self.quantization.get("bits")
            gs = self.quantization.get("group_size")
            if bits not in (2, 4, 8) or not isinstance(gs, int) or gs <= 0:
                raise UnsupportedModelError(
                    f"unsupported quantization {self.quantization!r} (bits 2, 4 or 8 with a group size)"
                )

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type in QKV_BIAS_TYPES

    @property
    def context_length(self) -> int:
        """Longest sequence the model is run on (a sliding window, if any, caps it)."""
        if self.sliding_window:
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
        if missing and model_type in LLAMA_FAMILY:
            raise ModelFormatError(f"config.json is missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} (supported: {', '.join(LLAMA_FAMILY)})"
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
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and v is not None}
        out.update(self.extra)
        return out
