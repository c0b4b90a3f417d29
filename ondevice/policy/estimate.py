"""Estimates for one request on each local backend of a device, and on the cloud.

Decode is memory bound: every new token reads all the weights once plus the KV of the context
so far, so ``tok/s ~ efficiency x bandwidth / bytes per token``. Prefill is compute bound:
``tok/s ~ efficiency x peak FLOP/s / FLOPs per token``. The efficiencies below are defaults
per backend and processor; ``ondevice devices --calibrate`` replaces them with ones measured
on this machine (``DeviceProfile.efficiency``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .device import DeviceProfile
from .model import ModelRequirements

# Fraction of the usable memory a request may plan for: the rest absorbs allocator slack,
# the tokenizer and Python objects, and pages the OS wants back under pressure.
MEMORY_HEADROOM = 0.85
# Activations, sampler buffers and the interpreter of a running model, beyond weights and KV.
RUNTIME_OVERHEAD = 256 << 20
# Fixed start-up cost of a request before the first prefill FLOP (scheduling, tokenizing).
LOCAL_FIXED_TTFT = 0.02
# The MLX backend's rule for expanding quantized weights on the CPU (share of free memory).
MLX_CPU_EXPAND_SHARE = 0.25


@dataclass(frozen=True)
class BackendTraits:
    """How a backend uses a device: where it computes, what it holds, how efficiently."""

    processor: str  # "cpu", "gpu", "ane"
    weights: str  # "dense_f32" (dequantized at load) or "stored" (kept at the model's format)
    kv_itemsize: int  # bytes per KV element
    decode_efficiency: float  # of peak memory bandwidth
    prefill_efficiency: float  # of the processor's peak FLOP/s
    energy_rank: int  # 1 = least energy per token


# Defaults, from this project's measurements where it has them and public numbers otherwise:
# NumPy decodes the 135M model at ~36 tok/s from ~25 GB/s (ARCHITECTURE.md: ~0.75 of peak;
# 0.6 leaves margin); MLX on its Linux CPU device at 11-15 tok/s where NumPy does 20-36
# (backends/__init__.py), so about a quarter of NumPy's; MLX and llama.cpp on Apple GPUs reach
# 60-70% of the published bandwidth in public decode benchmarks; the Neural Engine decodes
# slower than the GPU (Apple's Core ML Llama 3.1 8B int4 write-up reports ~33 tok/s on an
# M1 Max, ~0.35 of its 400 GB/s at 4.5 bits per weight) but at the least energy.
# The cpu backend keeps quantized weights packed (backends/cpu_backend.py), so it plans for the
# stored bytes; its kernels reached 19-21% of the q4 bandwidth ceiling on the quiet 2-core
# machine (benchmarks/results/cpu.json; 91% at f32, benchmarks/results/gemma3.json) and half
# that under load, so the default is conservative until `ondevice devices --calibrate`
# measures it.
TRAITS: dict[tuple[str, str], BackendTraits] = {
    ("cpu", "cpu"): BackendTraits("cpu", "stored", 4, 0.15, 0.2, 3),
    ("numpy", "cpu"): BackendTraits("cpu", "dense_f32", 4, 0.6, 0.5, 3),
    ("mlx", "gpu"): BackendTraits("gpu", "stored", 2, 0.65, 0.4, 2),
    ("mlx", "cpu"): BackendTraits("cpu", "stored", 4, 0.15, 0.05, 3),
    ("wgpu", "gpu"): BackendTraits("gpu", "stored", 2, 0.4, 0.25, 2),
    ("wgpu", "cpu"): BackendTraits("cpu", "stored", 2, 0.05, 0.02, 3),  # lavapipe
    ("coreml", "ane"): BackendTraits("ane", "stored", 2, 0.35, 0.05, 1),
}


def traits_for(backend: str, profile: DeviceProfile) -> BackendTraits | None:
    """The traits of ``backend`` on ``profile``'s hardware (None: it cannot run there)."""
    if backend in ("numpy", "cpu"):
        return TRAITS[backend, "cpu"]
    if backend == "mlx":
        return TRAITS["mlx", "gpu" if profile.metal else "cpu"]
    if backend == "wgpu":
        real_gpu = any(g.kind in ("integrated", "discrete") for g in profile.gpus)
        return TRAITS["wgpu", "gpu" if real_gpu else "cpu"]
    if backend == "coreml":
        return TRAITS["coreml", "ane"] if profile.has_neural_engine else None
    return None


