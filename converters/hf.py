"""A Hugging Face (or mlx-lm) model directory as a conversion source.

The directory is opened and validated by :class:`ModelDir`; tensors are read memory-mapped
(one file or shards, F32/F16/BF16, or MLX-quantized, which is dequantized here so that it can
be stored again in any format, or copied packed as it is in ``keep`` mode). Tokenizer files
are copied as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, TokenizerError
from ..modeldir import ModelDir, QuantizedTensor
from ..models.llama import TensorSpec, weight_specs
from ..quant import dequantize
from .writer import Storage

# Side files copied verbatim when present (tokenizer.json is required).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
    "special_tokens_map.json",
)


class HFModel:
    """A validated Hugging Face checkpoint directory (see the module docstring).

    Validation is :class:`ModelDir`'s, the same the runtime applies when it loads a model.
    """

    source_format = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.resolve().name
        if not (self.path / "config.json").is_file():
            raise ModelFormatError(f"{self.path}: no config.json (not a model directory)")
        self.model = ModelDir(self.path)
        if not (self.path / "tokenizer.json").is_file():
            self.model.close()
            raise TokenizerError(f"{self.path}: tokenizer.json is missing")
        self.config = self.model.config
        self.config_dict = self.config.to_dict()
        self.specs: dict[str, TensorSpec] = weight_specs(self.config)

    def files(self) -> dict[str, bytes]:
        """The tokenizer-side files to copy, by name."""
        return {
            name: (self.path / name).read_bytes()
            for name in TOKENIZER_FILES if (self.path / name).is_file()
        }

    def storage(self, name: str) -> Storage:
        """``keep``: MLX-quantized tensors stay packed (scales and biases in their dtype,
        bfloat16 widened to float32); dense float16 stays float16, the rest float32."""
        prefix = name.removesuffix(".weight")
        w = self.model.get(prefix) if name.endswith(".weight") else None
        if isinstance(w, QuantizedTensor):
            dtype = self.model.weights.dtype(prefix + ".scales")
            if self.model.weights.dtype(prefix + ".biases") != dtype:
                dtype = "F32"
            return Storage(
                np.dtype(np.float16 if dtype == "F16" else np.float32), w.bits, w.group_size
            )
        return Storage(np.dtype(np.float16 if self.model.weights.dtype(name) == "F16"
                                else np.float32))

    def packed_chunks(
        self, name: str, max_elements: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A quantized tensor's packed rows as they are stored (scales/biases as float32)."""
        w = self.model.get(name.removesuffix(".weight"))
        if not isinstance(w, QuantizedTensor):
            raise ValueError(f"{name} is not stored quantized")
        step = max(1, max_elements // w.shape[-1])
        for r0 in range(0, w.shape[0], step):
            yield (np.asarray(w.weight[r0:r0 + step], dtype=np.uint32),
                   np.asarray(w.scales[r0:r0 + step], dtype=np.float32),
                   np.asarray(w.biases[r0:r0 + step], dtype=np.float32))
        del w
        self.model.weights.release_pages()

    def chunks(self, name: str, max_elements: int) -> Iterator[np.ndarray]:
        """Tensor ``name`` as float32 row blocks (dequantized if it was stored quantized)."""
        spec = self.specs[name]
        arr = self.model.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if isinstance(arr, QuantizedTensor):
            step = max(1, max_elements // spec.shape[-1])
            for r0 in range(0, spec.shape[0], step):
                yield dequantize(arr.weight[r0:r0 + step], arr.scales[r0:r0 + step],
                                 arr.biases[r0:r0 + step], arr.group_size, arr.bits)
        else:
            # A memory-mapped view (F32/F16) or, for BF16, a float32 copy of this one tensor.
            arr = self.model.weights.get(name)
            if arr.ndim == 1:
                yield np.asarray(arr, dtype=np.float32)
            else:
                step = max(1, max_elements // int(np.prod(arr.shape[1:])))
                for r0 in range(0, arr.shape[0], step):
                    yield np.asarray(arr[r0:r0 + step], dtype=np.float32)
        del arr
        # Pages read through the memory map stay counted in our RSS until the kernel wants them
        # back, which would make peak RSS the size of the whole checkpoint; drop them per tensor.
        self.model.weights.release_pages()

    def close(self) -> None:
        self.model.close()

