"""Write an ondevice model directory (the Hugging Face / mlx-lm layout) from any source.

A source (GGUF or Hugging Face directory) exposes a validated :class:`ModelConfig`, the side
files to write (tokenizer and friends) and ``chunks(name, max_elements)``, which yields one
tensor as float32 row blocks in Hugging Face layout. The writer converts block by block into
the output dtype or MLX's affine quantization and streams each finished tensor through
:class:`SafetensorsWriter`, so memory holds one output tensor plus one block at a time.

The ``keep`` mode stores every tensor the way the source does (``source.storage(name)``):
quantized tensors stay packed in MLX's affine layout (a GGUF's blocks re-expressed without a
second quantization, an MLX checkpoint's as they are), streamed by ``packed_chunks``; dense
ones keep float16 or become float32. Tensors may then differ in bits, group size and scale
dtype: ``config.json``'s ``quantization`` holds the most common layout and one override per
tensor that differs, keyed by module path as in mlx-lm
(``{"group_size": 32, "bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 32,
"bits": 6}}``).

Everything is written into a temporary sibling directory that is renamed into place at the
end, so ``out`` is either absent, the previous content (until ``force`` replaces it), or
complete.

Provenance is recorded in ``config.json`` under the key ``"ondevice"``
(``{"source": <file or directory name>, "source_format": "gguf" | "hf", "quantize": <mode>}``)
and in the safetensors ``__metadata__`` (``ondevice_source``, ``ondevice_quantize``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ModelFormatError, OndeviceError, UnsupportedModelError
from ..models.llama import TensorSpec
from ..quant import packed_shape
from ..quant import quantize as affine_quantize

# "keep": the source's own storage (a GGUF's quantization imported without re-quantizing).
QUANTIZE_MODES = ("keep", "f32", "f16", "q8", "q4")
GROUP_SIZES = (32, 64, 128)  # the group sizes MLX's quantized kernels implement
# Rows are converted in blocks of about this many elements (4 MiB of float32): small enough
# that dequantization temporaries stay far below one big tensor, large enough to stay fast.
BLOCK_ELEMENTS = 1 << 20
F16_MAX = float(np.finfo(np.float16).max)


class ConversionError(OndeviceError, ValueError):
    """The conversion was asked for with options that cannot work."""


class OutputExistsError(OndeviceError, FileExistsError):
    """The output path exists and ``force`` was not given."""


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored: dense in ``dtype``, or (``bits`` set) MLX affine groups of
    ``group_size`` with scales and biases in ``dtype``."""

    dtype: np.dtype
    bits: int | None = None
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class OutputFormat:
    """The requested storage: ``quantize`` mode, its bit width (None = dense) and group size."""

    quantize: str
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ConversionError(
                f"unknown quantization {self.quantize!r} (choose {', '.join(QUANTIZE_MODES)})"
            )
        if self.group_size not in GROUP_SIZES:
            raise ConversionError(
                f"group size {self.group_size} is not supported (choose 32, 64 or 128)"
            )

    @property
    def keep(self) -> bool:
        return self.quantize == "keep"

    @property
    def bits(self) -> int | None:
        return {"q8": 8, "q4": 4}.get(self.quantize)

    @property
    def dense_dtype(self) -> np.dtype:
        """dtype of everything not quantized: float16 in f16 mode, else float32 (in q8/q4 the
        norms and biases are tiny and precision-sensitive, so they keep full precision)."""
        return np.dtype(np.float16 if self.quantize == "f16" else np.float32)

    def quantizes(self, spec: TensorSpec) -> bool:
        """Whether ``spec`` is re-quantized (q8/q4: embedding/linear with whole groups)."""
        return (
            self.bits is not None and spec.kind in ("embedding", "linear")
            and spec.shape[-1] % self.group_size == 0
        )

    def storage(self, source: ModelSource, name: str, spec: TensorSpec) -> Storage:
        """How tensor ``name`` of ``source`` is written in this format."""
        if self.keep:
            return source.storage(name)
        if self.quantizes(spec):
            return Storage(np.dtype(np.float16), self.bits, self.group_size)
        return Storage(self.dense_dtype)


