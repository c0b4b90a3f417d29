"""Configuration in one path: built-in defaults, then ``ONDEVICE_*`` environment variables, then
explicit arguments.

This module is the only place that reads ``ONDEVICE_*`` variables. Everything configurable is
an :class:`EngineConfig` (how the engine schedules and how much KV it keeps) or one options
dataclass per backend (:class:`CpuOptions`, :class:`MlxOptions`, ...). ``ondevice.load()``,
``serve``, the CLI and the bench pass these objects down; nothing below reads the environment.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import RequestError

# Every variable ondevice reads, with what it sets (the README's table is made from this).
ENVIRONMENT: dict[str, str] = {
    "ONDEVICE_HOME": "home for converted models, compile caches, calibration and history "
                     "(default: the platform's user cache directory)",
    "ONDEVICE_CPU_THREADS": "threads of the cpu backend's kernels (default: physical cores)",
    "ONDEVICE_MLX_DEVICE": "MLX device: cpu or gpu (default: gpu where Metal exists)",
    "ONDEVICE_MLX_DTYPE": "MLX compute dtype: float32, float16 or bfloat16",
    "ONDEVICE_MLX_THREADS": "threads for MLX's CPU device",
    "ONDEVICE_MLX_QUANTIZED": "MLX on the CPU: auto, keep or expand quantized weights",
    "ONDEVICE_WGPU_ADAPTER": "wgpu: use the first adapter whose name contains this text",
    "ONDEVICE_WGPU_DTYPE": "wgpu compute dtype: float16 or float32",
    "ONDEVICE_COREML_COMPUTE_UNITS": "Core ML compute units: all, cpu_and_ne, cpu_and_gpu, "
                                     "cpu_only",
    "ONDEVICE_COREML_DEBUG": "show coremltools' own output while exporting (1)",
    "ONDEVICE_CLOUD_URL": "OpenAI-compatible endpoint for the policy's cloud side",
    "ONDEVICE_CLOUD_MODEL": "model name sent to the cloud endpoint",
    "ONDEVICE_CLOUD_CONFIG": "path of the cloud configuration file (default: cloud.toml in "
                             "the home)",
    "ONDEVICE_CLOUD_API_KEY": "API key for the cloud endpoint (never logged)",
    "ONDEVICE_API_KEY": "key that `ondevice serve` requires as 'Authorization: Bearer KEY'",
    "ONDEVICE_CATALOG": "TOML file of model aliases ([models.\"name\"] repo, tag, package, "
                        "licence) added to the built-in catalog of `ondevice pull`",
}


def env(name: str) -> str | None:
    """The stripped value of a known variable, or None when it is unset or empty."""
    if name not in ENVIRONMENT:
        raise KeyError(f"{name} is not a documented ondevice variable")
    value = os.environ.get(name, "").strip()
    return value or None


def env_any(name: str) -> str | None:
    """The value of a variable that a configuration file names (e.g. the cloud key's)."""
    value = os.environ.get(name, "").strip()
    return value or None


# The variable the cloud API key is read from unless the cloud config names another.
CLOUD_KEY_VARIABLE = "ONDEVICE_CLOUD_API_KEY"


def cloud_settings() -> dict[str, str | None]:
    """The cloud endpoint's settings from the environment: ``url``, ``model``, ``config``."""
    return {"url": env("ONDEVICE_CLOUD_URL"), "model": env("ONDEVICE_CLOUD_MODEL"),
            "config": env("ONDEVICE_CLOUD_CONFIG")}


def extra_catalog_path() -> str | None:
    """A TOML file of model aliases that add to (or replace) the built-in catalog."""
    return env("ONDEVICE_CATALOG")


def server_api_key() -> str | None:
    """The key ``ondevice serve`` requires when no ``--api-key`` is given."""
    return env("ONDEVICE_API_KEY")


def described(*names: str) -> str:
    """``[env: A, B]`` for help texts (variable names kept in this module only)."""
    full = [f"ONDEVICE_{n}" for n in names]
    for name in full:
        if name not in ENVIRONMENT:
            raise KeyError(name)
    return f"[env: {', '.join(full)}]"


def home_dir() -> Path:
    """The ondevice home: ``$ONDEVICE_HOME``, else the platform's user cache directory."""
    value = env("ONDEVICE_HOME")
    if value:
        return Path(value).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ondevice"))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RequestError(f"{name} must be a positive integer, got {value!r}")
    return value


SPECULATIVE_METHODS = ("prompt_lookup", "draft")
MAX_SPECULATIVE_TOKENS = 16
"""Largest k: beyond it a proposal's tail is almost never accepted and only costs rows."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: propose up to ``num_tokens`` tokens per step and verify them all
    in one forward pass of the target model.

    ``method``: ``"prompt_lookup"`` (continue the latest earlier occurrence of the last
    n-gram of prompt + output, for n from ``ngram_max`` down to ``ngram_min``; no second
    model) or ``"draft"`` (a smaller model with the same tokenizer, ``draft_model``, on its own
    backend ``draft_backend`` — None: the target's — and its own KV pool). ``adaptive``: k per
    sequence and step is the one that maximizes the step's throughput at the measured cost of
    its rows and the sequence's running acceptance rate, so k shrinks when proposals are
    rejected and speculation stops on a batch that is already large (False: always k).
    ``max_batch_rows``: speculation never fills a step beyond this many query rows.
    """

    method: str = "prompt_lookup"
    num_tokens: int = 4
    draft_model: str | None = None
    draft_backend: str | None = None
    ngram_min: int = 1
    ngram_max: int = 4
    max_batch_rows: int = 64
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise RequestError(f"speculative method must be one of "
                               f"{', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        k = self.num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise RequestError(f"num_speculative_tokens must be an integer in "
                               f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "draft" and not self.draft_model:
            raise RequestError("speculative method 'draft' needs a draft model (--draft-model)")
        if self.method != "draft" and (self.draft_model or self.draft_backend):
            raise RequestError("a draft model is only used with speculative method 'draft'")
        _positive_int("ngram_min", self.ngram_min)
        _positive_int("ngram_max", self.ngram_max)
        if self.ngram_min > self.ngram_max:
            raise RequestError(f"ngram_min ({self.ngram_min}) is larger than ngram_max "
                               f"({self.ngram_max})")
        _positive_int("max_batch_rows", self.max_batch_rows)
        if not isinstance(self.adaptive, bool):
            raise RequestError(f"adaptive must be true or false, got {self.adaptive!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules and how much KV cache it keeps.

    ``kv_memory`` is the KV pool's budget in bytes (or text such as ``"256MiB"``); None sizes
    it automatically: one full context, at least 256 MiB, at most a quarter of free memory.
    ``window_paging``: models with sliding-window layers (Gemma 3) keep those layers' KV in a
    group of its own whose blocks go back to the pool once they leave the window, and the
    budget is split between the groups (``ondevice.kv.layout``); off, every layer keeps every
    block in one pool.
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    kv_memory: int | str | None = None
    speculative: SpeculativeConfig | None = None
    window_paging: bool = True

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        for name in ("enable_prefix_caching", "window_paging"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.kv_memory is not None:
            try:
                object.__setattr__(self, "kv_memory", parse_size(self.kv_memory))
            except RequestError as err:
                raise RequestError(f"kv_memory: {err}") from None
        spec = self.speculative
        if spec is not None:
            if not isinstance(spec, SpeculativeConfig):
                raise RequestError(f"speculative must be a SpeculativeConfig or None, got "
                                   f"{type(spec).__name__}")
            if spec.num_tokens + 1 > self.max_num_batched_tokens:
                raise RequestError(f"num_speculative_tokens {spec.num_tokens} needs "
                                   f"max_num_batched_tokens >= {spec.num_tokens + 1}")

    def merged(self, **overrides: Any) -> EngineConfig:
        """A copy with the overrides that are not None applied."""
        return _merged(self, overrides, "engine setting")


def _merged(obj: Any, overrides: dict[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RequestError(f"unknown {what} {unknown[0]!r} (known: {', '.join(sorted(names))})")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"256MiB"``, ``"1GB"``, ``"512m"`` or a plain number."""
    if isinstance(text, bool):
        raise RequestError(f"cannot read memory size {text!r} (try 256MiB or 1GiB)")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3,
                 "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20,
                 "g": 1 << 30, "t": 1 << 40, "b": 1}
        scale = 1
        for unit, mult in units.items():
            if s.endswith(unit):
                s, scale = s[: -len(unit)], mult
                break
        try:
            value = float(s) * scale
        except (ValueError, OverflowError):
            raise RequestError(f"cannot read memory size {text!r} (try 256MiB or 1GiB)") from None
    if not math.isfinite(value):
        raise RequestError(f"memory size must be a finite number, got {text!r}")
    if value <= 0:
        raise RequestError(f"memory size must be positive, got {text!r}")
    if value >= 1 << 50:
        raise RequestError(f"memory size {text!r} is beyond any machine")
    return int(value)


@dataclass(frozen=True)
class BackendOptions:
    """Options of one backend. Subclasses list their fields and the variables behind them."""

    ENV: ClassVar[dict[str, str]] = {}  # field -> variable name

    @classmethod
    def from_env(cls, **overrides: Any) -> BackendOptions:
        """Defaults, then the environment, then ``overrides`` (None values ignored)."""
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, var in cls.ENV.items():
            raw = env(var)
            if raw is None:
                continue
            if "int" in str(types[name]):
                if not raw.isdigit() or int(raw) <= 0:
                    raise RequestError(f"{var}={raw!r}: expected a positive integer")
                values[name] = int(raw)
            else:
                values[name] = raw.lower()
        return _merged(cls(**values), overrides, f"{cls.backend} option")

    backend: ClassVar[str] = ""


@dataclass(frozen=True)
class NumpyOptions(BackendOptions):
    """The NumPy reference has nothing to choose: float32 everywhere."""

    backend: ClassVar[str] = "numpy"


@dataclass(frozen=True)
class CpuOptions(BackendOptions):
    """``threads``: kernel threads (None: the machine's physical cores)."""

    threads: int | None = None
    backend: ClassVar[str] = "cpu"
    ENV: ClassVar[dict[str, str]] = {"threads": "ONDEVICE_CPU_THREADS"}


@dataclass(frozen=True)
class MlxOptions(BackendOptions):
    """``device`` cpu | gpu (None: gpu where Metal exists); ``dtype`` float32 | float16 |
    bfloat16 (None: float32 on the CPU, float16 on the GPU); ``threads`` for the CPU device;
    ``quantized`` auto | keep | expand (what a CPU load does with quantized matrices)."""

    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    quantized: str | None = None
    backend: ClassVar[str] = "mlx"
    ENV: ClassVar[dict[str, str]] = {
        "device": "ONDEVICE_MLX_DEVICE", "dtype": "ONDEVICE_MLX_DTYPE",
        "threads": "ONDEVICE_MLX_THREADS", "quantized": "ONDEVICE_MLX_QUANTIZED",
    }


@dataclass(frozen=True)
class WgpuOptions(BackendOptions):
    """``adapter``: the first adapter whose name contains this text (None: high-performance
    preference); ``dtype`` float16 | float32 (None: float16 where the adapter has shader-f16)."""

    adapter: str | None = None
    dtype: str | None = None
    backend: ClassVar[str] = "wgpu"
    ENV: ClassVar[dict[str, str]] = {"adapter": "ONDEVICE_WGPU_ADAPTER",
                                     "dtype": "ONDEVICE_WGPU_DTYPE"}

    @classmethod
    def from_env(cls, **overrides: Any) -> BackendOptions:
        opts = super().from_env(**overrides)
        raw = env("ONDEVICE_WGPU_ADAPTER")  # an adapter name keeps its case
        if raw and "adapter" not in {k for k, v in overrides.items() if v is not None}:
            opts = dataclasses.replace(opts, adapter=raw)
        return opts


@dataclass(frozen=True)
class CoreMLOptions(BackendOptions):
    """``compute_units``: all | cpu_and_ne | cpu_and_gpu | cpu_only."""

    compute_units: str | None = None
    backend: ClassVar[str] = "coreml"
    ENV: ClassVar[dict[str, str]] = {"compute_units": "ONDEVICE_COREML_COMPUTE_UNITS"}


OPTIONS: dict[str, type[BackendOptions]] = {
    cls.backend: cls for cls in (NumpyOptions, CpuOptions, MlxOptions, WgpuOptions, CoreMLOptions)
}


def backend_options(backend: str, options: BackendOptions | dict[str, Any] | None = None
                    ) -> BackendOptions:
    """The options for ``backend``: an options object as given (its type must match), or a
    dict of overrides on top of the environment's defaults."""
    cls = OPTIONS.get(backend)
    if cls is None:
        raise RequestError(f"unknown backend {backend!r} (known: {', '.join(OPTIONS)})")
    if isinstance(options, BackendOptions):
        if not isinstance(options, cls):
            raise RequestError(
                f"options of type {type(options).__name__} given for backend {backend!r} "
                f"(expected {cls.__name__})")
        return options
    return cls.from_env(**(options or {}))


def coreml_debug() -> bool:
    """Whether coremltools' own output is shown while exporting."""
    return env("ONDEVICE_COREML_DEBUG") not in (None, "0", "false", "no")
