"""``ondevice bench``: speed of every backend and quantization on one model, with peers.

For each backend x quantization the model is loaded once and driven through the engine on
this thread: a warm-up, then ``repeats`` single requests (prefill tok/s, time to first
token, decode tok/s; the best run counts, as the machine is shared), then one batch per
concurrency level (aggregate tok/s, KV utilization sampled every step). Peak RSS is measured
per configuration. The memory-bandwidth ceiling is the bandwidth of a plain NumPy streaming
read divided by the bytes of weights a decode step reads in that storage format.

With ``speculative`` set, each configuration also runs its single request and every
concurrency level with speculative decoding, each next to a run without it, and reports the
ratios and the acceptance rate. The prompts are random tokens, so prompt lookup has little to
copy here; ``benchmarks/bench_speculative.py`` measures input-grounded tasks.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..backends import KNOWN, available_backends, backend_class
from ..memory import peak_rss_bytes
from ..sampling import SamplingParams
from ..settings import EngineConfig, SpeculativeConfig
from .common import (
    BenchError,
    _group_size,
    current_rss_bytes,
    machine_info,
    make_prompts,
    model_variant,
    reset_peak_rss,
    source_gguf,
    weight_bytes_per_token,
)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``backends`` empty means every available backend."""

    model: str | None = None
    backends: tuple[str, ...] = ()
    quantize: tuple[str, ...] = ("f32", "q4")
    concurrency: tuple[int, ...] = (1, 4, 16)
    prompt_tokens: int = 256
    gen_tokens: int = 64
    repeats: int = 2
    peers: bool = False
    threads: int | None = None  # for peers; None = the cores this process may use
    group_size: int = 64
    kv_memory: str | None = None
    bandwidth_mib: int = 256
    seed: int = 0
    speculative: SpeculativeConfig | None = None  # also measure with it, side by side
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.prompt_tokens < 1 or self.gen_tokens < 2:
            raise BenchError("--prompt-tokens must be >= 1 and --gen-tokens >= 2")
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchError("--concurrency needs positive request counts, e.g. 1,4,16")
        if self.repeats < 1:
            raise BenchError("--repeats must be >= 1")
        if not self.quantize:
            raise BenchError("--quantize needs at least one of f32, f16, q8, q4")


