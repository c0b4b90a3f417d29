"""Shared pieces of ``ondevice bench`` and ``ondevice eval``: model variants per quantization,
the stored format of a model directory, bytes read per token, machine facts, peak memory."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from ..default_model import default_model_dir, home, packaged_gguf, resolve_model
from ..errors import OndeviceError
from ..modeldir import ModelDir
from ..models.llama import weight_specs

QUANTIZE_MODES = ("f32", "f16", "q8", "q4")


class BenchError(OndeviceError):
    """A benchmark or evaluation cannot run as asked (bad option, nothing to run)."""


def parse_list(values: tuple[str, ...] | list[str] | str | None) -> list[str]:
    """``("f32,q4", "q8")`` -> ``["f32", "q4", "q8"]`` (repeatable, comma-separated options)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def parse_quantize(values) -> list[str]:
    modes = parse_list(values)
    for m in modes:
        if m not in QUANTIZE_MODES:
            raise BenchError(f"unknown quantization {m!r} (choose from {', '.join(QUANTIZE_MODES)})")
    return modes


def stored_format(path: Path) -> str:
    """How a model directory stores its weights: ``f32``, ``f16``, ``bf16`` or ``q<bits>``."""
    config = json.loads((Path(path) / "config.json").read_text())
    quant = config.get("quantization")
    if isinstance(quant, dict) and "bits" in quant:
        return f"q{int(quant['bits'])}"
    md = ModelDir(path)
    try:
        dtype = md.weights.dtype("model.embed_tokens.weight")
    finally:
        md.close()
    return {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(dtype, dtype.lower())


def source_gguf(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file a model comes from, when there is one on this machine (for llama.cpp)."""
    if model is None:
        try:
            return packaged_gguf()
        except OndeviceError:
            return None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        # A directory converted from the packaged GGUF records the file name as its source.
        try:
            info = json.loads((path / "config.json").read_text()).get("ondevice") or {}
        except (OSError, ValueError):
            return None
        if info.get("source_format") == "gguf":
            try:
                candidate = packaged_gguf()
            except OndeviceError:
                return None
            if candidate.name == info.get("source"):
                return candidate
    return None


def model_variant(model: str | os.PathLike | None, quantize: str, *, group_size: int = 64,
                  quiet: bool = True) -> Path:
    """A model directory holding ``model`` stored as ``quantize``, converting once into the cache.

    The default model and GGUF files are converted from the GGUF (as ``ondevice`` does on first
    use); a model directory already in that format is used as it is, any other directory is
    converted from its own weights into ``bench/`` in the ondevice home.
    """
    from ..converters import convert

    if quantize not in QUANTIZE_MODES:
        raise BenchError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZE_MODES)})")
    # The group size is part of a quantized variant's name unless it is the default (64).
    suffix = f"-g{group_size}" if quantize in ("q8", "q4") and group_size != 64 else ""
    if model is None:
        if not suffix:
            return default_model_dir(quantize, quiet=quiet)
        model = packaged_gguf()
        out = home() / "models" / f"smollm2-135m-instruct-{quantize}{suffix}"
        if (out / "config.json").is_file():
            return out
        return convert(model, out, quantize=quantize, group_size=group_size,
                       progress=not quiet)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        # Every format, f32 included, is its own conversion: resolving the file would give the
        # store's import, which keeps the GGUF's quantization.
        st = path.stat()
        out = home() / "models" / (f"{path.stem}-{st.st_size:x}-{int(st.st_mtime):x}-"
                                   f"{quantize}{suffix}")
        if (out / "config.json").is_file():
            return out
        return convert(path, out, quantize=quantize, group_size=group_size, progress=not quiet)
    path = resolve_model(path, quiet=quiet)
    if stored_format(path) == quantize and _group_size(path) in (None, group_size):
        return path
    # Key the cache by where the source is and when it last changed, so an edited model is
    # converted again rather than served stale.
    st = (path / "config.json").stat()
    weights = sorted(path.glob("*.safetensors"))
    stamp = f"{path.resolve()}|{st.st_mtime_ns}|" + "|".join(
        f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    out = home() / "bench" / f"{path.name}-{key}-{quantize}{suffix}"
    if (out / "config.json").is_file():
        return out
    return convert(path, out, quantize=quantize, group_size=group_size, force=True,
                   progress=not quiet)


def _group_size(path: Path) -> int | None:
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization")
    return int(quant["group_size"]) if isinstance(quant, dict) and "group_size" in quant else None


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step must read from memory, as stored in ``path``.

    Every linear, norm and bias tensor is read once per token. The embedding table is read
    in full only when it doubles as the output head (tied embeddings); otherwise a token
    reads one row of it. Quantized tensors count their packed codes, scales and biases.
    """
    md = ModelDir(path)
    try:
        config = md.config
        names = set(md.weights)
        total = 0
        for name, spec in weight_specs(config).items():
            prefix = name.removesuffix(".weight")
            parts = [n for n in (name, prefix + ".scales", prefix + ".biases") if n in names]
            nbytes = sum(_tensor_bytes(md, n) for n in parts)
            if spec.kind == "embedding" and not config.tie_word_embeddings:
                nbytes //= config.vocab_size  # one row per token
            total += nbytes
        return total
    finally:
        md.close()


def _tensor_bytes(md: ModelDir, name: str) -> int:
    size = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1}
    n = 1
    for d in md.weights.shape(name):
        n *= d
    return n * size.get(md.weights.dtype(name), 4)


def cpu_threads() -> int:
    """Cores this process may run on (the thread count given to peers too)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    from ..memory import available_memory_bytes

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "threads": cpu_threads(), "python": sys.version.split()[0],
            "available_memory_bytes": available_memory_bytes()}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``5`` into ``clear_refs`` resets VmHWM to the
    current RSS), so each configuration in one run gets its own peak. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- prompts -------------------------------------------------------------------------------
def make_prompts(vocab_size: int, special: set[int], count: int, length: int,
                 seed: int) -> list[list[int]]:
    """``count`` distinct random prompts of ``length`` ids (no special tokens), so neither
    the prefix cache nor a peer's prompt cache can shortcut a prefill."""
    rng = np.random.default_rng(seed)
    low = min(100, vocab_size // 4)
    out = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            ids += [int(t) for t in rng.integers(low, vocab_size, length) if int(t) not in special]
        out.append(ids[:length])
    return out
