"""Peer runtimes measured in the same run as ours: llama.cpp (through ``llama-cpp-python``, on
the GGUF our model was converted from, with our thread count) and mlx-lm (on the very model
directories our backends load). Both are optional (the ``peers`` extra); a missing one is
reported with the reason instead of failing the run.

Each peer gets the same prompt token ids, generates the same number of tokens greedily with
end-of-sequence ignored, and is timed with the same stopwatch as ours: prefill = submission
to first token, decode = later tokens over the time from the first to the last. The peer's
own reported figures are kept next to ours where it has them.

llama.cpp runs in a child process with the environment it would have on its own: the
``cpu`` backend sets libgomp's wait policy for numba's threads in this process, and
llama.cpp's OpenMP threads would take it too (with ``OMP_WAIT_POLICY=PASSIVE`` it decoded
the default model at 40 tok/s here, against 125 with its defaults).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..memory import peak_rss_bytes
from .common import cpu_threads, make_prompts, reset_peak_rss


def default_threads() -> int:
    return cpu_threads()


def _missing(name: str, module: str, extra: str) -> dict | None:
    importlib.invalidate_caches()  # a peer installed while this run measured ours counts
    if importlib.util.find_spec(module) is None:
        return {"name": name, "status": "not installed",
                "reason": f"{extra} is not installed (pip install 'ondevice[peers]')"}
    return None


def _timed(stamps: list[float], t0: float, prompt_len: int) -> dict:
    ttft = stamps[0] - t0
    span = stamps[-1] - stamps[0]
    return {"ttft_s": ttft, "prefill_tok_per_s": prompt_len / ttft,
            "decode_tok_per_s": (len(stamps) - 1) / span if span > 0 else math.nan,
            "generated": len(stamps)}


# -- llama.cpp ---------------------------------------------------------------------------------
def _llama_perf(llm) -> dict:
    """llama.cpp's own counters for the last generation (empty when this build lacks them)."""
    try:
        import llama_cpp

        data = llama_cpp.llama_perf_context(llm._ctx.ctx)
        out = {}
        if data.n_p_eval and data.t_p_eval_ms > 0:
            out["reported_prefill_tok_per_s"] = data.n_p_eval / data.t_p_eval_ms * 1e3
        if data.n_eval and data.t_eval_ms > 0:
            out["reported_decode_tok_per_s"] = data.n_eval / data.t_eval_ms * 1e3
        return out
    except Exception:  # counters are a convenience; the stopwatch figures are the result
        return {}


def _llama_reset_perf(llm) -> None:
    try:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    except Exception:
        pass


def llama_cpp_once(llm, prompt: list[int], gen: int) -> dict:
    llm.reset()
    _llama_reset_perf(llm)
    stamps: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    # generate() yields forever (it leaves stopping at end-of-sequence to its callers), so
    # exactly ``gen`` tokens come out, as from ours with ignore_eos.
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                            repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) >= gen:
            break
    return {**_timed(stamps, t0, len(prompt)), **_llama_perf(llm), "tokens": tokens}


OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")  # in the report


def peer_env() -> dict[str, str]:
    """This process's environment without the variables the ``cpu`` backend set for its own
    threads (`THREAD_ENV_SET`): what a peer would have run with on its own."""
    kernels = sys.modules.get("ondevice.backends.cpu_kernels")
    ours = set(getattr(kernels, "THREAD_ENV_SET", ()))
    return {k: v for k, v in os.environ.items() if k not in ours}


