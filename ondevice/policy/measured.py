"""What this machine measures and says about itself, below the device profile and the
calibration runs that use it: the CPU's name, the achievable memory bandwidth, and the
on-disk cache of calibrated figures (``policy/calibration.json`` in the ondevice home, keyed
by a fingerprint of the machine so that a copied home directory does not carry another
machine's numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..settings import home_dir

BANDWIDTH_BYTES = 128 << 20  # large enough to leave every cache level


def cache_path() -> Path:
    return home_dir() / "policy" / "calibration.json"


def fingerprint() -> str:
    """This machine: host name, processor, core count and total memory."""
    import psutil

    text = f"{platform.node()}|{cpu_name()}|{os.cpu_count()}|{psutil.virtual_memory().total}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(data: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def _entry() -> dict[str, Any]:
    return read_cache().get(fingerprint(), {})


def load_calibration() -> dict[str, dict[str, float]]:
    """Calibrated efficiencies per backend for this machine (empty before --calibrate)."""
    return {name: {k: float(v[k]) for k in ("decode", "prefill") if k in v}
            for name, v in _entry().get("backends", {}).items()}


def measured_bandwidth(refresh: bool = False) -> float:
    """Achievable read bandwidth in bytes/s, cached: the best of a few float32 matrix-vector
    products over a matrix far larger than the caches. That is exactly the memory access of a
    decode step (every weight read once, BLAS on every core), which a single-threaded copy
    would understate."""
    if not refresh:
        cached = _entry().get("bandwidth")
        if cached:
            return float(cached)
    import numpy as np

    w = np.ones((BANDWIDTH_BYTES // 4 // 4096, 4096), dtype=np.float32)
    x = np.ones(4096, dtype=np.float32)
    w @ x  # fault the pages in and warm BLAS before timing
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t0)
    bandwidth = w.nbytes / best
    data = read_cache()
    data.setdefault(fingerprint(), {})["bandwidth"] = bandwidth
    write_cache(data)
    return bandwidth


def run_command(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        return run_command(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    return platform.processor() or "unknown"
