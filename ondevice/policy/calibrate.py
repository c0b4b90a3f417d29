"""Measured facts of this machine, cached on disk: memory bandwidth (a copy benchmark) and each
backend's decode/prefill efficiency (a short run of a real model).

The cache is ``$ONDEVICE_HOME/policy/calibration.json`` (or the platform cache directory),
keyed by a fingerprint of the machine so that a copied home directory does not carry another
machine's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

BANDWIDTH_BYTES = 128 << 20  # large enough to leave every cache level


def cache_path() -> Path:
    from ..default_model import home

    return home() / "policy" / "calibration.json"


def fingerprint() -> str:
    """This machine: host name, processor, core count and total memory."""
    import psutil

    from .device import _cpu_name

    text = f"{platform.node()}|{_cpu_name()}|{os.cpu_count()}|{psutil.virtual_memory().total}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def _entry() -> dict[str, Any]:
    return _read().get(fingerprint(), {})


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
    data = _read()
    data.setdefault(fingerprint(), {})["bandwidth"] = bandwidth
    _write(data)
    return bandwidth


def calibrate(model_path: str | os.PathLike | None = None, backends: list[str] | None = None,
              *, prompt_tokens: int = 64, new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Run a short real generation on each available backend and store the efficiencies it
    implies (measured tok/s over the estimate's tok/s at efficiency 1). Returns them."""
    from .. import load
    from ..default_model import resolve_model
    from ..sampling import SamplingParams
    from .device import DeviceProfile
    from .estimate import estimate_local, traits_for
    from .model import ModelRequirements

    path = resolve_model(model_path, quiet=True)
    req = ModelRequirements.from_model_dir(path)
    profile = DeviceProfile.detect()
    names = backends or [b for b in profile.backends if b != "coreml"]
    bandwidth = measured_bandwidth(refresh=True) if profile.bandwidth_measured else None
    if bandwidth:
        from dataclasses import replace

        profile = replace(profile, memory_bandwidth=bandwidth)
    results: dict[str, dict[str, float]] = {}
    for name in names:
        traits = traits_for(name, profile)
        if traits is None:
            continue
        m = load(path, name, kv_memory="64MiB", quiet=True)
        try:
            ids = list(range(10, 10 + prompt_tokens))
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            m.generate(ids, params)  # warm-up: first-touch pages, compiled kernels
            m.generate(ids, params)
            t = m.timings
        finally:
            m.close()
        # The estimate at the default efficiencies, scaled to what was measured.
        uncal = replace_efficiency(profile, name, {})
        est = estimate_local(uncal, req, name, prompt_tokens, new_tokens)
        decode = traits.decode_efficiency * t.decode_tps / est.decode_tps if est.decode_tps else 0
        prefill = (traits.prefill_efficiency * t.prefill_tps / est.prefill_tps
                   if est.prefill_tps else 0)
        results[name] = {"decode": round(decode, 4), "prefill": round(prefill, 4),
                         "measured_decode_tps": round(t.decode_tps, 2),
                         "measured_prefill_tps": round(t.prefill_tps, 2),
                         "model": str(path.name), "when": int(time.time())}
    data = _read()
    entry = data.setdefault(fingerprint(), {})
    entry.setdefault("backends", {}).update(results)
    _write(data)
    return results


def replace_efficiency(profile, backend: str, values: dict[str, float]):
    """``profile`` with ``backend``'s calibrated efficiencies replaced (empty: defaults)."""
    from dataclasses import replace

    eff = {k: v for k, v in profile.efficiency.items() if k != backend}
    if values:
        eff[backend] = values
    return replace(profile, efficiency=eff)