class ModelSource(Protocol):
    """What :func:`write_model_dir` needs from a checkpoint reader."""

    name: str
    source_format: str
    config: ModelConfig
    config_dict: dict[str, Any]
    specs: Mapping[str, TensorSpec]

    def chunks(self, name: str, max_elements: int) -> Iterator[np.ndarray]:
        """Tensor ``name`` as float32 row blocks in Hugging Face layout."""
        ...

    def storage(self, name: str) -> Storage:
        """The storage that keeps tensor ``name``'s values as the source has them (``keep``)."""
        ...

    def packed_chunks(
        self, name: str, max_elements: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For a tensor whose :meth:`storage` is quantized: row blocks of (packed uint32
        weight, float32 scales, float32 biases) in Hugging Face layout."""
        ...


def plan_storage(source: ModelSource, fmt: OutputFormat) -> dict[str, Storage]:
    """The storage of every tensor of ``source`` in ``fmt``, in ``weight_specs`` order."""
    plan = {}
    for name, spec in source.specs.items():
        st = fmt.storage(source, name, spec)
        if st.quantized:
            if spec.kind not in ("embedding", "linear"):
                raise ConversionError(f"{source.name}: {name} ({spec.kind}) cannot be quantized")
            packed_shape(spec.shape, st.group_size, st.bits)  # raises on impossible layouts
        plan[name] = st
    return plan


def tensor_plan(
    specs: Mapping[str, TensorSpec], storage: Mapping[str, Storage]
) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every stored tensor, in ``weight_specs`` order."""
    plan = []
    for name, spec in specs.items():
        st = storage[name]
        if st.quantized:
            prefix = name.removesuffix(".weight")
            shapes = packed_shape(spec.shape, st.group_size, st.bits)
            plan.append((name, np.dtype(np.uint32), shapes["weight"]))
            plan.append((prefix + ".scales", np.dtype(st.dtype), shapes["scales"]))
            plan.append((prefix + ".biases", np.dtype(st.dtype), shapes["biases"]))
        else:
            plan.append((name, np.dtype(st.dtype), spec.shape))
    return plan


def quantization_config(storage: Mapping[str, Storage]) -> dict[str, Any] | None:
    """``config["quantization"]``: the most common (group size, bits) of the quantized
    tensors, and an mlx-lm per-module override for each tensor stored otherwise."""
    layouts = {
        name.removesuffix(".weight"): (st.group_size, st.bits)
        for name, st in storage.items() if st.quantized
    }
    if not layouts:
        return None
    (gs, bits), _ = Counter(layouts.values()).most_common(1)[0]
    quant: dict[str, Any] = {"group_size": gs, "bits": bits}
    for prefix, (g, b) in layouts.items():
        if (g, b) != (gs, bits):
            quant[prefix] = {"group_size": g, "bits": b}
    return quant


def output_config(
    source: ModelSource, fmt: OutputFormat, storage: Mapping[str, Storage]
) -> dict[str, Any]:
    """``config.json`` for the output: the source's config, re-stamped for the new storage."""
    dropped = ("quantization", "quantization_config")  # the source's storage, not ours
    cfg = {k: v for k, v in source.config_dict.items() if k not in dropped}
    # Fill derived defaults (head_dim, num_key_value_heads, ...) so readers need not know them.
    for key, value in source.config.to_dict().items():
        if key not in dropped:
            cfg.setdefault(key, value)
    dense = {np.dtype(st.dtype) for st in storage.values() if not st.quantized}
    cfg["torch_dtype"] = "float16" if dense == {np.dtype(np.float16)} else "float32"
    quant = quantization_config(storage)
    if quant is not None:
        cfg["quantization"] = quant
    cfg["ondevice"] = {
        "source": source.name, "source_format": source.source_format, "quantize": fmt.quantize,
    }
    return cfg


def check_output(out: Path, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an existing ``out`` without ``force``, and never replace a source with it."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists (pass force=True to replace it)")
    real = out.resolve()
    for src in sources:
        s = src.resolve()
        if s == real or real in s.parents:
            raise ConversionError(f"refusing to replace {out}: it holds the source {src}")


def write_model_dir(
    source: ModelSource, out: str | Path, fmt: OutputFormat, *,
    files: Mapping[str, str | bytes], force: bool = False, progress: bool = True,
    source_paths: tuple[Path, ...] = (),
) -> Path:
    """Convert every tensor of ``source`` into a new model directory at ``out``.

    ``files`` maps extra file names (tokenizer.json, ...) to their content. Returns ``out``.
    """
    from ..weights import SafetensorsWriter

    out = Path(out)
    check_output(out, force, source_paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so the final rename is atomic; os.mkdir (not
    # mkdtemp, which makes it private) so that the result gets the usual umask permissions.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    os.mkdir(tmp)
    try:
        for fname, content in files.items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                (tmp / fname).write_text(content, encoding="utf-8")
        storage = plan_storage(source, fmt)
        (tmp / "config.json").write_text(
            json.dumps(output_config(source, fmt, storage), indent=2, ensure_ascii=False)
            + "\n", encoding="utf-8",
        )
        metadata = {
            "format": "mlx", "ondevice_source": source.name, "ondevice_quantize": fmt.quantize,
        }
        writer = SafetensorsWriter(
            tmp / "model.safetensors", tensor_plan(source.specs, storage), metadata
        )
        try:
            bar = tqdm(
                total=len(source.specs), unit="tensor", desc=f"converting to {fmt.quantize}",
                file=sys.stderr, disable=not progress, leave=False,
            )
            with bar:
                for name, spec in source.specs.items():
                    stored = convert_tensor(source, name, spec, storage[name], fmt)
                    for stored_name, array in stored:
                        writer.write(stored_name, array)
                        del array
                    bar.update(1)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        _install(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_tensor(
    source: ModelSource, name: str, spec: TensorSpec, storage: Storage, fmt: OutputFormat
) -> Iterator[tuple[str, np.ndarray]]:
    """The stored tensor(s) for ``name``: one dense array, or weight/scales/biases."""
    if storage.quantized:
        shapes = packed_shape(spec.shape, storage.group_size, storage.bits)
        outs = {
            "weight": np.empty(shapes["weight"], np.uint32),
            "scales": np.empty(shapes["scales"], storage.dtype),
            "biases": np.empty(shapes["biases"], storage.dtype),
        }
        if fmt.keep:
            _copy_packed(source, name, outs)
        else:
            _quantize_rows(source, name, spec, storage, outs)
        prefix = name.removesuffix(".weight")
        yield name, outs.pop("weight")
        yield prefix + ".scales", outs.pop("scales")
        yield prefix + ".biases", outs.pop("biases")
    else:
        dense = np.empty(spec.shape, storage.dtype)
        r = 0
        for block, n in _float_rows(source, name, spec):
            if dense.dtype == np.float16 and np.abs(block).max(initial=0) > F16_MAX:
                raise UnsupportedModelError(
                    f"{source.name}: tensor {name} has values beyond float16 range (use f32)"
                )
            dense[r:r + n] = block
            r += n
        yield name, dense


def _float_rows(
    source: ModelSource, name: str, spec: TensorSpec
) -> Iterator[tuple[np.ndarray, int]]:
    """``source.chunks(name)`` checked block by block: float32, finite, the right shape and
    row count. Yields (block, rows in it)."""
    rows, r = spec.shape[0], 0
    for block in source.chunks(name, BLOCK_ELEMENTS):
        n = block.shape[0] if block.ndim else 0
        if block.dtype != np.float32 or block.shape[1:] != spec.shape[1:] or r + n > rows:
            raise ModelFormatError(
                f"{source.name}: tensor {name} came out as {block.dtype} {list(block.shape)} "
                f"at row {r}, expected float32 rows of {list(spec.shape)}"
            )
        if not np.isfinite(block).all():
            raise ModelFormatError(f"{source.name}: tensor {name} contains NaN or infinity")
        yield block, n
        r += n
        del block
    if r != rows:
        raise ModelFormatError(f"{source.name}: tensor {name} yielded {r} of {rows} rows")


def _quantize_rows(
    source: ModelSource, name: str, spec: TensorSpec, storage: Storage,
    outs: dict[str, np.ndarray],
) -> None:
    """Fill ``outs`` by quantizing the source's float rows (q8/q4)."""
    r = 0
    for block, n in _float_rows(source, name, spec):
        w, s, b = affine_quantize(block, storage.group_size, storage.bits, storage.dtype)
        if not (np.isfinite(s).all() and np.isfinite(b).all()):
            raise UnsupportedModelError(
                f"{source.name}: tensor {name} has values beyond float16 range; its "
                "quantization scales overflow (use f32)"
            )
        outs["weight"][r:r + n], outs["scales"][r:r + n], outs["biases"][r:r + n] = w, s, b
        r += n


def _copy_packed(source: ModelSource, name: str, outs: dict[str, np.ndarray]) -> None:
    """Fill ``outs`` with the source's own packed rows (``keep``), checking that they are
    finite and that the storage dtype of scales and biases holds them exactly."""
    rows, r = outs["weight"].shape[0], 0
    for w, s, b in source.packed_chunks(name, BLOCK_ELEMENTS):
        n = w.shape[0]
        if (w.dtype != np.uint32 or w.shape[1:] != outs["weight"].shape[1:]
                or s.shape != (n, *outs["scales"].shape[1:]) or s.shape != b.shape
                or r + n > rows):
            raise ModelFormatError(
                f"{source.name}: packed tensor {name} came out as {w.dtype} {list(w.shape)} "
                f"with scales {list(s.shape)} at row {r}, expected rows of "
                f"{list(outs['weight'].shape)}"
            )
        if not (np.isfinite(s).all() and np.isfinite(b).all()):
            raise ModelFormatError(
                f"{source.name}: tensor {name} has NaN or infinite scales or biases"
            )
        dt = outs["scales"].dtype
        with np.errstate(over="ignore"):
            s_out, b_out = s.astype(dt), b.astype(dt)
        if not (np.array_equal(s_out.astype(np.float32), s)
                and np.array_equal(b_out.astype(np.float32), b)):
            # The source chose the dtype from these very values; reaching this is a bug.
            raise ConversionError(
                f"{source.name}: tensor {name}'s scales or biases are not exact in {dt}"
            )
        outs["weight"][r:r + n], outs["scales"][r:r + n], outs["biases"][r:r + n] = w, s_out, b_out
        r += n
    if r != rows:
        raise ModelFormatError(f"{source.name}: tensor {name} yielded {r} of {rows} rows")


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an existing ``out`` only with force."""
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out} appeared during the conversion; not replacing it")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # put the previous content back
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)

