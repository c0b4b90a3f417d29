"""Opening a model directory (Hugging Face / mlx-lm layout) with every tensor checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError
from .models.llama import weight_specs
from .quant import dequantize, packed_shape
from .weights import WeightFiles

DRAFT_HEAD_FILE = "draft_head.json"
"""Which token each row of a draft model's trimmed head stands for: ``{"token_ids": [...]}``."""

# Tensors some checkpoints carry that the runtime recomputes or does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantizedTensor:
    """A matrix in MLX's affine layout; ``shape`` is the dense ``[out, in]`` shape."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)


class ModelDir:
    """A model directory whose config and tensors have been validated against each other.

    ``get(prefix)`` returns the weight ``prefix + ".weight"`` as a dense array (any float dtype,
    memory-mapped) or a :class:`QuantizedTensor`; ``dense(name)`` a float tensor as float32.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFormatError(f"{self.path}: not a model directory")
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.weights = WeightFiles(self.path)
        self._quantized: dict[str, tuple[int, int]] = {}
        self._validate()

    def quant_params(self, prefix: str) -> tuple[int, int]:
        q = self.config.quantization
        if not q:
            raise ModelFormatError(
                f"{self.path}: {prefix}.scales present but config.json has no quantization"
            )
        override = q.get(prefix)
        if isinstance(override, dict):
            return int(override.get("group_size", q["group_size"])), int(override.get("bits", q["bits"]))
        return int(q["group_size"]), int(q["bits"])

    def _expect(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in self.weights:
            raise ModelFormatError(f"{self.path}: missing tensor {name} (expected shape {list(shape)})")
        actual = self.weights.shape(name)
        if actual != tuple(shape):
            raise ModelFormatError(
                f"{self.path}: tensor {name} has shape {list(actual)}, expected {list(shape)}"
            )
        if self.weights.dtype(name) not in dtypes:
            raise ModelFormatError(
                f"{self.path}: tensor {name} has dtype {self.weights.dtype(name)}, "
                f"expected {' or '.join(dtypes)}"
            )

    def _validate(self) -> None:
        used = set()
        for name, spec in weight_specs(self.config).items():
            prefix = name.removesuffix(".weight")
            if spec.kind in ("embedding", "linear") and prefix + ".scales" in self.weights:
                gs, bits = self.quant_params(prefix)
                shapes = packed_shape(spec.shape, gs, bits)
                self._expect(name, shapes["weight"], ("U32",))
                for part in ("scales", "biases"):
                    self._expect(f"{prefix}.{part}", shapes[part], FLOAT_DTYPES)
                    used.add(f"{prefix}.{part}")
                self._quantized[prefix] = (gs, bits)
            else:
                self._expect(name, spec.shape, FLOAT_DTYPES)
            used.add(name)
        tied_head = ("lm_head.weight", "lm_head.scales", "lm_head.biases")
        extra = [
            n for n in self.weights
            if n not in used and not n.endswith(IGNORED_SUFFIXES)
            # A tied model may still carry its (identical) lm_head; it is not needed.
            and not (n in tied_head and self.config.tie_word_embeddings)
        ]
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise ModelFormatError(
                f"{self.path}: unexpected tensors {', '.join(sorted(extra)[:3])}{more} "
                f"for a {self.config.model_type} model"
            )

    @cached_property
    def draft_head_ids(self) -> np.ndarray | None:
        """The token id of each row of a draft model's trimmed head (``draft_head.json``,
        checked: as many unique ids in the vocabulary as ``draft_head_tokens``), or None for
        a model with a full head."""
        n = self.config.draft_head_tokens
        if not n:
            return None
        path = self.path / DRAFT_HEAD_FILE
        try:
            if path.stat().st_size > 16 * n + 1024:  # digits, comma and space per id
                raise ModelFormatError(f"{path}: too large for {n} token ids")
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: missing (config.json has draft_head_tokens)") \
                from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ModelFormatError(f"{path}: not valid JSON ({err})") from None
        ids = data.get("token_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or len(ids) != n or not all(
                type(i) is int and 0 <= i < self.config.vocab_size for i in ids):
            raise ModelFormatError(f"{path}: token_ids must be {n} token ids in "
                                   f"[0, {self.config.vocab_size})")
        out = np.asarray(ids, dtype=np.int64)
        if np.unique(out).size != n:
            raise ModelFormatError(f"{path}: token_ids repeats a token")
        return out

    # -- tensor access ---------------------------------------------------------------------
    def get(self, prefix: str) -> np.ndarray | QuantizedTensor:
        if prefix in self._quantized:
            gs, bits = self._quantized[prefix]
            return QuantizedTensor(
                self.weights.get(prefix + ".weight"), self.weights.get(prefix + ".scales"),
                self.weights.get(prefix + ".biases"), gs, bits,
            )
        return self.weights.get(prefix + ".weight")

    def dense(self, name: str) -> np.ndarray:
        return np.asarray(self.weights.get(name), dtype=np.float32)

    def bias(self, prefix: str) -> np.ndarray:
        return self.dense(prefix + ".bias")

    @property
    def is_quantized(self) -> bool:
        return bool(self._quantized)

    @cached_property
    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)

    @property
    def weight_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.weights.files)

    def close(self) -> None:
        self.weights.close()
