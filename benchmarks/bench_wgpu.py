"""wgpu backend benchmark: GEMV weight bandwidth of the decode shaders (f32, f16, q4) against
NumPy's GEMV on the same shapes in the same run and against a read-only streaming kernel, decode and prefill tok/s of the default model
(f32, f16, q4), and where a decode step's time goes (recording, submit, kernels, readback).

Prints JSON and writes it to benchmarks/results/wgpu.json. Usage::

    .venv/bin/python benchmarks/bench_wgpu.py [--f32 DIR] [--q4 DIR] [--steps N] [--prompt N]

``--f32`` defaults to the default model (converted into ONDEVICE_HOME on first use); ``--q4``
to a q4 (group 64) copy, which is made with ``ondevice.converters.convert`` when missing.
Timings on a shared machine are noisy: every figure is the median of several runs, and the
NumPy baseline is measured between the shader runs so that both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import wgpu

from ondevice.backends.wgpu import WgpuBackend, WgpuOptions, choose_adapter
from ondevice.batch import BatchInput
from ondevice.modeldir import ModelDir

RESULTS = Path(__file__).parent / "results" / "wgpu.json"
GEMV_SHAPES = {"gate/up 1536x576": ("gate_proj",), "down 576x1536": ("down_proj",),
               "lm_head 49152x576": None}


def _exact_bytes(m) -> int:
    """Bytes the shader reads for a matrix (the buffers are padded to 16 bytes at most)."""
    if m.quant is None:
        return m.out_features * m.in_features * (2 if m.wtype == "f16" else 4)
    gs, bits = m.quant
    return m.out_features * (m.in_features * bits // 8 + m.in_features // gs * 8)


def bench_gemv(be: WgpuBackend, reps: int) -> dict:
    """GB/s of weight bytes for one-row GEMVs: ``reps`` products recorded into one submit."""
    ops = be.ops
    layer = be.params.layers[0]
    out = {}
    for label, field in GEMV_SHAPES.items():
        m = be.params.lm_head if field is None else getattr(layer, field[0])
        x = ops.from_host(np.random.default_rng(0).standard_normal((1, m.in_features),
                                                                   dtype=np.float32))
        ops.linear(x, m)
        ops.flush()  # compile and warm
        n = max(1, reps // 8) if field is None else reps
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                ops.linear(x, m)
            ops.flush()
            times.append((time.perf_counter() - t0) / n)
        t = statistics.median(times)
        nbytes = _exact_bytes(m)
        out[label] = {"seconds": t, "weight_bytes": nbytes, "GBps": nbytes / t / 1e9}
    return out


def bench_numpy_gemv(config, reps: int) -> dict:
    rng = np.random.default_rng(0)
    shapes = {"gate/up 1536x576": (config.intermediate_size, config.hidden_size),
              "down 576x1536": (config.hidden_size, config.intermediate_size),
              "lm_head 49152x576": (config.vocab_size, config.hidden_size)}
    out = {}
    for label, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        x = rng.standard_normal(shape[1], dtype=np.float32)
        w @ x
        n = max(1, reps // 8) if shape[0] > 10000 else reps
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                w @ x
            times.append((time.perf_counter() - t0) / n)
        t = statistics.median(times)
        out[label] = {"seconds": t, "weight_bytes": w.nbytes, "GBps": w.nbytes / t / 1e9}
    return out


# A kernel that only reads: each invocation sums 16 vec4s of a buffer. No GEMV can read its
# weights faster than this on the same adapter, so it is the ceiling the GEMV figures are
# measured against (on lavapipe every loaded component costs a per-lane scalar load).
STREAM_WGSL = """
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 16u; k++) { s += w[i * 16u + k]; }
    y[i] = s.x + s.y + s.z + s.w;
}
"""


def bench_stream(be: WgpuBackend, mib: int = 64) -> dict:
    """GB/s of a read-only streaming kernel over ``mib`` MiB (the adapter's read ceiling)."""
    dev = be.dev
    nbytes = mib << 20
    data = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    src = dev.buffer(data)
    n_inv = nbytes // (16 * 16)
    out = dev.device.create_buffer(size=n_inv * 4, usage=wgpu.BufferUsage.STORAGE
                                   | wgpu.BufferUsage.COPY_SRC)
    module = dev.device.create_shader_module(code=STREAM_WGSL)
    pipe = dev.device.create_compute_pipeline(
        layout="auto", compute={"module": module, "entry_point": "main"})
    group = dev.device.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": {"buffer": src, "offset": 0, "size": src.size}},
        {"binding": 1, "resource": {"buffer": out, "offset": 0, "size": out.size}}])
    groups = n_inv // 64
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        enc = dev.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, group)
        cp.dispatch_workgroups(min(groups, 65535), -(-groups // 65535), 1)
        cp.end()
        dev.queue.submit([enc.finish()])
        dev.queue.read_buffer(out, 0, 4)
        times.append(time.perf_counter() - t0)
    t = min(times[1:])
    t0 = time.perf_counter()
    data.sum()
    return {"bytes": nbytes, "wgpu_GBps": nbytes / t / 1e9,
            "numpy_sum_GBps": nbytes / (time.perf_counter() - t0) / 1e9}


def bench_model(be: WgpuBackend, prompt_len: int, steps: int) -> dict:
    """Prefill tok/s of a ``prompt_len`` prompt and decode tok/s over ``steps`` steps, with
    the decode step split into recording, submit, wait (kernels + readback) and readback."""
    bs, vocab = be.block_size, be.config.vocab_size
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, vocab, prompt_len).tolist()
    blocks = list(range(-(-(prompt_len + steps + 1) // bs)))
    # Warm-up: compiles every pipeline the prefill and decode shapes use.
    be.forward(BatchInput.build([(prompt[:prompt_len], 0, blocks)], bs))
    be.forward(BatchInput.build([([5], prompt_len, blocks)], bs))
    t0 = time.perf_counter()
    logits = be.forward(BatchInput.build([(prompt, 0, blocks)], bs))
    prefill_s = time.perf_counter() - t0
    tok = int(logits[-1].argmax())
    walls, flushes = [], []
    for i in range(steps):
        batch = BatchInput.build([([tok], prompt_len + i, blocks)], bs)
        t0 = time.perf_counter()
        logits = be.forward(batch)
        walls.append(time.perf_counter() - t0)
        flushes.append(dict(be.ops.last_flush))
        tok = int(logits[-1].argmax())
    # Readback alone: the logits' copy and map with no kernels before it.
    lm = be.params.lm_head
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
    buf = be.dev.take(lm.out_features * 4, usage)
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        be.ops.flush([(buf, lm.out_features * 4)])
        reads.append(time.perf_counter() - t0)
    be.dev.give(buf)
    wall = statistics.median(walls)
    submit = statistics.median(f["submit_s"] for f in flushes)
    wait = statistics.median(f["wait_readback_s"] for f in flushes)
    readback = statistics.median(reads)
    return {
        "prefill_tokens": prompt_len, "prefill_s": prefill_s,
        "prefill_tok_per_s": prompt_len / prefill_s,
        "decode_steps": steps, "decode_step_s": wall, "decode_tok_per_s": 1 / wall,
        "dispatches_per_decode_step": flushes[-1]["dispatches"],
        "decode_step_breakdown_s": {
            "record (Python, encoding)": max(0.0, wall - submit - wait),
            "submit": submit,
            "kernels (wait minus readback)": max(0.0, wait - readback),
            "readback (copy + map of the logits)": readback,
        },
    }


def _q4_dir(f32_dir: Path, q4: str | None) -> Path:
    if q4:
        return Path(q4)
    out = f32_dir.parent / (f32_dir.name.replace("-f32", "") + "-q4")
    if not (out / "config.json").exists():
        from ondevice.converters import convert

        convert(f32_dir, out, quantize="q4", group_size=64, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--f32", help="float32 model directory [the default model]")
    ap.add_argument("--q4", help="q4 model directory [made from --f32 when missing]")
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per dtype")
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens")
    ap.add_argument("--reps", type=int, default=16, help="GEMVs per timed submit")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.f32:
        f32_dir = Path(args.f32)
    else:
        from ondevice.default_model import default_model_dir

        f32_dir = Path(default_model_dir("f32", quiet=True))
    q4_dir = _q4_dir(f32_dir, args.q4)
    adapter = choose_adapter()
    result: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()},
        "adapter": {k: str(v) for k, v in dict(adapter.info).items()},
        "gemv": {}, "model": {},
    }
    blocks = 16
    for label, path, dtype in (("f32", f32_dir, "float32"), ("f16", f32_dir, "float16"),
                               ("q4", q4_dir, "float32")):
        md = ModelDir(path)
        be = WgpuBackend(md, num_blocks=blocks, block_size=16,
                         options=WgpuOptions(dtype=dtype))
        if label == "f32":
            result["stream_read_ceiling"] = bench_stream(be)
        result["gemv"][f"wgpu {label}"] = bench_gemv(be, args.reps)
        result["gemv"][f"numpy f32 (during {label})"] = bench_numpy_gemv(md.config, args.reps)
        result["model"][label] = bench_model(be, args.prompt, args.steps)
        be.close()
        print(json.dumps({label: result["model"][label]}), flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=str)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