# -- memory bandwidth ----------------------------------------------------------------------
def measure_bandwidth(mib: int = 256, repeats: int = 5) -> dict:
    """Streaming-read bandwidth of this machine as NumPy sees it, best of ``repeats``.

    Two reads of a buffer far larger than the caches: a single-threaded sum, and a
    matrix-vector product through BLAS (which uses every core, as decoding does). The larger
    is the ceiling's bandwidth.
    """
    cols = 4096
    rows = max(1, (mib << 20) // (4 * cols))
    a = np.ones((rows, cols), np.float32)  # ones, not empty: every page must be faulted in
    x = np.ones(cols, np.float32)
    nbytes = a.nbytes

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    sum_gbps = best(lambda: np.add.reduce(a, axis=None))
    gemv_gbps = best(lambda: a @ x)
    return {"gb_per_s": max(sum_gbps, gemv_gbps), "sum_gb_per_s": sum_gbps,
            "gemv_gb_per_s": gemv_gbps, "buffer_bytes": nbytes, "repeats": repeats}


# -- our engine ----------------------------------------------------------------------------
def drive(engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Submit every prompt at once and step the engine to the end on this thread."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts = dict.fromkeys(ids, 0)
    util: list[float] = []
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                counts[o.request_id] += len(o.token_ids)
        if engine.scheduler.running:
            util.append(engine.kv_utilization())
    end = time.perf_counter()
    engine.kv.reset_prefix_cache()  # the next run prefills from scratch
    return {"t0": t0, "end": end, "ids": ids, "first": first, "last": last, "counts": counts,
            "kv_utilization": float(np.mean(util)) if util else 0.0}


def single_stream(engine, prompt: list[int], gen: int) -> dict:
    r = drive(engine, [prompt], SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
    rid = r["ids"][0]
    ttft = r["first"][rid] - r["t0"]
    decode_s = r["last"][rid] - r["first"][rid]
    n = r["counts"][rid]
    return {"ttft_s": ttft, "prefill_tok_per_s": len(prompt) / ttft,
            "decode_tok_per_s": (n - 1) / decode_s if decode_s > 0 else math.nan,
            "generated": n}


def concurrent(engine, prompts: list[list[int]], gen: int) -> dict:
    r = drive(engine, prompts, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
    n = sum(r["counts"].values())
    wall = r["end"] - r["t0"]
    ttfts = [r["first"][i] - r["t0"] for i in r["ids"]]
    return {"requests": len(prompts), "generated": n, "seconds": wall,
            "aggregate_tok_per_s": n / wall, "mean_ttft_s": float(np.mean(ttfts)),
            "max_ttft_s": float(np.max(ttfts)), "kv_utilization": r["kv_utilization"]}


def bench_config(path: Path, backend: str, quantize: str, s: BenchSettings,
                 tick: Callable[[str], None]) -> dict:
    """Every figure of one backend x quantization (the model at ``path``)."""
    from ..api import load
    from ..engine import Engine

    gc.collect()
    windowed = reset_peak_rss()
    rss_before = current_rss_bytes()
    t0 = time.perf_counter()
    model = load(path, backend=backend, kv_memory=s.kv_memory, quiet=True,
                 max_num_seqs=max(max(s.concurrency), 1), options=_backend_options(backend, s),
                 engine=EngineConfig(speculative=s.speculative))
    load_s = time.perf_counter() - t0
    try:
        rt = model.runtime
        rt.loop.shutdown()  # this thread drives its own engine over the loaded backend
        engine = Engine(rt.backend, rt.tokenizer, context_length=rt.config.context_length,
                        max_num_seqs=max(s.concurrency), model_id=rt.model_id)
        need = max(s.concurrency) * (s.prompt_tokens + s.gen_tokens)
        capacity = rt.backend.num_blocks * rt.backend.block_size
        if s.prompt_tokens + s.gen_tokens >= engine.context_limit:
            raise BenchError(f"--prompt-tokens + --gen-tokens exceed the context "
                             f"({engine.context_limit} tokens)")
        special = set(rt.tokenizer.eos_token_ids)
        prompts = make_prompts(rt.config.vocab_size, special, max(s.concurrency) + s.repeats,
                               s.prompt_tokens, s.seed)
        single_prompt = prompts[0]
        drive(engine, [prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        tick(f"{backend}-{quantize} warm-up")
        runs = [single_stream(engine, single_prompt, s.gen_tokens) for _ in range(s.repeats)]
        tick(f"{backend}-{quantize} single stream")
        best = max(runs, key=lambda r: r["decode_tok_per_s"])
        curve = []
        for c in s.concurrency:
            curve.append(concurrent(engine, prompts[s.repeats:s.repeats + c], s.gen_tokens))
            tick(f"{backend}-{quantize} x{c}")
        be = rt.backend
        out = {
            "backend": backend, "quantize": quantize, "model_dir": str(path),
            "group_size": _group_size(path),
            "device": getattr(be, "device_name", None) or backend_class(backend).availability()[1],
            "load_seconds": load_s,
            "decode_tok_per_s": best["decode_tok_per_s"],
            "prefill_tok_per_s": max(r["prefill_tok_per_s"] for r in runs),
            "ttft_s": min(r["ttft_s"] for r in runs),
            "runs": runs,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_windowed": windowed,
            "rss_before_load_bytes": rss_before,
            "kv_pool_bytes": sum(n * b for n, b in zip(be.group_blocks,
                                                       be.kv_group_block_bytes(), strict=True)),
            "kv_pool_tokens": capacity,
            "kv_tokens_needed_at_max_concurrency": need,
            # KV utilization of the largest batch: live token slots / allocated slots.
            "kv_utilization": curve[-1]["kv_utilization"],
            "concurrency": curve,
            "backend_description": be.describe(),  # threads, packed weight bytes (cpu)
        }
        if s.speculative is not None:
            out["speculative"] = _speculative(rt, engine, prompts, s, f"{backend}-{quantize}",
                                              tick)
        return out
    finally:
        model.close()
        del model
        gc.collect()


def _speculative(rt, plain, prompts: list[list[int]], s: BenchSettings, name: str,
                 tick: Callable[[str], None]) -> dict:
    """The same single-stream and concurrent runs with speculation, each next to a run
    without it (alternating, same backend and prompts): decode and aggregate ratios."""
    from ..engine import Engine

    engine = Engine(rt.backend, rt.tokenizer, context_length=rt.config.context_length,
                    max_num_seqs=max(s.concurrency), model_id=rt.model_id,
                    speculative=s.speculative, draft_backend=rt.draft_backend)
    drive(engine, [prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    singles = []
    for _ in range(s.repeats):
        off = single_stream(plain, prompts[0], s.gen_tokens)
        on = single_stream(engine, prompts[0], s.gen_tokens)
        singles.append({"off_decode_tok_per_s": off["decode_tok_per_s"],
                        "on_decode_tok_per_s": on["decode_tok_per_s"],
                        "ratio": on["decode_tok_per_s"] / off["decode_tok_per_s"]})
    tick(f"{name} speculative single stream")
    curve = []
    for c in s.concurrency:
        batch = prompts[s.repeats:s.repeats + c]
        off, on = concurrent(plain, batch, s.gen_tokens), concurrent(engine, batch, s.gen_tokens)
        curve.append({"requests": c, "off_aggregate_tok_per_s": off["aggregate_tok_per_s"],
                      "on_aggregate_tok_per_s": on["aggregate_tok_per_s"],
                      "ratio": on["aggregate_tok_per_s"] / off["aggregate_tok_per_s"]})
        tick(f"{name} speculative x{c}")
    spec = s.speculative
    stats = engine.stats()
    return {
        "method": spec.method, "num_tokens": spec.num_tokens, "draft_model": spec.draft_model,
        "decode_ratio": statistics.median(r["ratio"] for r in singles), "runs": singles,
        "concurrency": curve,
        **{k: v for k, v in stats.items() if k.startswith("spec_")},
    }


def _backend_options(backend: str, s: BenchSettings) -> dict | None:
    """The ``cpu`` backend runs its kernels on as many threads as llama.cpp gets."""
    return {"threads": s.threads} if backend == "cpu" and s.threads else None


# -- the whole run ---------------------------------------------------------------------------
def plan_backends(requested: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why not}) from ``requested`` (empty: all available).

    Only the backends asked for are probed when there is a list: probing a GPU backend
    means opening an adapter, which is slow and beside the point then.
    """
    if not requested:
        avail = available_backends()
        run = [name for name, (ok, _) in avail.items() if ok]
        if not run:
            raise BenchError("no backend is available to benchmark")
        return run, {name: why for name, (ok, why) in avail.items() if not ok}
    for name in requested:
        if name not in KNOWN:
            raise BenchError(f"unknown backend {name!r} (known: {', '.join(KNOWN)})")
        backend_class(name)  # BackendUnavailableError says why not
    return list(requested), {}


def run_bench(s: BenchSettings, *, progress: bool = True) -> dict:
    """Run the benchmark and return its report (see ``ondevice bench --help``)."""
    from tqdm import tqdm

    from . import peers as peer_mod

    s.check()
    backends, skipped = plan_backends(s.backends)
    threads = s.threads or peer_mod.default_threads()
    per_config = 2 + len(s.concurrency)
    if s.speculative is not None:
        per_config += 1 + len(s.concurrency)
    jobs = len(backends) * len(s.quantize) * per_config + 1
    if s.peers:
        jobs += 1 + len(s.quantize)
    bar = tqdm(total=jobs, desc="bench", unit="step", file=sys.stderr, disable=not progress,
               leave=False)

    def tick(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    try:
        paths = {q: model_variant(s.model, q, group_size=s.group_size,
                                  quiet=not progress) for q in s.quantize}
        bandwidth = measure_bandwidth(s.bandwidth_mib)
        tick("memory bandwidth")
        results = []
        for q in s.quantize:
            per_token = weight_bytes_per_token(paths[q])
            ceiling = bandwidth["gb_per_s"] * 1e9 / per_token
            for b in backends:
                r = bench_config(paths[q], b, q, s, tick)
                r["weight_bytes_per_token"] = per_token
                r["ceiling_tok_per_s"] = ceiling
                r["fraction_of_ceiling"] = r["decode_tok_per_s"] / ceiling
                results.append(r)
        peer_results: list[dict] = []
        if s.peers:
            peer_results = peer_mod.run_peers(
                s, paths, source_gguf(s.model), threads, tick)
        report = {
            "schema": "ondevice.bench", "schema_version": SCHEMA_VERSION,
            "model": {"requested": s.model or "default (SmolLM2-135M-Instruct)",
                      "variants": {q: str(p) for q, p in paths.items()},
                      "gguf": str(source_gguf(s.model) or "") or None},
            "machine": machine_info(),
            "settings": {**{k: v for k, v in asdict(s).items() if k not in ("extra", "model")},
                         "threads": threads, "peers": s.peers},
            "memory_bandwidth": bandwidth,
            "results": results,
            "unavailable_backends": skipped,
            "peers": peer_results,
        }
        add_ratios(report)
        return report
    finally:
        bar.close()


def add_ratios(report: dict) -> None:
    """``ratios[peer]`` on every result: our measured figure / the peer's measured figure.

    llama.cpp runs its one GGUF, so every configuration compares with that; mlx-lm runs each
    quantization, so a configuration compares with mlx-lm on the same weights.
    """
    for r in report["results"]:
        ratios = {}
        for p in report["peers"]:
            if p.get("status") != "ok":
                continue
            if p.get("same_weights_as") and p["same_weights_as"] != r["quantize"]:
                continue
            ratios[p["name"]] = {
                "peer_quantize": p["quantize"],
                "decode": r["decode_tok_per_s"] / p["decode_tok_per_s"],
                "prefill": r["prefill_tok_per_s"] / p["prefill_tok_per_s"],
            }
        r["ratios"] = ratios


def format_report(report: dict) -> str:
    """The human-readable table printed by ``ondevice bench``."""
    bw = report["memory_bandwidth"]
    lines = [
        f"machine: {report['machine']['cpu']} ({report['machine']['threads']} threads), "
        f"streaming read {bw['gb_per_s']:.1f} GB/s",
        f"prompt {report['settings']['prompt_tokens']} tokens, "
        f"{report['settings']['gen_tokens']} generated, greedy",
        "",
    ]
    peer_names = [p["name"] for p in report["peers"] if p.get("status") == "ok"]
    peer_names = list(dict.fromkeys(peer_names))
    head = (f"{'config':<20}{'decode':>9}{'prefill':>9}{'TTFT s':>8}{'peak MiB':>9}"
            f"{'KV util':>8}{'ceiling':>9}{'of ceil':>8}")
    for name in peer_names:
        head += f"{'vs ' + name:>16}"
    lines.append(head)
    for r in report["results"]:
        row = (f"{r['backend'] + '-' + r['quantize']:<20}{r['decode_tok_per_s']:>9.1f}"
               f"{r['prefill_tok_per_s']:>9.1f}{r['ttft_s']:>8.3f}"
               f"{r['peak_rss_bytes'] / 2**20:>9.0f}{r['kv_utilization']:>8.1%}"
               f"{r['ceiling_tok_per_s']:>9.1f}{r['fraction_of_ceiling']:>8.1%}")
        for name in peer_names:
            ratio = r["ratios"].get(name)
            row += (f"{ratio['decode']:>8.2f}x/{ratio['prefill']:.2f}x" if ratio
                    else f"{'-':>16}")
        lines.append(row)
    for p in report["peers"]:
        if p.get("status") == "ok":
            lines.append(
                f"{p['name'] + '-' + p['quantize']:<20}{p['decode_tok_per_s']:>9.1f}"
                f"{p['prefill_tok_per_s']:>9.1f}{p['ttft_s']:>8.3f}"
                + (f"{p['peak_rss_bytes'] / 2**20:>9.0f}" if p.get("peak_rss_bytes") else
                   f"{'-':>9}")
                + (f"  (peer, {p['threads']} threads)" if p.get("threads")
                   else f"  (peer, {p.get('device', 'default device')})"))
        else:
            lines.append(f"{p['name']:<20} not run: {p.get('reason', p.get('status'))}")
    lines.append("")
    lines.append("throughput vs concurrency (aggregate tok/s):")
    for r in report["results"]:
        pts = ", ".join(f"{c['requests']}: {c['aggregate_tok_per_s']:.1f}" for c in r["concurrency"])
        lines.append(f"  {r['backend'] + '-' + r['quantize']:<18}{pts}")
    specs = [r for r in report["results"] if r.get("speculative")]
    if specs:
        lines.append("")
        sp = specs[0]["speculative"]
        lines.append(f"speculative decoding ({sp['method']}, k <= {sp['num_tokens']}), "
                     "on / off in the same run:")
        for r in specs:
            sp = r["speculative"]
            pts = ", ".join(f"{c['requests']}: {c['ratio']:.2f}x" for c in sp["concurrency"])
            lines.append(f"  {r['backend'] + '-' + r['quantize']:<18}decode "
                         f"{sp['decode_ratio']:.2f}x, acceptance "
                         f"{sp.get('spec_acceptance_rate', 0):.0%}; aggregate {pts}")
    for name, why in report["unavailable_backends"].items():
        lines.append(f"{name}: not run ({why})")
    if peer_names:  # without peers there are no ratio columns to explain
        lines.append("ratios: ours / peer, decode/prefill, from the figures measured in this "
                     "run")
    return "\n".join(lines)

