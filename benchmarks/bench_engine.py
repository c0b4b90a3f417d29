"""Continuous batching, KV utilization and prefix caching on the NumPy backend, as JSON.

1. Aggregate decode throughput with 1, 4, 16 and 32 concurrent greedy requests vs the same
   requests run one after another (the baseline, same run).
2. KV utilization on a mixed-length workload (live token slots / allocated slots, averaged over
   engine steps) vs a contiguous max-context-per-request allocation of the same requests.
3. Time to first token of a request whose first 1,024 tokens are a cached shared prefix vs the
   same request with prefix caching off.

    python benchmarks/bench_engine.py [--model DIR] [--gen-tokens 64] [--skip-sequential]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import ondevice
from ondevice.engine import Engine
from ondevice.memory import peak_rss_bytes
from ondevice.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "How do vaccines work?", "What is a prime number?",
    "Give me three tips for better sleep.", "Why is the sky blue?", "What is Python used for?",
    "Summarize the plot of Romeo and Juliet.", "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?", "Describe a healthy breakfast.",
    "What is machine learning?", "How do airplanes stay in the air?",
    "What is the difference between weather and climate?", "Name five fruits rich in vitamin C.",
]


def make_engine(model: ondevice.Model, caching: bool = True, max_num_seqs: int = 64) -> Engine:
    rt = model.runtime
    rt.loop.shutdown()  # the benchmark drives engines directly, on this thread
    return Engine(rt.backend, rt.tokenizer, context_length=rt.config.context_length,
                  enable_prefix_caching=caching, max_num_seqs=max_num_seqs,
                  model_id=rt.model_id)


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, trace=None):
    """Submit all, step to the end; (generated tokens, seconds, per-request first-token s)."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    n = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            n += len(o.token_ids)
            first.setdefault(o.request_id, now)
        if trace is not None:
            trace(engine)
    return n, time.perf_counter() - t0, [first[i] for i in ids]


def throughput(model, engine, gen: int, levels: list[int], sequential: bool) -> dict:
    tok = model.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]
                                 + (" Please answer briefly." if i >= len(QUESTIONS) else "")}])
               for i in range(max(levels))]
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    run(engine, prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    engine.kv.reset_prefix_cache()  # measure without help from the prefix cache
    seq_times = []
    if sequential:
        for p in prompts:
            n, dt, _ = run(engine, [p], params)
            seq_times.append((n, dt))
            engine.kv.reset_prefix_cache()
    out = {}
    for c in levels:
        n, dt, _ = run(engine, prompts[:c], params)
        engine.kv.reset_prefix_cache()
        row = {"requests": c, "generated_tokens": n, "seconds": round(dt, 3),
               "aggregate_tok_per_s": round(n / dt, 2)}
        if seq_times:
            sn = sum(x[0] for x in seq_times[:c])
            st = sum(x[1] for x in seq_times[:c])
            row["sequential_tok_per_s"] = round(sn / st, 2)
            row["speedup_vs_sequential"] = round((n / dt) / (sn / st), 2)
        out[str(c)] = row
    if seq_times:
        single = seq_times[0][0] / seq_times[0][1]
        out["speedup_16_vs_single_stream"] = round(out["16"]["aggregate_tok_per_s"] / single, 2) \
            if "16" in out else None
    return out


def utilization(model, engine, context: int) -> dict:
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(100, vocab, int(n)).tolist() for n in rng.integers(20, 600, 32)]
    gens = rng.integers(16, 128, 32)
    samples_paged, samples_contig, samples_reserved = [], [], []

    def trace(e: Engine) -> None:
        running = [s for s in e.scheduler.running if s.seq_id in e.kv]
        if not running:
            return
        live = sum(e.kv.num_tokens(s.seq_id) for s in running)
        samples_paged.append(e.kv_utilization())
        samples_contig.append(live / (len(running) * context))
        reserved = sum(len(s.request.prompt_ids) + s.request.params.max_tokens for s in running)
        samples_reserved.append(live / reserved)

    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=int(g), temperature=0, ignore_eos=True))
           for p, g in zip(prompts, gens, strict=True)]
    while engine.has_unfinished():
        engine.step()
        trace(engine)
    engine.kv.reset_prefix_cache()
    return {
        "requests": len(ids), "prompt_tokens": [20, 600], "gen_tokens": [16, 128],
        "block_size": engine.block_size, "steps": len(samples_paged),
        "seconds": round(time.perf_counter() - t0, 2),
        "paged_kv_utilization": round(float(np.mean(samples_paged)), 4),
        "contiguous_max_context_utilization": round(float(np.mean(samples_contig)), 4),
        "contiguous_prompt_plus_max_tokens_utilization": round(float(np.mean(samples_reserved)), 4),
        "context_length": context,
    }


def ttft(model, prefix_tokens: int) -> dict:
    tok = model.tokenizer
    text = " ".join(QUESTIONS) + " "
    base = tok.encode(text * (prefix_tokens // len(tok.encode(text)) + 2))[:prefix_tokens]
    asks = [tok.encode(" Question: " + q) for q in QUESTIONS[:4]]
    params = SamplingParams(max_tokens=1, temperature=0)
    out = {"prefix_tokens": prefix_tokens}
    for caching in (False, True):
        engine = make_engine(model, caching=caching)
        run(engine, [base + tok.encode(" Warm-up question?")], params)  # fills the cache (if on)
        times = [run(engine, [base + a], params)[2][0] for a in asks]
        out["ttft_seconds_caching_on" if caching else "ttft_seconds_caching_off"] = round(
            float(np.median(times)), 4)
        if caching:
            out["prefix_hit_tokens"] = engine.stats()["prefix_cache_hits"]
    out["speedup"] = round(out["ttft_seconds_caching_off"] / out["ttft_seconds_caching_on"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--skip-sequential", action="store_true")
    args = ap.parse_args()
    model = ondevice.load(args.model, backend="numpy", quiet=True)
    engine = make_engine(model)
    levels = [int(x) for x in args.levels.split(",")]
    result = {
        "benchmark": "engine",
        "model": str(model.path),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "kv_blocks": engine.kv.num_blocks,
        "throughput": throughput(model, engine, args.gen_tokens, levels, not args.skip_sequential),
        "kv_utilization": utilization(model, engine, model.config.context_length),
        "ttft_shared_prefix": ttft(model, 1024),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
