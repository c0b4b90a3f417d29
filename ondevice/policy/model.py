"""What a model needs: weight bytes at its quantization, KV bytes per token, FLOPs per token.

Built from a model directory (``config.json`` + safetensors), from a Core ML export's
``ondevice-manifest.json``, or from a known architecture for simulation (:func:`synthetic`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, PolicyConfigError

MANIFEST_NAME = "ondevice-manifest.json"

# Bits per weight as stored, scales included: MLX affine groups of 64 carry a float16 scale
# and bias (32 bits per 64 weights); Core ML int4/int8 per-block quantization the same.
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8": 8.5, "int8": 8.5,
                   "q4": 4.5, "int4": 4.5}

# Published architectures for simulation: SmolLM2-135M (its config.json), Llama 3.2 1B and
# Llama 3.1 8B (their Hugging Face config.json files).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "135m": dict(name="SmolLM2-135M", hidden_size=576, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                 intermediate_size=1536, vocab_size=49152, context_length=8192, tied=True),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192, vocab_size=128256, context_length=131072, tied=True),
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, context_length=131072, tied=False),
}


@dataclass(frozen=True)
class ModelRequirements:
    """Sizes that decide where a model can run.

    ``weight_bytes`` is the weights at ``quantization`` as stored; ``kv_bytes_per_token`` is
    at float16 (backends computing in float32 hold twice that); ``flops_per_token`` counts
    the matrix products (2 x parameters) without attention, which the estimate adds per
    context position. ``coreml_export`` is True when a Core ML export (manifest) exists.
    """

    name: str
    params: int
    quantization: str
    weight_bytes: int
    kv_bytes_per_token: int
    flops_per_token: float
    context_length: int
    num_hidden_layers: int
    attention_width: int  # num_attention_heads * head_dim, for attention FLOPs per position
    coreml_export: bool = False
    source: str = ""
    kv_pool_tokens: int | None = None  # a Core ML export's fixed KV state (blocks x block size)

    @property
    def dense_f32_bytes(self) -> int:
        """Weights dequantized to float32, as the NumPy reference backend holds them."""
        return self.params * 4

    def weight_bytes_at(self, quantization: str) -> int:
        return int(self.params * BITS_PER_WEIGHT[quantization] / 8)

    # -- builders --------------------------------------------------------------------------
    @classmethod
    def from_architecture(cls, arch: dict[str, Any], quantization: str, *, name: str = "",
                          weight_bytes: int | None = None, kv_bytes_per_token: int | None = None,
                          coreml_export: bool = False, source: str = "",
                          pool: int | None = None) -> ModelRequirements:
        """From Llama-family hyper-parameters (the keys of :data:`ARCHITECTURES`)."""
        if quantization not in BITS_PER_WEIGHT:
            raise PolicyConfigError(f"unknown quantization {quantization!r} "
                                    f"(known: {', '.join(BITS_PER_WEIGHT)})")
        h, n = int(arch["hidden_size"]), int(arch["num_hidden_layers"])
        heads, kv = int(arch["num_attention_heads"]), int(arch["num_key_value_heads"])
        hd = int(arch.get("head_dim") or h // heads)
        inter, vocab = int(arch["intermediate_size"]), int(arch["vocab_size"])
        per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
        embed = vocab * h
        params = embed + n * per_layer + h + (0 if arch.get("tied", False) else embed)
        # The tied embedding is read once per token as the LM head; the lookup itself is free.
        matmul_params = params - embed + vocab * h
        return cls(
            name=name or str(arch.get("name", "model")), params=params,
            quantization=quantization,
            weight_bytes=weight_bytes or int(params * BITS_PER_WEIGHT[quantization] / 8),
            kv_bytes_per_token=kv_bytes_per_token or 2 * n * kv * hd * 2,
            flops_per_token=2.0 * matmul_params, context_length=int(arch["context_length"]),
            num_hidden_layers=n, attention_width=heads * hd, coreml_export=coreml_export,
            source=source, kv_pool_tokens=pool,
        )

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> ModelRequirements:
        """From a model directory: ``config.json`` for the architecture, the safetensors
        files' sizes for the weight bytes. A manifest next to it marks a Core ML export."""
        p = Path(path)
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ModelFormatError(f"{p}: cannot read config.json ({err})") from None
        q = cfg.get("quantization")
        if isinstance(q, dict) and q.get("bits"):
            quant = {4: "q4", 8: "q8"}.get(int(q["bits"]), "q4")
        else:
            dtype = str(cfg.get("torch_dtype", "float32"))
            quant = {"float16": "f16", "bfloat16": "bf16"}.get(dtype, "f32")
            quant = {"f16": "f16", "q8": "q8", "q4": "q4"}.get(
                cfg.get("ondevice", {}).get("quantize", ""), quant)
        arch = dict(cfg, context_length=cfg.get("max_position_embeddings", 2048),
                    tied=cfg.get("tie_word_embeddings", False))
        files = sorted(p.glob("*.safetensors"))
        weight_bytes = sum(f.stat().st_size for f in files) or None
        manifest = _find_manifest(p)
        return cls.from_architecture(arch, quant, name=p.name, weight_bytes=weight_bytes,
                                     coreml_export=manifest is not None, source=str(p))

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> ModelRequirements:
        """From a Core ML export's ``ondevice-manifest.json``: the file, its directory, or the
        ``.mlpackage`` it sits next to. The KV state of an export is allocated whole
        (``num_blocks x block_size`` tokens), whatever the request."""
        p = Path(path)
        if p.suffix == ".mlpackage":
            p = p.parent / MANIFEST_NAME
        elif p.is_dir():
            p = p / MANIFEST_NAME
        try:
            m = json.loads(p.read_text())
            cfg = m["config"]
            quant = m["quantization"]
            if isinstance(quant, dict):  # {"mode": "int4", "block_size": 32}
                quant = quant["mode"]
            pool = (int(m["num_blocks"]) * int(m["block_size"])
                    if m.get("num_blocks") and m.get("block_size") else None)
            arch = dict(cfg, name=m.get("model_id", p.parent.name),
                        context_length=m.get("max_context") or cfg["context_length"],
                        tied=cfg.get("tie_word_embeddings", False))
            return cls.from_architecture(
                arch, quant, name=str(m.get("model_id", p.parent.name)),
                weight_bytes=int(m["weight_bytes"]) if m.get("weight_bytes") else None,
                kv_bytes_per_token=(int(m["kv_bytes_per_token"])
                                    if m.get("kv_bytes_per_token") else None),
                coreml_export=True, source=str(p), pool=pool)
        except OSError as err:
            raise PolicyConfigError(f"{p}: cannot read the Core ML manifest ({err})") from None
        except (ValueError, KeyError, TypeError) as err:
            raise PolicyConfigError(f"{p}: not a valid ondevice Core ML manifest "
                                    f"(bad or missing {err})") from None

    @classmethod
    def load(cls, spec: str | os.PathLike | None) -> ModelRequirements:
        """A model directory, a manifest (file or its directory), a synthetic name such as
        ``8b-q4`` / ``1b-f16`` / ``135m-q4``, or None for the default model."""
        if spec is None:
            from ..default_model import default_model_dir

            return cls.from_model_dir(default_model_dir(quiet=True))
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_file() and p.name == MANIFEST_NAME or p.suffix == ".mlpackage" \
                or p.is_dir() and (p / MANIFEST_NAME).is_file() and not (p / "config.json").is_file():
            return cls.from_manifest(p)
        if p.is_dir():
            return cls.from_model_dir(p)
        size, _, quant = text.lower().partition("-")
        if size in ARCHITECTURES:
            return synthetic(size, quant or "q4")
        raise PolicyConfigError(
            f"model {text!r} not found: give a model directory, an {MANIFEST_NAME}, or one of "
            f"{', '.join(f'{s}-q4' for s in ARCHITECTURES)} (also -f16, -q8, -f32)")

    def with_coreml_export(self, value: bool = True) -> ModelRequirements:
        return replace(self, coreml_export=value)


def synthetic(size: str, quantization: str = "q4", *, coreml_export: bool = False
              ) -> ModelRequirements:
    """Requirements of a published architecture (``135m``, ``1b``, ``8b``) at a quantization."""
    try:
        arch = ARCHITECTURES[size.lower()]
    except KeyError:
        raise PolicyConfigError(f"unknown model size {size!r} (known: {', '.join(ARCHITECTURES)})"
                                ) from None
    return ModelRequirements.from_architecture(
        arch, quantization, name=f"{arch['name']}-{quantization}", coreml_export=coreml_export,
        source="synthetic")


def _find_manifest(model_dir: Path) -> Path | None:
    # The exporter writes the manifest next to the .mlpackage; look in the model directory and
    # in a "coreml" folder inside it.
    for candidate in (model_dir / MANIFEST_NAME, model_dir / "coreml" / MANIFEST_NAME):
        if candidate.is_file():
            return candidate
    return None