@dataclass(frozen=True)
class LocalEstimate:
    """One local backend for one request. ``runnable`` is False with ``why`` when the backend
    cannot take the request at all (not on this device, no Core ML export, does not fit)."""

    backend: str
    processor: str
    runnable: bool
    fits: bool
    memory_needed: int
    memory_usable: int
    decode_tps: float
    prefill_tps: float
    ttft_s: float
    total_s: float
    energy_rank: int
    calibrated: bool
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def usable_memory(profile: DeviceProfile) -> int:
    """Memory a request may plan for: what the OS can give now (and at most an app's limit on a
    phone), less the headroom."""
    limit = profile.memory_available
    if profile.app_memory_limit:
        limit = min(limit, profile.app_memory_limit)
    return int(limit * MEMORY_HEADROOM)


def estimate_local(profile: DeviceProfile, model: ModelRequirements, backend: str,
                   prompt_tokens: int, max_new_tokens: int) -> LocalEstimate:
    """How ``backend`` on ``profile`` would serve a request of this size."""
    traits = traits_for(backend, profile)
    usable = usable_memory(profile)

    def unrunnable(why: str, processor: str = "") -> LocalEstimate:
        return LocalEstimate(backend, processor, False, False, 0, usable, 0.0, 0.0,
                             float("inf"), float("inf"), 9, False, why)

    if backend not in profile.backends:
        return unrunnable(profile.backend_notes.get(backend, "not available on this device"))
    if traits is None:
        return unrunnable("needs a Neural Engine")
    if backend == "coreml" and not model.coreml_export:
        return unrunnable("no Core ML export of this model (ondevice convert --to coreml)",
                          traits.processor)
    tokens = prompt_tokens + max_new_tokens
    weights = model.dense_f32_bytes if traits.weights == "dense_f32" else model.weight_bytes
    if (backend == "mlx" and traits.processor == "cpu" and model.quantization in ("q4", "q8")
            and model.dense_f32_bytes <= MLX_CPU_EXPAND_SHARE * profile.memory_available):
        # MLX's CPU quantized kernel is scalar, so the backend expands a quantized checkpoint
        # to dense float32 at load when that fits (backends/mlx_backend.py): plan for that.
        weights = model.dense_f32_bytes
    kv_per_token = model.kv_bytes_per_token * traits.kv_itemsize // 2  # model figure is f16
    # A Core ML export holds its whole KV state, sized at export time.
    kv_tokens = model.kv_pool_tokens if backend == "coreml" and model.kv_pool_tokens else tokens
    needed = weights + kv_per_token * kv_tokens + RUNTIME_OVERHEAD
    fits = needed <= usable
    cal = profile.efficiency.get(backend, {})
    decode_eff = cal.get("decode", traits.decode_efficiency)
    prefill_eff = cal.get("prefill", traits.prefill_efficiency)
    peak = {"cpu": profile.cpu_flops, "gpu": profile.gpu_flops or profile.cpu_flops,
            "ane": profile.neural_engine_ops or profile.cpu_flops}[traits.processor]
    # Decode reads the weights plus, on average, the KV of half the reply past the prompt.
    mean_context = prompt_tokens + max_new_tokens / 2
    bytes_per_token = weights + kv_per_token * mean_context
    decode_tps = decode_eff * profile.memory_bandwidth / bytes_per_token
    # Prefill: the matmuls, plus attention (QK^T and AV: 4 x width FLOPs per layer per
    # earlier position, on average half the prompt).
    flops = model.flops_per_token + 4 * model.num_hidden_layers * model.attention_width * (
        prompt_tokens / 2)
    prefill_tps = prefill_eff * peak / flops
    ttft = LOCAL_FIXED_TTFT + prompt_tokens / prefill_tps
    total = ttft + max(max_new_tokens - 1, 0) / decode_tps
    if tokens > model.context_length:
        return LocalEstimate(backend, traits.processor, False, fits, needed, usable, decode_tps,
                             prefill_tps, ttft, total, traits.energy_rank, bool(cal),
                             f"{tokens} tokens exceed the model's context of "
                             f"{model.context_length}")
    why = "" if fits else (f"needs {_gb(needed)} (weights {_gb(weights)} + KV + runtime), "
                           f"{_gb(usable)} usable")
    return LocalEstimate(backend, traits.processor, fits, fits, needed, usable, decode_tps,
                         prefill_tps, ttft, total, traits.energy_rank, bool(cal), why)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
