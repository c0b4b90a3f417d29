"""A Hugging Face (or mlx-lm) model directory as a conversion source.

``config.json`` goes through :meth:`ModelConfig.from_dict`; tensors are read memory-mapped
through :class:`WeightFiles` (one file or shards, F32/F16/BF16, or MLX-quantized, which is
dequantized here so that it can be stored again in any format). Tokenizer files are copied as
they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError, TokenizerError
from ..models.llama import TensorSpec, weight_specs
from ..quant import dequantize
from ..weights import WeightFiles

# Side files copied verbatim when present (tokenizer.json is required).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
    "special_tokens_map.json",
)
# Buffers some checkpoints carry that the runtime recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_DTYPES = ("F32", "F16", "BF16")


class HFModel:
    """A validated Hugging Face checkpoint directory (see the module docstring)."""

    source_format = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.resolve().name
        config_path = self.path / "config.json"
        try:
            self.config_dict = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{self.path}: no config.json (not a model directory)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{config_path}: not valid JSON ({err})") from None
        self.config = ModelConfig.from_dict(self.config_dict)
        if not (self.path / "tokenizer.json").is_file():
            raise TokenizerError(f"{self.path}: tokenizer.json is missing")
        self.specs: dict[str, TensorSpec] = weight_specs(self.config)
        self.weights = WeightFiles(self.path)
        try:
            self._quantized: dict[str, tuple[int, int]] = {}
            self._validate()
        except Exception:
            self.weights.close()
            raise

    def files(self) -> dict[str, bytes]:
        """The tokenizer-side files to copy, by name."""
        return {
            name: (self.path / name).read_bytes()
            for name in TOKENIZER_FILES if (self.path / name).is_file()
        }

    def _quant_params(self, prefix: str) -> tuple[int, int]:
        q = self.config.quantization
        if not q:
            raise ModelFormatError(
                f"{self.path}: tensor {prefix}.scales is present but config.json has no "
                "quantization"
            )
        # mlx-lm may override the parameters per layer.
        override = q.get(prefix)
        if isinstance(override, dict):
            return int(override.get("group_size", q["group_size"])), int(override.get("bits", q["bits"]))
        return int(q["group_size"]), int(q["bits"])

    def _check(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in self.weights:
            raise ModelFormatError(
                f"{self.path}: missing tensor {name} (expected shape {list(shape)})"
            )
        actual = self.weights.shape(name)
        if actual != tuple(shape):
            raise ModelFormatError(
                f"{self.path}: tensor {name} has shape {list(actual)}, expected {list(shape)}"
            )
        if self.weights.dtype(name) not in dtypes:
            raise ModelFormatError(
                f"{self.path}: tensor {name} has dtype {self.weights.dtype(name)}, expected "
                f"{' or '.join(dtypes)}"
            )

    def _validate(self) -> None:
        from ..quant import packed_shape

        used = set()
        for name, spec in self.specs.items():
            prefix = name.removesuffix(".weight")
            if spec.kind in ("embedding", "linear") and prefix + ".scales" in self.weights:
                gs, bits = self._quant_params(prefix)
                try:
                    shapes = packed_shape(spec.shape, gs, bits)
                except Exception as err:
                    raise ModelFormatError(f"{self.path}: tensor {name}: {err}") from None
                self._check(name, shapes["weight"], ("U32",))
                for part in ("scales", "biases"):
                    self._check(f"{prefix}.{part}", shapes[part], FLOAT_DTYPES)
                    used.add(f"{prefix}.{part}")
                self._quantized[name] = (gs, bits)
            else:
                self._check(name, spec.shape, FLOAT_DTYPES)
            used.add(name)
        tied_head = ("lm_head.weight", "lm_head.scales", "lm_head.biases")
        extra = sorted(
            n for n in self.weights
            if n not in used and not n.endswith(IGNORED_SUFFIXES)
            # A tied model may still carry its (identical) lm_head; it is not needed.
            and not (self.config.tie_word_embeddings and n in tied_head)
        )
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise ModelFormatError(
                f"{self.path}: unexpected tensors {', '.join(extra[:3])}{more} for a "
                f"{self.config.model_type} model"
            )

    def chunks(self, name: str, max_elements: int) -> Iterator[np.ndarray]:
        """Tensor ``name`` as float32 row blocks (dequantized if it was stored quantized)."""
        spec = self.specs[name]
        if name in self._quantized:
            gs, bits = self._quantized[name]
            prefix = name.removesuffix(".weight")
            w = self.weights.get(name)
            s, b = self.weights.get(prefix + ".scales"), self.weights.get(prefix + ".biases")
            step = max(1, max_elements // spec.shape[-1])
            for r0 in range(0, spec.shape[0], step):
                yield dequantize(w[r0:r0 + step], s[r0:r0 + step], b[r0:r0 + step], gs, bits)
            del w, s, b
            self._release(name, prefix + ".scales", prefix + ".biases")
            return
        # A memory-mapped view (F32/F16) or, for BF16, a float32 copy of this one tensor.
        arr = self.weights.get(name)
        if arr.ndim == 1:
            yield np.asarray(arr, dtype=np.float32)
        else:
            step = max(1, max_elements // int(np.prod(arr.shape[1:])))
            for r0 in range(0, arr.shape[0], step):
                yield np.asarray(arr[r0:r0 + step], dtype=np.float32)
        del arr
        self._release(name)

    def _release(self, *names: str) -> None:
        # Pages read through the memory map stay counted in our RSS until the kernel wants them
        # back, which would make peak RSS the size of the whole checkpoint; drop them per tensor.
        for f in self.weights.files:
            if any(n in f for n in names):
                f.release_pages()

    def close(self) -> None:
        self.weights.close()

