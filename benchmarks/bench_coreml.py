"""Core ML export of the default model per quantization: export time, peak RSS, package size
on disk, and the NumPy MIL interpreter's agreement with the NumPy backend (``verify-coreml``:
2 prefill chunks, then greedy decode steps through a shuffled block table). Each export runs
in its own process so that its peak RSS is its own. Baseline for int8/int4, in the same run:
the same symmetric per-block quantization applied to the NumPy backend's weights, against its
float32 self over the same prompt and steps. Prints JSON and saves ``benchmarks/results/coreml.json``.

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
# Baseline in the same run: the same quantization scheme (symmetric, one float16 scale per 32
# input channels) applied to the weights of the NumPy backend, which then runs in float32
# against its unquantized self over the same prompt and greedy steps. The package's figures
# minus these are what the Core ML program itself adds. (The runtime's own MLX-affine q4 with
# group 32 is no reference here: the default model comes from a Q4_1 GGUF, whose weights lie
# on exactly that grid, so it reproduces them without loss.)
CHILD_BASELINE = """
import sys, json
import numpy as np
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.bench.verify_coreml import PROMPT
from ondevice.modeldir import ModelDir
src, levels, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def symmetric(w):
    blocks = w.reshape(w.shape[0], -1, 32)
    scale = (np.abs(blocks).max(-1, keepdims=True) / levels).astype(np.float16).astype(np.float32)
    scale[scale == 0] = 1
    w[...] = (np.clip(np.round(blocks / scale), -levels, levels) * scale).reshape(w.shape)

md = ModelDir(src)
ref = NumpyBackend(md, num_blocks=8, block_size=16)
q = NumpyBackend(md, num_blocks=8, block_size=16)
p = q.params
symmetric(p.embed)  # the tied head shares this array
for layer in p.layers:
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj,
                layer.up_proj, layer.down_proj):
        symmetric(lin.w)
if p.lm_head.w is not p.embed:
    symmetric(p.lm_head.w)
ids = md.tokenizer.encode(PROMPT)[:21]
new, start, err, agree, n = ids, 0, 0.0, 0, 0
for _ in range(steps + 1):
    b = BatchInput.build([(new, start, list(range(8)))], 16)
    a, c = ref.forward(b)[-1], q.forward(b)[-1]
    err = max(err, float(np.abs(a - c).max()))
    agree += int(a.argmax() == c.argmax())
    n += 1
    start += len(new)
    new = [int(a.argmax())]
print(json.dumps({"max_abs_logit_error": round(err, 4), "greedy_agreement": f"{agree}/{n}"}))
"""
CHILD_VERIFY = """
import sys, json
from ondevice.bench.verify_coreml import verify_coreml
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
            if q != "f16":
                levels = {"int8": "127", "int4": "7"}[q]
                rows[q]["baseline_numpy_same_quantization"] = _child(
                    CHILD_BASELINE, str(src), levels, str(args.steps))
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
