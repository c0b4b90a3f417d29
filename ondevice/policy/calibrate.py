"""Calibration: each backend's decode/prefill efficiency on this machine, from a short run of
a real model, stored with the measured bandwidth in the cache of :mod:`.measured`.
"""

from __future__ import annotations

import os
import time

from .measured import (  # noqa: F401  (the cache's functions, re-exported for callers)
    cache_path,
    fingerprint,
    load_calibration,
    measured_bandwidth,
    read_cache,
    write_cache,
)


def calibrate(model_path: str | os.PathLike | None = None, backends: list[str] | None = None,
              *, prompt_tokens: int = 64, new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Run a short real generation on each available backend and store the efficiencies it
    implies (measured tok/s over the estimate's tok/s at efficiency 1). Returns them."""
    from ..api import load
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
    data = read_cache()
    entry = data.setdefault(fingerprint(), {})
    entry.setdefault("backends", {}).update(results)
    write_cache(data)
    return results


def replace_efficiency(profile, backend: str, values: dict[str, float]):
    """``profile`` with ``backend``'s calibrated efficiencies replaced (empty: defaults)."""
    from dataclasses import replace

    eff = {k: v for k, v in profile.efficiency.items() if k != backend}
    if values:
        eff[backend] = values
    return replace(profile, efficiency=eff)
