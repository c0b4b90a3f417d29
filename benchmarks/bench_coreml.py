"""Core ML export of the default model per quantization: export time, peak RSS, package size
on disk, and the NumPy MIL interpreter's agreement with the NumPy backend (``verify-coreml``:
2 prefill chunks, then greedy decode steps through a shuffled block table). Each export runs
in its own process so that its peak RSS is its own. Prints JSON and saves
``benchmarks/results/coreml.json``.

    python benchmarks/bench_coreml.py [--quantize f16,int8,int4] [--max-context 2048] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "coreml.json"

CHILD_EXPORT = """
import sys, time, json
from ondevice.converters.coreml import export_coreml
from ondevice.memory import peak_rss_bytes
t = time.perf_counter()
export_coreml(sys.argv[1], sys.argv[2], quantize=sys.argv[3], max_context=int(sys.argv[4]),
              progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}))
"""
CHILD_VERIFY = """
import sys, json
from ondevice.converters.coreml.verify import verify_coreml
from ondevice.memory import peak_rss_bytes
r = verify_coreml(sys.argv[1], sys.argv[2], steps=int(sys.argv[3]))
d = r.to_dict()
d["peak_rss"] = peak_rss_bytes()
print(json.dumps(d))
"""


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", default="f16,int8,int4")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--model", default=None, help="model directory [default model, f32]")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    from ondevice.default_model import resolve_model

    src = resolve_model(args.model, quiet=True)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.quantize.split(","):
            pkg = Path(tmp) / q / "model.mlpackage"
            ex = _child(CHILD_EXPORT, str(src), str(pkg), q, str(args.max_context))
            ver = _child(CHILD_VERIFY, str(pkg), str(src), str(args.steps))
            manifest = json.loads((pkg.parent / "ondevice-manifest.json").read_text())
            n = len(ver["reference_tokens"])
            rows[q] = {
                "export_seconds": round(ex["seconds"], 1),
                "export_peak_rss_mib": round(ex["peak_rss"] / 2**20, 1),
                "package_mib": round(_du(pkg) / 2**20, 1),
                "weight_bytes": manifest["weight_bytes"],
                "verify": {
                    "passed": ver["passed"],
                    "max_abs_logit_error": round(ver["max_abs_logit_error"], 4),
                    "max_abs_kv_error": round(ver["max_abs_kv_error"], 4),
                    "greedy_agreement": f"{round(ver['greedy_agreement'] * n)}/{n}",
                    "greedy_identical": ver["greedy_identical"],
                    "decode_steps": len(ver["steps"]) - 2,
                    "seconds": ver["seconds"],
                    "peak_rss_mib": round(ver["peak_rss"] / 2**20, 1),
                    "mil_op_types": len(ver["op_types"]),
                },
            }
            print(f"{q}: {rows[q]}", file=sys.stderr)
    result = {
        "benchmark": "coreml",
        "model": src.name,
        "source_mib": round(src_bytes / 2**20, 1),
        "max_context": args.max_context,
        "machine": {"cpus": os.cpu_count(), "system": platform.system(),
                    "machine": platform.machine()},
        "note": "Core ML prediction needs macOS 15+; the agreement figures are the NumPy MIL "
                "interpreter running the saved package, against the NumPy backend (float32).",
        "exports": rows,
    }
    print(json.dumps(result, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
