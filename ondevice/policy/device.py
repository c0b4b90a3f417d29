"""What a device can do: memory, bandwidth, compute, GPUs, power and network facts.

A :class:`DeviceProfile` is either detected on this machine (:meth:`DeviceProfile.detect`) or
loaded from a TOML/JSON file to simulate another device (the shipped ones are listed by
:func:`shipped_profiles`). The policy only reads profiles; it never probes hardware itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import PolicyConfigError
from .measured import cpu_name, load_calibration, measured_bandwidth, run_command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GB = 10**9
LOCAL_BACKENDS = ("cpu", "numpy", "mlx", "wgpu", "coreml")

# Published unified-memory bandwidth of Apple chips (GB/s), for a live Mac whose OS names its
# chip but not its bandwidth. Apple newsroom chip announcements; where a chip has bins with
# different buses, the lower figure (a wrong high figure would promise speed that is not there).
APPLE_BANDWIDTH_GBS = {
    "M1": 68.25, "M1 Pro": 200.0, "M1 Max": 400.0, "M1 Ultra": 800.0,
    "M2": 100.0, "M2 Pro": 200.0, "M2 Max": 400.0, "M2 Ultra": 800.0,
    "M3": 100.0, "M3 Pro": 150.0, "M3 Max": 300.0, "M3 Ultra": 819.0,
    "M4": 120.0, "M4 Pro": 273.0, "M4 Max": 410.0,
}


@dataclass(frozen=True)
class GPUAdapter:
    """One GPU adapter as WebGPU (or the OS) reports it."""

    name: str
    kind: str = "integrated"  # "integrated", "discrete", "cpu" (a software rasterizer), "other"
    api: str = ""  # "metal", "vulkan", "d3d12", ...


@dataclass(frozen=True)
class DeviceProfile:
    """Facts about one device. Bytes for memory, bytes per second for bandwidth.

    ``backends`` are the local backends that can run here; ``backend_notes`` says why each
    missing one cannot. ``online`` is whether the configured cloud endpoint answered a TCP
    connect (None: not checked). ``efficiency`` holds calibrated decode/prefill efficiencies
    per backend (``{"numpy": {"decode": 0.7, "prefill": 0.3}}``), measured on this device.
    """

    name: str
    os: str
    arch: str
    cpu: str
    cpu_cores: int
    memory_total: int
    memory_available: int
    memory_bandwidth: float
    cpu_flops: float
    backends: tuple[str, ...]
    chip: str | None = None
    gpu_flops: float | None = None
    neural_engine_ops: float | None = None
    metal: bool = False
    gpus: tuple[GPUAdapter, ...] = ()
    app_memory_limit: int | None = None
    battery_percent: float | None = None
    charging: bool | None = None
    low_power_mode: bool = False
    thermal_state: str | None = None  # "nominal", "fair", "serious", "critical" where known
    online: bool | None = None
    bandwidth_measured: bool = False
    efficiency: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)
    backend_notes: dict[str, str] = field(default_factory=dict, compare=False)
    source: str = "file"  # "detected" or the profile file's name

    @property
    def on_battery(self) -> bool:
        """Running from a battery that is not charging."""
        return self.battery_percent is not None and self.charging is False

    @property
    def has_neural_engine(self) -> bool:
        return bool(self.neural_engine_ops)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (memory in bytes, bandwidth in bytes/s)."""
        d = dataclasses.asdict(self)
        d["gpus"] = [dataclasses.asdict(g) for g in self.gpus]
        d["backends"] = list(self.backends)
        return d

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "file") -> DeviceProfile:
        """A profile from the TOML/JSON profile schema (see the shipped profiles)."""
        try:
            total = _size(data["memory_total"])
            name = str(data["name"])
            bandwidth = float(data["memory_bandwidth_gbs"]) * GB
        except KeyError as err:
            raise PolicyConfigError(f"device profile {source}: missing key {err.args[0]!r}") from None
        available = _size(data.get("memory_available", 0)) or _default_available(total)
        backends = tuple(data.get("backends", ("numpy",)))
        unknown = [b for b in backends if b not in LOCAL_BACKENDS]
        if unknown:
            raise PolicyConfigError(f"device profile {source}: unknown backend(s) {unknown} "
                                    f"(known: {', '.join(LOCAL_BACKENDS)})")
        gpus = tuple(GPUAdapter(str(g.get("name", "?")), str(g.get("kind", "integrated")),
                                str(g.get("api", ""))) for g in data.get("gpus", ()))
        tflops = data.get("gpu_tflops")
        tops = data.get("neural_engine_tops")
        limit = data.get("app_memory_limit")
        return cls(
            name=name, os=str(data.get("os", "unknown")), arch=str(data.get("arch", "unknown")),
            cpu=str(data.get("cpu", "unknown")), cpu_cores=int(data.get("cpu_cores", 1)),
            memory_total=total, memory_available=available, memory_bandwidth=bandwidth,
            cpu_flops=float(data.get("cpu_gflops", 50.0)) * 1e9, backends=backends,
            chip=data.get("chip"), gpu_flops=float(tflops) * 1e12 if tflops else None,
            neural_engine_ops=float(tops) * 1e12 if tops else None,
            metal=bool(data.get("metal", False)), gpus=gpus,
            app_memory_limit=_size(limit) if limit else None,
            battery_percent=(float(data["battery_percent"]) if "battery_percent" in data
                             else None),
            charging=data.get("charging"), low_power_mode=bool(data.get("low_power_mode", False)),
            thermal_state=data.get("thermal_state"), online=data.get("online"),
            efficiency={k: dict(v) for k, v in data.get("efficiency", {}).items()},
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        """A profile from a ``.toml`` or ``.json`` file, or the name of a shipped profile
        (``m1-8gb`` matches ``macbook-air-m1-8gb.toml``)."""
        p = Path(path)
        if not p.is_file():
            p = _find_shipped(str(path))
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:  # UnicodeDecodeError included
            raise PolicyConfigError(f"device profile {p}: cannot parse: {err}") from None
        except RecursionError:
            raise PolicyConfigError(f"device profile {p}: nested too deeply") from None
        except OSError as err:
            raise PolicyConfigError(f"device profile {p}: {err.strerror or err}") from None
        return cls.from_dict(data, source=p.name)

    # -- detection -------------------------------------------------------------------------
    @classmethod
    def detect(cls, *, measure_bandwidth: bool = True, probe_backends: bool = True,
               cloud: Any = None) -> DeviceProfile:
        """This machine's profile, read from the OS (psutil, platform, sysctl, /proc) and the
        backend registry. ``cloud`` (a :class:`~ondevice.policy.CloudConfig`): also check
        that endpoint's reachability with a TCP connect; without it ``online`` stays None, so
        that detecting a device for a private request never touches the network.

        Bandwidth comes from the published figure of an Apple chip, else from a short copy
        benchmark (cached on disk by :mod:`ondevice.policy.calibrate`).
        """
        import psutil


        system = {"darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)
        arch = platform.machine() or "unknown"
        vm = psutil.virtual_memory()
        chip = _apple_chip() if system == "macos" and arch == "arm64" else None
        cpu = f"Apple {chip}" if chip else cpu_name()
        cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        bandwidth, measured = None, False
        if chip:
            base = re.sub(r"\s*\(.*\)$", "", chip)
            bandwidth = APPLE_BANDWIDTH_GBS.get(base.replace("Apple ", ""))
            bandwidth = bandwidth * GB if bandwidth else None
        if bandwidth is None and measure_bandwidth:
            bandwidth, measured = measured_bandwidth(), True
        if bandwidth is None:
            bandwidth = 20 * GB  # a conservative desktop DDR4 figure when nothing better is known
        # FP32 FLOPs per cycle per core: 32 for two AVX2 FMA pipes (NEON: 4 x 128-bit FMA is the
        # same); clock from psutil.
        freq = psutil.cpu_freq()
        ghz = (freq.max or freq.current) / 1000 if freq and (freq.max or freq.current) else 2.5
        backends, notes, gpus = (), {}, ()
        if probe_backends:
            backends, notes = _probe_backends()
            gpus = _wgpu_adapters(notes)
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        low_power, thermal = _power_state(system)
        calibration = load_calibration()
        online = None
        if cloud is not None:
            from .cloud import reachable

            online = reachable(cloud)
        return cls(
            name=f"this machine ({platform.node() or 'unknown'})", os=system, arch=arch,
            cpu=cpu or "unknown", cpu_cores=cores, memory_total=vm.total,
            memory_available=vm.available, memory_bandwidth=float(bandwidth),
            cpu_flops=cores * ghz * 1e9 * 32, backends=backends, chip=chip,
            neural_engine_ops=(11e12 if chip else None),  # every M-series has one; >= M1's 11 TOPS
            metal=system == "macos" and arch == "arm64", gpus=gpus,
            battery_percent=float(battery.percent) if battery else None,
            charging=bool(battery.power_plugged) if battery else None,
            low_power_mode=low_power, thermal_state=thermal, online=online,
            bandwidth_measured=measured,
            efficiency=calibration, backend_notes=notes, source="detected",
        )


def shipped_profiles() -> dict[str, Path]:
    """The device profiles that ship with ondevice, by file stem."""
    root = resources.files(__package__) / "profiles"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(root.iterdir(), key=str)
            if str(p).endswith(".toml")}


def _find_shipped(name: str) -> Path:
    profiles = shipped_profiles()
    key = Path(name).stem.lower()
    if key in profiles:
        return profiles[key]
    matches = [p for stem, p in profiles.items() if key in stem]
    if len(matches) == 1:
        return matches[0]
    raise PolicyConfigError(
        f"device profile {name!r} not found: give a .toml/.json file or one of "
        f"{', '.join(profiles)}" + (" (ambiguous)" if matches else ""))


def _size(value: int | float | str) -> int:
    if isinstance(value, str):
        from ..runtime import parse_size

        return parse_size(value)
    return int(value)


def _default_available(total: int) -> int:
    # A profile that does not say: the OS and other apps hold about a quarter (at least 2 GB).
    return max(total - max(total // 4, 2 << 30), total // 2)


def _apple_chip() -> str | None:
    # "Apple M2 Pro" on Apple Silicon, from the CPU brand string.
    brand = run_command(["sysctl", "-n", "machdep.cpu.brand_string"])
    return brand.removeprefix("Apple ").strip() or None


def _power_state(system: str) -> tuple[bool, str | None]:
    """Low-power mode and thermal state where the OS tells (macOS pmset); else unknown."""
    if system != "macos":
        return False, None
    low = run_command(["pmset", "-g"])
    low_power = bool(re.search(r"lowpowermode\s+1", low))
    therm = run_command(["pmset", "-g", "therm"])
    thermal = "nominal"
    m = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", therm)
    if m and int(m.group(1)) < 100:
        thermal = "serious" if int(m.group(1)) < 70 else "fair"
    return low_power, thermal


def _probe_backends() -> tuple[tuple[str, ...], dict[str, str]]:
    from ..backends import available_backends

    ok, notes = [], {}
    for name, (available, detail) in available_backends().items():
        if available:
            ok.append(name)
        notes[name] = detail
    return tuple(ok), notes


def _wgpu_adapters(notes: dict[str, str]) -> tuple[GPUAdapter, ...]:
    """The adapter the wgpu backend picked, from its availability detail (``"NAME (Vulkan,
    CPU), float16"``); enumerating adapters again would open every driver a second time."""
    if "wgpu" not in notes or "unavailable" in notes["wgpu"] or "not implemented" in notes["wgpu"]:
        return ()
    detail = notes["wgpu"]
    m = re.match(r"(?P<name>.*) \((?P<api>[^,()]+)(?:, (?P<kind>[^()]+))?\)(?:,[^()]*)?$", detail)
    if not m:
        return (GPUAdapter(detail, "other", ""),)
    kind = (m.group("kind") or "").lower()
    kind = ("cpu" if "cpu" in kind else "discrete" if "discrete" in kind
            else "integrated" if "integrated" in kind else "other")
    return (GPUAdapter(m.group("name"), kind, m.group("api").lower()),)
