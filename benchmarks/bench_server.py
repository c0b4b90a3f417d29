"""The OpenAI-compatible server under load, as JSON.

A fixed set of chat prompts (greedy, exactly ``--gen-tokens`` new tokens each) goes through a
server in a subprocess (``ondevice.server.serve``) with 1, 8 and 32 concurrent streaming clients
(the official ``openai`` AsyncOpenAI client): requests/s, aggregate generated tok/s and p50/p95
time to first token. One client is the same requests sent one at a time. The same requests run
one at a time on the Python API in this process (no HTTP) give the server's overhead.

Every run starts from a warm prefix cache (the prompts share the chat template's system prompt),
so the levels compare like with like.

    ONDEVICE_HOME=/tmp/odhome python benchmarks/bench_server.py [--model DIR] [--gen-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

import ondevice
from ondevice.sampling import SamplingParams

PROMPTS = [
    "Why do leaves change colour in autumn?", "Name three uses of copper.",
    "What does a compiler do?", "Describe the water cycle briefly.",
    "How many legs does a spider have?", "What is the boiling point of water at sea level?",
    "Suggest a name for a grey cat.", "What is the tallest mountain in Africa?",
    "Explain what a noun is.", "Why do we have leap years?",
    "What is the main ingredient of guacamole?", "How does a rainbow form?",
    "Give two reasons to learn a second language.", "What is an atom made of?",
    "Which planet is known as the red planet?", "What is the purpose of a bridge's arch?",
    "How do bees make honey?", "What is the speed of sound roughly?",
    "Recommend a short morning exercise.", "What does DNA stand for?",
    "Why is the ocean salty?", "What is a haiku?", "How do magnets work?",
    "Write one sentence about the moon.", "What is the capital of Japan?",
    "Why do cats purr?", "What is inflation in economics?", "How does a battery store energy?",
    "What is the largest mammal?", "Explain gravity to a child.",
    "What are the primary colours?", "How long does light from the sun take to reach Earth?",
]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(results: list[tuple[int, float]], seconds: float) -> dict:
    """``results``: (generated tokens, time to first token) per request."""
    tokens = sum(n for n, _ in results)
    ttft = [t for _, t in results]
    return {
        "requests": len(results), "generated_tokens": tokens, "seconds": round(seconds, 3),
        "requests_per_s": round(len(results) / seconds, 3),
        "generated_tok_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p95_s": round(percentile(ttft, 0.95), 4),
    }


def python_api(model_path: str | None, backend: str, gen: int) -> dict:
    """The same requests, one at a time, through the Python API (same engine, no HTTP)."""
    model = ondevice.load(model_path, backend, quiet=True)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    for chat in chats:  # warm the prefix cache like the server's warm-up does
        model.generate(chat, max_tokens=1, temperature=0)
    results = []
    t0 = time.perf_counter()
    for chat in chats:
        start = time.perf_counter()
        first = None
        n = 0
        for chunk in model.stream(chat, params):
            if first is None and chunk.token_id is not None:
                first = time.perf_counter() - start
            n += chunk.token_id is not None
        results.append((n, first or 0.0))
    out = summary(results, time.perf_counter() - t0)
    out["backend"] = model.backend
    model.close()
    del model
    gc.collect()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str | None, backend: str, port: int) -> subprocess.Popen:
    code = ("import sys; from ondevice.server import serve; "
            "serve(sys.argv[1] or None, backend=sys.argv[2], port=int(sys.argv[3]), "
            "log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code, model_path or "", backend, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # the first use of the default model converts it
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the server exited: " + proc.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def run_level(client: openai.AsyncOpenAI, name: str, clients: int, gen: int) -> dict:
    """``clients`` workers take the prompts in order until all are served."""
    todo = list(enumerate(PROMPTS))
    results: list[tuple[int, float] | None] = [None] * len(PROMPTS)

    async def worker() -> None:
        while todo:
            i, prompt = todo.pop(0)
            start = time.perf_counter()
            first = None
            usage = None
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=gen,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    usage = chunk.usage
            results[i] = (usage.completion_tokens if usage else 0, first or 0.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    out = summary([r for r in results if r is not None], time.perf_counter() - t0)
    out["clients"] = clients
    return out


async def through_http(port: int, gen: int, levels: list[int]) -> tuple[dict, dict]:
    base = f"http://127.0.0.1:{port}"
    name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                timeout=600)
    try:
        for prompt in PROMPTS:  # warm-up: fills the prefix cache, first-call costs paid
            await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                temperature=0)
        out = {}
        for c in levels:
            out[str(c)] = await run_level(client, name, c, gen)
            print(f"# {c} client(s): {out[str(c)]}", file=sys.stderr, flush=True)
    finally:
        await client.close()
    metrics = httpx.get(base + "/metrics").json()
    return out, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: SmolLM2)")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--skip-python-api", action="store_true",
                    help="only the HTTP levels (no overhead figure)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    api = None
    if not args.skip_python_api:
        api = python_api(args.model, args.backend, args.gen_tokens)
        print(f"# python API, one at a time: {api}", file=sys.stderr, flush=True)
    port = free_port()
    server = start_server(args.model, args.backend, port)
    try:
        http, metrics = asyncio.run(through_http(port, args.gen_tokens, levels))
    finally:
        server.terminate()  # SIGTERM: the server drains and exits
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()

    one = http[str(min(levels))]
    if api is None:
        print(json.dumps({"http_streaming_by_concurrent_clients": http}, indent=2))
        return
    for row in http.values():
        row["speedup_vs_one_at_a_time"] = round(
            row["generated_tok_per_s"] / one["generated_tok_per_s"], 2)
    result = {
        "benchmark": "server",
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "backend": api["backend"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "prompts": len(PROMPTS), "gen_tokens": args.gen_tokens, "sampling": "greedy",
        "http_streaming_by_concurrent_clients": http,
        "python_api_one_at_a_time": api,
        "server_overhead": {
            "http_1_client_tok_per_s": one["generated_tok_per_s"],
            "python_api_tok_per_s": api["generated_tok_per_s"],
            "http_over_python_api": round(one["generated_tok_per_s"]
                                          / api["generated_tok_per_s"], 3),
            "ttft_p50_http_s": one["ttft_p50_s"], "ttft_p50_python_api_s": api["ttft_p50_s"],
        },
        "server_metrics_after": {k: metrics.get(k) for k in (
            "prefix_cache_hit_rate", "preemptions", "generated_tokens", "steps")},
        "note": "shared 2-core machine: figures are noisy",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
