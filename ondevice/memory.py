"""Process memory figures for benchmarks and stats."""

from __future__ import annotations

import sys

import psutil


def _proc_status_kib(path: str, key: str) -> int | None:
    """A ``Key:   N kB`` line of a /proc file, in KiB (None where there is no /proc)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    """Memory the OS can give without swapping (psutil's ``available``; MemAvailable on
    Linux). The one source of this figure for the runtime, the policy and the bench."""
    return int(psutil.virtual_memory().available)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM belongs to the current address space, so unlike ``ru_maxrss`` it does not
    inherit the parent's peak when a large process spawns this one (vfork + exec).
    """
    kib = _proc_status_kib("/proc/self/status", "VmHWM:")
    if kib is not None:
        return kib * 1024
    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows keeps the peak working set
    if peak is not None:
        return int(peak)
    import resource  # POSIX without /proc (macOS): ru_maxrss, in bytes there

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
