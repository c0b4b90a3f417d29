"""The ``cpu`` backend's start-up and per-op profile (the speed comparison with llama.cpp is
``ondevice bench --peers``).

- first start: a fresh process with an empty numba cache (every kernel JIT-compiled) until
  the first generated token; later start: the same with the cache the first one wrote;
- decode profile: wall time per token by op kind (single stream, after warm-up), so a missed
  goal shows where the time goes.

Prints JSON (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time
t0 = time.perf_counter()
import ondevice
from ondevice.sampling import SamplingParams
m = ondevice.load(sys.argv[1], backend="cpu", kv_memory="64MiB", quiet=True)
t1 = time.perf_counter()
next(iter(m.stream([1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0))))
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
"""


def start_times(model: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            runs.append({"process_s": time.perf_counter() - t, "load_s": float(out[0]),
                         "first_token_s": float(out[1])})
    return {"first_start": runs[0], "later_start": runs[1]}


def decode_profile(model: str, prompt_tokens: int, tokens: int) -> dict:
    import numpy as np

    import ondevice
    from ondevice.sampling import SamplingParams

    m = ondevice.load(model, backend="cpu", kv_memory="64MiB", quiet=True)
    ops = m.runtime.backend.ops
    spent: dict[str, float] = collections.defaultdict(float)
    for name in ("embedding", "rms_norm", "linear", "rope", "write_kv", "paged_attention",
                 "silu_mul", "add", "take_rows", "logits"):
        fn = getattr(ops, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            r = _fn(*a, **k)
            spent[_name] += time.perf_counter() - t
            return r
        setattr(ops, name, timed)
    prompt = np.random.default_rng(0).integers(100, 40000, prompt_tokens).tolist()
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    list(m.stream(prompt, params))  # warm-up
    best = None
    for _ in range(3):
        spent.clear()
        stamps = []
        for _c in m.stream(prompt, params):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:
                spent.clear()  # decode only: from the first token on
        wall = (stamps[-1] - stamps[0]) / tokens
        if best is None or wall < best["ms_per_token"] / 1e3:
            ops_ms = {k: v / tokens * 1e3 for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
            best = {"ms_per_token": wall * 1e3, "ops_ms_per_token": ops_ms,
                    "other_ms_per_token": wall * 1e3 - sum(ops_ms.values()),
                    "threads": m.runtime.backend.threads}
    m.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True, help="model directory (e.g. the Q4_1 import)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    report = {"model": a.model, "start": start_times(a.model),
              "decode_profile": decode_profile(a.model, a.prompt_tokens, a.tokens)}
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