def run_llama_cpp(gguf: Path | None, prompt: list[int], gen: int, threads: int,
                  repeats: int) -> dict:
    """llama.cpp on ``gguf`` with ``threads`` threads (prefill and decode), in a child
    process with `peer_env` (its peak RSS is its own)."""
    if gguf is None:
        return {"name": "llama.cpp", "status": "not run",
                "reason": "the model has no GGUF file to give llama.cpp (pass --model FILE.gguf)"}
    job = json.dumps({"gguf": str(gguf), "prompt": prompt, "gen": gen, "threads": threads,
                      "repeats": repeats})
    try:
        done = subprocess.run([sys.executable, "-m", "ondevice.bench.peers"], input=job,
                              capture_output=True, text=True, env=peer_env(), timeout=3600)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"name": "llama.cpp", "status": "failed",
                    "reason": f"child exited with {done.returncode}: {tail}"}
        return json.loads(lines[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        return {"name": "llama.cpp", "status": "failed", "reason": f"{type(err).__name__}: {err}"}


def _llama_cpp_here(gguf: Path, prompt: list[int], gen: int, threads: int,
                    repeats: int) -> dict:
    """The llama.cpp runs themselves, in this process (the child of `run_llama_cpp`)."""
    missing = _missing("llama.cpp", "llama_cpp", "llama-cpp-python")
    if missing:
        return missing
    try:
        import llama_cpp

        reset_peak_rss()
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + gen + 64,
                              n_batch=512, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        llama_cpp_once(llm, prompt[:8], 4)  # warm-up
        runs = [llama_cpp_once(llm, prompt, gen) for _ in range(repeats)]
        peak = peak_rss_bytes()
        del llm
        gc.collect()
    except Exception as err:  # a peer failing must not lose our figures
        return {"name": "llama.cpp", "status": "failed", "reason": f"{type(err).__name__}: {err}"}
    return _summary("llama.cpp", runs, quantize=_gguf_type(gguf), threads=threads,
                    version=getattr(llama_cpp, "__version__", None), weights=str(gguf),
                    peak=peak)


def _gguf_type(gguf: Path) -> str:
    """The GGUF's predominant tensor type, e.g. ``Q4_1`` (``general.file_type`` in words)."""
    try:
        from collections import Counter

        import gguf as gguf_lib

        reader = gguf_lib.GGUFReader(str(gguf))
        kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
        return f"gguf-{kinds.most_common(1)[0][0]}"
    except Exception:
        return "gguf"


# -- mlx-lm ------------------------------------------------------------------------------------
def mlx_lm_once(model, tokenizer, prompt: list[int], gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm import stream_generate

    stamps: list[float] = []
    tokens: list[int] = []
    last = None
    t0 = time.perf_counter()
    for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=gen):
        stamps.append(time.perf_counter())
        tokens.append(int(r.token))
        last = r
    return {**_timed(stamps, t0, len(prompt)),
            "reported_prefill_tok_per_s": float(last.prompt_tps),
            "reported_decode_tok_per_s": float(last.generation_tps), "tokens": tokens}


def run_mlx_lm(path: Path, quantize: str, prompt: list[int], gen: int, repeats: int) -> dict:
    """mlx-lm's ``stream_generate`` on the model directory ``path`` (greedy, its default)."""
    missing = _missing("mlx-lm", "mlx_lm", "mlx-lm")
    if missing:
        return {**missing, "quantize": quantize, "same_weights_as": quantize}
    try:
        import mlx.core as mx
        import mlx_lm

        reset_peak_rss()
        model, tokenizer = mlx_lm.load(str(path))
        tokenizer.eos_token_ids = set()  # exactly ``gen`` tokens, as ours with ignore_eos
        mlx_lm_once(model, tokenizer, prompt[:8], 4)  # warm-up
        runs = [mlx_lm_once(model, tokenizer, prompt, gen) for _ in range(repeats)]
        peak = peak_rss_bytes()
        device = str(mx.default_device())
        del model
        gc.collect()
    except Exception as err:
        return {"name": "mlx-lm", "status": "failed", "quantize": quantize,
                "same_weights_as": quantize, "reason": f"{type(err).__name__}: {err}"}
    out = _summary("mlx-lm", runs, quantize=quantize, threads=None,
                   version=getattr(mlx_lm, "__version__", None), weights=str(path), peak=peak)
    out["same_weights_as"] = quantize
    out["device"] = device
    return out


def _summary(name: str, runs: list[dict], *, quantize: str, threads: int | None,
             version: str | None, weights: str, peak: int) -> dict:
    best = max(runs, key=lambda r: r["decode_tok_per_s"])
    out = {"name": name, "status": "ok", "quantize": quantize, "version": version,
           "weights": weights, "threads": threads,
           "decode_tok_per_s": best["decode_tok_per_s"],
           "prefill_tok_per_s": max(r["prefill_tok_per_s"] for r in runs),
           "ttft_s": min(r["ttft_s"] for r in runs), "peak_rss_bytes": peak,
           "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}
    for key in ("reported_decode_tok_per_s", "reported_prefill_tok_per_s"):
        if key in best:
            out[key] = max(r[key] for r in runs)
    return out


def run_peers(s, paths: dict[str, Path], gguf: Path | None, threads: int,
              tick: Callable[[str], None]) -> list[dict]:
    """Every peer on the same prompt as ours: llama.cpp once, mlx-lm per quantization."""
    from ..modeldir import ModelDir

    md = ModelDir(next(iter(paths.values())))
    try:
        special = set(md.tokenizer.eos_token_ids)
        vocab = md.config.vocab_size
    finally:
        md.close()
    # The same first prompt as bench_config's single-stream runs (same seed, same vocabulary).
    prompt = make_prompts(vocab, special, 1, s.prompt_tokens, s.seed)[0]
    out = [run_llama_cpp(gguf, prompt, s.gen_tokens, threads, s.repeats)]
    tick("llama.cpp")
    for q, path in paths.items():
        out.append(run_mlx_lm(path, q, prompt, s.gen_tokens, s.repeats))
        tick(f"mlx-lm-{q}")
    return out


if __name__ == "__main__":  # the llama.cpp child: a JSON job on stdin, the result on stdout
    _job = json.loads(sys.stdin.read())
    _result = _llama_cpp_here(Path(_job["gguf"]), _job["prompt"], _job["gen"],
                              _job["threads"], _job["repeats"])
    _result["omp_env"] = {k: os.environ.get(k) for k in OMP_VARIABLES}  # what it ran with
    print(json.dumps(_result))
