"""Export a model directory as a stateful Core ML ML Program with the paged KV interface.

Output layout: ``export_coreml(src, "DIR/NAME.mlpackage")`` writes, in ``DIR``::

    NAME.mlpackage           the ML Program (macOS 15 / iOS 18 or newer)
    ondevice-manifest.json   names, shapes and dtypes of the inputs, outputs and states; the
                             KV geometry; eos / end-of-turn ids; the model config
    tokenizer.json           the source model's tokenizer (Hugging Face tokenizers format)
    chat_template.jinja      its chat template (when it has one)
    tokenizer_config.json    copied from the source when present (special tokens, template;
    generation_config.json   what swift-transformers' AutoTokenizer reads)

so one directory holds one exported model. Everything is written into a hidden temporary
sibling directory first and moved into place at the end; the manifest is moved last, so a
manifest next to a package means the export completed.

The program runs ``ondevice/models/llama.py`` itself, with :class:`MilOps` as its ops.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ...config import ModelConfig
from ...errors import OndeviceError
from ...modeldir import ModelDir
from ...models import model_for
from ..writer import ConversionError, OutputExistsError
from . import _ct
from .mil_ops import MilLoader, MilOps, SymbolicBatch

MANIFEST_NAME = "ondevice-manifest.json"
MANIFEST_FORMAT = "ondevice-coreml"
MANIFEST_VERSION = 1
QUANTIZE_CHOICES = ("f16", "int8", "int4")
# Weights share a scale per this many input channels in int8/int4 (per-block quantization).
QUANT_BLOCK = 32
INPUT_NAMES = ("input_ids", "positions", "slot_mapping", "block_table", "seq_len")
STATE_NAMES = ("key_cache", "value_cache")
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportOptions:
    """Validated export geometry and storage."""

    quantize: str
    max_context: int
    block_size: int
    num_blocks: int
    logits: str = "last"

    @property
    def max_blocks(self) -> int:
        return self.max_context // self.block_size

    @classmethod
    def check(cls, config: ModelConfig, quantize: str, max_context: int | None,
              block_size: int, num_blocks: int | None, logits: str = "last") -> ExportOptions:
        if quantize not in QUANTIZE_CHOICES:
            raise ConversionError(
                f"quantization {quantize!r} is not available for Core ML "
                f"(choose {', '.join(QUANTIZE_CHOICES)})"
            )
        if logits not in ("last", "all"):
            raise ConversionError(f"logits must be 'last' or 'all', got {logits!r}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ConversionError(f"block size must be a positive power of two, got {block_size}")
        if max_context is None:
            max_context = min(2048, config.context_length)
            max_context -= max_context % block_size
        if max_context <= 0:
            raise ConversionError(f"max context must be positive, got {max_context}")
        if max_context % block_size:
            raise ConversionError(
                f"max context {max_context} is not a multiple of the block size {block_size}"
            )
        if max_context > config.context_length:
            raise ConversionError(
                f"max context {max_context} exceeds the model's context length "
                f"{config.context_length}"
            )
        if num_blocks is None:
            num_blocks = max_context // block_size
        if num_blocks < max_context // block_size:
            raise ConversionError(
                f"{num_blocks} blocks of {block_size} tokens cannot hold the max context "
                f"{max_context} (need at least {max_context // block_size})"
            )
        if num_blocks * block_size > 1 << 24:
            raise ConversionError(f"{num_blocks} blocks of {block_size} tokens is too large a pool")
        return cls(quantize, max_context, block_size, num_blocks, logits)


def build_program(model: ModelDir, opts: ExportOptions, progress=None) -> Any:
    """The MIL program (pymil ``Program``) of ``model``: inputs, states and ``logits``."""
    ct = _ct.coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    c = model.config
    llama = model_for(c)(c)
    t = get_new_symbol()  # the number of new tokens: one symbol shared by the three inputs
    pool = (c.num_hidden_layers, opts.num_blocks * opts.block_size,
            c.num_key_value_heads * c.head_dim)
    specs = [
        mb.TensorSpec((t,), dtype=types.int32),
        mb.TensorSpec((t,), dtype=types.int32),
        mb.TensorSpec((t,), dtype=types.int32),
        mb.TensorSpec((opts.max_blocks,), dtype=types.int32),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.StateTensorSpec(pool, dtype=types.fp16),
        mb.StateTensorSpec(pool, dtype=types.fp16),
    ]
    tick = (lambda: progress.update(1)) if progress is not None else None

    # mb.program names the program's inputs after the parameters of this function.
    def main(input_ids, positions, slot_mapping, block_table, seq_len, key_cache, value_cache):
        params = llama.load_params(model, MilLoader(mb, on_tensor=tick))
        model.weights.release_pages()
        if opts.logits == "last":
            last = mb.sub(x=mb.shape(x=input_ids), y=np.int32(1))  # [1]: the last row
        else:
            last = None
        batch = SymbolicBatch(input_ids, positions, slot_mapping, block_table, seq_len, last)
        ops = MilOps(mb, types, key_state=key_cache, value_state=value_cache,
                     block_size=opts.block_size, max_context=opts.max_context, on_layer=tick)
        return llama.forward(ops, params, batch)

    prog = mb.program(input_specs=specs, opset_version=ct.target.iOS18)(main)
    flexible = ct.TensorType(shape=(ct.RangeDim(1, opts.max_context, default=1),),
                             dtype=np.int32)
    prog.functions["main"].set_input_types(tuple(
        ct.TensorType(name=name, shape=flexible.shape, dtype=np.int32)
        for name in ("input_ids", "positions", "slot_mapping")
    ))
    return prog


def to_mlmodel(prog: Any, quantize: str = "f16") -> Any:
    """Run coremltools' ML Program pipeline on ``prog`` (an in-memory, uncompiled MLModel),
    then quantize its weights when ``quantize`` is ``"int8"`` or ``"int4"``."""
    ct = _ct.coremltools()
    with _ct.quiet():
        mlmodel = ct.convert(
            prog, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS15,
            # The program is already float16 where it should be (and float32 where it must
            # be): no automatic casts.
            compute_precision=ct.precision.FLOAT32, skip_model_load=True,
        )
    return mlmodel if quantize == "f16" else quantize_mlmodel(mlmodel, quantize)


def quantize_mlmodel(mlmodel: Any, quantize: str) -> Any:
    """Symmetric per-block (``QUANT_BLOCK`` input channels) int8/int4 weights via
    ``coremltools.optimize``; consts of at most 2048 elements (norms) stay as they are."""
    ct = _ct.coremltools()
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype=quantize, granularity="per_block",
        block_size=QUANT_BLOCK,
    ))
    with _ct.quiet():
        return ct.optimize.coreml.linear_quantize_weights(mlmodel, config)


def manifest(model: ModelDir, opts: ExportOptions, package: Path, spec: Any) -> dict[str, Any]:
    """The manifest that apps and the policy module read (see ``converters/coreml``)."""
    c = model.config
    tok = model.tokenizer
    from ...tokenizer import END_OF_TURN_TOKENS

    end_of_turn = sorted(
        i for i in (tok.token_to_id(name) for name in END_OF_TURN_TOKENS) if i is not None
    )

    def feature(f) -> dict[str, Any]:
        which = f.type.WhichOneof("Type")
        arr = f.type.stateType.arrayType if which == "stateType" else f.type.multiArrayType
        dtype = {arr.INT32: "int32", arr.FLOAT16: "float16", arr.FLOAT32: "float32"}.get(
            arr.dataType, str(arr.dataType))
        shape: list[int | str] = list(arr.shape)
        ranges = arr.shapeRange.sizeRanges
        if ranges:
            shape = [
                d.lowerBound if d.lowerBound == d.upperBound
                else f"{d.lowerBound}..{d.upperBound}" for d in ranges
            ]
        return {"name": f.name, "shape": shape, "dtype": dtype}

    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    weight_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "package": package.name,
        "model_id": model.path.name,
        "source_path": str(model.path.resolve()),
        "architecture": c.model_type,
        "config": {
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "context_length": c.context_length,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": c.tie_word_embeddings,
        },
        "quantization": {"mode": opts.quantize,
                         "block_size": None if opts.quantize == "f16" else QUANT_BLOCK},
        "minimum_deployment_target": "macOS15/iOS18",
        "weight_bytes": weight_file.stat().st_size if weight_file.is_file() else 0,
        "kv_bytes_per_token": kv_per_token,
        "kv_dtype": "float16",
        "block_size": opts.block_size,
        "num_blocks": opts.num_blocks,
        "max_context": opts.max_context,
        "max_blocks_per_sequence": opts.max_blocks,
        "logits": opts.logits,
        "inputs": [feature(f) for f in spec.description.input],
        "outputs": [feature(f) for f in spec.description.output],
        "states": [feature(f) for f in spec.description.state],
        "kv_layout": "[layers, num_blocks * block_size, kv_heads * head_dim]; "
                     "slot = block_id * block_size + offset",
        "eos_token_ids": sorted(tok.eos_token_ids),
        "end_of_turn_ids": end_of_turn,
        "bos_token_id": tok.bos_token_id,
        "tokenizer": "tokenizer.json",
        "tokenizer_config": "tokenizer_config.json"
        if (model.path / "tokenizer_config.json").is_file() else None,
        "chat_template": "chat_template.jinja" if tok.chat_template else None,
    }


def _check_outputs(out: Path, force: bool, src: Path) -> None:
    if out.suffix != ".mlpackage":
        raise ConversionError(f"{out}: a Core ML package path must end in .mlpackage")
    side = out.parent / MANIFEST_NAME
    for path in (out, side):
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputExistsError(
                f"{path} already exists (pass force=True to replace it)"
            )
    real = out.resolve()
    s = src.resolve()
    if s == real or real in s.parents or s == out.parent.resolve():
        raise ConversionError(f"refusing to write {out} into the source model directory {src}")


def export_coreml(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    quantize: str = "f16",
    max_context: int | None = None,
    block_size: int = 16,
    num_blocks: int | None = None,
    logits: str = "last",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export the model directory ``src`` as ``out`` (``*.mlpackage``) plus its side files.

    Args:
        src: an ondevice / Hugging Face model directory of the Llama family, or a ``.gguf``
            file (converted once to float32 in the cache first).
        out: the package path; the manifest, tokenizer and chat template go next to it.
        quantize: ``"f16"`` weights, or ``"int8"`` / ``"int4"`` symmetric per-block (32 input
            channels) linear quantization through ``coremltools.optimize``.
        max_context: longest sequence (default: the model's context length, at most 2048);
            a multiple of ``block_size``. The block table input has
            ``max_context / block_size`` entries.
        block_size: tokens per KV block.
        num_blocks: blocks in the KV state (default: enough for one max-context sequence).
        logits: ``"last"`` returns ``[1, vocab]`` for the last new token, ``"all"``
            ``[T, vocab]``.
        force: replace an existing package / manifest.
        progress: show a progress bar on stderr.

    Raises:
        ConversionError: invalid options; UnsupportedModelError: an architecture or weights
        Core ML cannot take; OutputExistsError: ``out`` exists without ``force``.
    """
    src, out = Path(src), Path(out)
    _check_outputs(out, force, src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        # A GGUF file is imported once into a float32 model directory in the ondevice home
        # (Core ML quantizes on its own grid); the manifest names it as the source.
        from ...settings import home_dir
        from .. import convert

        st = src.stat()
        src_dir = home_dir() / "coreml-sources" / f"{src.stem}-{st.st_size:x}-{int(st.st_mtime):x}"
        if not (src_dir / "config.json").is_file():
            convert(src, src_dir, quantize="f32", force=True, progress=progress)
        src = src_dir
    return _export_dir(src, out, quantize, max_context, block_size, num_blocks, logits, force,
                       progress)


def _export_dir(src: Path, out: Path, quantize, max_context, block_size, num_blocks, logits,
                force: bool, progress: bool) -> Path:
    model = ModelDir(src)
    try:
        if model.config.draft_head_tokens:
            raise ConversionError(f"{src} is a draft model with a trimmed output head; "
                                  "Core ML exports take a full model")
        opts = ExportOptions.check(model.config, quantize, max_context, block_size, num_blocks,
                                   logits)
        return _export(model, out, opts, force, progress)
    finally:
        model.close()


def _export(model: ModelDir, out: Path, opts: ExportOptions, force: bool,
            progress: bool) -> Path:
    tok = model.tokenizer  # fail on a broken tokenizer before the long part
    from ...models.llama import weight_specs

    c = model.config
    n_tensors = len(weight_specs(c))
    steps = n_tensors + c.num_hidden_layers + 2 + (opts.quantize != "f16")
    bar = tqdm(total=steps, unit="step", desc=f"Core ML export ({opts.quantize})",
               file=sys.stderr, disable=not progress, leave=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.partial"
    os.mkdir(tmp)
    started = time.perf_counter()
    try:
        with bar:
            bar.set_postfix_str("building the program")
            prog = build_program(model, opts, progress=bar)
            bar.set_postfix_str("optimizing")
            mlmodel = to_mlmodel(prog, "f16")
            del prog
            bar.update(1)
            if opts.quantize != "f16":
                bar.set_postfix_str(f"quantizing to {opts.quantize}")
                mlmodel = quantize_mlmodel(mlmodel, opts.quantize)
                bar.update(1)
            bar.set_postfix_str("saving")
            mlmodel.short_description = (
                f"{model.path.name} ({opts.quantize}) with a paged KV state: "
                f"{opts.num_blocks} blocks of {opts.block_size} tokens"
            )
            mlmodel.user_defined_metadata["ondevice.manifest"] = MANIFEST_NAME
            spec = mlmodel.get_spec()
            package = tmp / out.name
            with _ct.quiet():
                mlmodel.save(str(package))
            bar.update(1)
            del mlmodel
        shutil.copyfile(model.path / "tokenizer.json", tmp / "tokenizer.json")
        # Swift's tokenizers (swift-transformers) also read these two from the same folder.
        for name in ("tokenizer_config.json", "generation_config.json"):
            if (model.path / name).is_file():
                shutil.copyfile(model.path / name, tmp / name)
        if tok.chat_template:
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        data = manifest(model, opts, package, spec)
        data["export_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Move the package, then the side files, then the manifest out of ``tmp``."""
    names = [out.name] + sorted(
        p.name for p in tmp.iterdir() if p.name not in (out.name, MANIFEST_NAME)
    ) + [MANIFEST_NAME]
    for name in names:
        dst = out.parent / name
        if dst.exists() or dst.is_symlink():
            if not force:
                raise OutputExistsError(f"{dst} appeared during the export; not replacing it")
            if dst.is_dir() and not dst.is_symlink():
                old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(dst, old)
                shutil.rmtree(old, ignore_errors=True)
            else:
                dst.unlink()
        os.replace(tmp / name, dst)
    shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(package: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest next to ``package``, checked to belong to it."""
    package = Path(package)
    path = package.parent / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OndeviceError(f"{path}: no manifest next to {package.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OndeviceError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise OndeviceError(f"{path}: not an ondevice Core ML manifest")
    if data.get("package") != package.name:
        raise OndeviceError(
            f"{path} describes {data.get('package')!r}, not {package.name!r}"
        )
    return data
