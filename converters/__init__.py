"""Model conversion: GGUF files and Hugging Face directories into ondevice model directories.

The output is the Hugging Face / mlx-lm layout the runtime loads (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``generation_config.json``), stored as the source stores it (``keep``: a GGUF's quantized
tensors become MLX affine groups of 32 with the same values, see :mod:`.ggml_blocks`), or as
float32, float16 or MLX affine 8/4-bit quantization. See :mod:`.writer` for the storage rules
and the provenance record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelFormatError
from .writer import (
    QUANTIZE_MODES,
    ConversionError,
    OutputExistsError,
    OutputFormat,
    check_output,
    write_model_dir,
)

__all__ = ["QUANTIZE_MODES", "ConversionError", "OutputExistsError", "convert"]


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    quantize: str = "keep",
    group_size: int = 64,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``src`` into a model directory at ``out`` and return ``out``.

    Args:
        src: a ``.gguf`` file (architectures ``llama`` and ``qwen2``) or a Hugging Face model
            directory (``config.json``, ``tokenizer.json``, safetensors weights in F32/F16/BF16,
            possibly sharded or MLX-quantized).
        out: the output directory; it must not exist unless ``force`` is given, in which case
            it is replaced once the new directory is complete.
        quantize: ``"keep"`` (the default: the source's own storage; a GGUF's Q4_0, Q4_1,
            Q5_0, Q5_1, Q8_0, Q4_K and Q5_K matrices are imported as MLX affine groups of 32
            with exactly the values ggml dequantizes them to, Q6_K as 8-bit groups of 32,
            float16 stays float16 and anything else becomes float32), ``"f32"``, ``"f16"``,
            ``"q8"`` or ``"q4"`` (MLX affine re-quantization of the embedding and linear
            weights; norms and biases stay float32).
        group_size: quantization group size for q8/q4 (32, 64 or 128).
        force: replace an existing ``out``.
        progress: show a progress bar on stderr.

    Raises:
        ModelFormatError: ``src`` is missing, truncated, corrupt or inconsistent.
        UnsupportedModelError: ``src`` uses an architecture, tensor type or tokenizer this
            runtime does not support.
        TokenizerError: the tokenizer data cannot be turned into ``tokenizer.json``.
        OutputExistsError: ``out`` exists and ``force`` is False.
        ConversionError: invalid options.
    """
    fmt = OutputFormat(quantize, group_size)
    src, out = Path(src), Path(out)
    # Fail before the (possibly long) read if the output is in the way.
    check_output(out, force, (src,))
    if src.is_dir():
        return _convert_hf(src, out, fmt, force, progress)
    if src.is_file():
        return _convert_gguf(src, out, fmt, force, progress)
    raise ModelFormatError(f"{src}: no such file or directory")


def _convert_gguf(src: Path, out: Path, fmt: OutputFormat, force: bool, progress: bool) -> Path:
    from .gguf import GGUFModel
    from .gguf_tokenizer import generation_config, tokenizer_config, tokenizer_json

    model = GGUFModel(src)
    try:
        vocab = model.vocab
        files = {
            "tokenizer.json": tokenizer_json(vocab),
            "tokenizer_config.json": _json(
                tokenizer_config(vocab, model.config.max_position_embeddings)
            ),
            "generation_config.json": _json(generation_config(vocab)),
        }
        return write_model_dir(
            model, out, fmt, files=files, force=force, progress=progress, source_paths=(src,)
        )
    finally:
        model.close()


def _convert_hf(src: Path, out: Path, fmt: OutputFormat, force: bool, progress: bool) -> Path:
    from .hf import HFModel

    model = HFModel(src)
    try:
        files = model.files()
        if "generation_config.json" not in files:
            gen = {
                k: model.config_dict[k] for k in ("bos_token_id", "eos_token_id")
                if model.config_dict.get(k) is not None
            }
            files["generation_config.json"] = _json(gen)
        return write_model_dir(
            model, out, fmt, files=files, force=force, progress=progress, source_paths=(src,)
        )
    finally:
        model.close()


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
