"""Time and peak RSS of `ondevice convert` on the packaged SmolLM2 GGUF, per output format,
side by side with a naive baseline in the same run: `gguf.GGUFReader` + dequantizing every
tensor into memory (what a converter that does not stream would hold). Prints JSON.

    python benchmarks/bench_convert.py [--formats f32,f16,q8,q4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ondevice.default_model import packaged_gguf

CHILD_CONVERT = """
import sys, time
from ondevice.converters import convert
from ondevice.memory import peak_rss_bytes
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3], progress=False)
print(time.perf_counter() - t, peak_rss_bytes())
"""
CHILD_BASELINE = """
import sys, time
import gguf
from ondevice.memory import peak_rss_bytes
t = time.perf_counter()
r = gguf.GGUFReader(sys.argv[1])
tensors = [gguf.quants.dequantize(x.data, x.tensor_type) for x in r.tensors]
print(time.perf_counter() - t, peak_rss_bytes())
"""


def child(code: str, *args: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="f32,f16,q8,q4")
    args = ap.parse_args()
    src = packaged_gguf()
    base_s, base_rss = child(CHILD_BASELINE, str(src))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            out = Path(tmp) / fmt
            s, rss = child(CHILD_CONVERT, str(src), str(out), fmt)
            size = sum(f.stat().st_size for f in out.iterdir())
            rows[fmt] = {"seconds": round(s, 2), "peak_rss_mib": round(rss / 2**20, 1),
                         "output_mib": round(size / 2**20, 1),
                         "rss_ratio_vs_baseline": round(rss / base_rss, 3)}
    print(json.dumps({
        "benchmark": "convert",
        "source": src.name, "source_mib": round(src.stat().st_size / 2**20, 1),
        "machine": {"cpus": os.cpu_count()},
        "baseline_gguf_reader_dequantize_all": {"seconds": round(base_s, 2),
                                                "peak_rss_mib": round(base_rss / 2**20, 1)},
        "convert": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
