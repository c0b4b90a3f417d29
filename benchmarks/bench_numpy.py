"""NumPy backend speed on a model (default: SmolLM2-135M-Instruct at float32), as JSON.

Figures: prefill tok/s of a fresh N-token prompt, decode tok/s, peak RSS; side by side in the
same run, the baseline: a plain NumPy float32 decoder with a contiguous KV cache and no paging
(what "plain NumPy" means in the issue), and the machine's GEMV bandwidth roofline.

    python benchmarks/bench_numpy.py [--model DIR] [--prompt-tokens 256] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import ondevice
from ondevice.memory import peak_rss_bytes
from ondevice.sampling import SamplingParams


def plain_numpy_decode_tps(model: ondevice.Model, prompt: list[int], steps: int) -> float:
    """Baseline: the same float32 weights, one contiguous KV cache, a straight-line loop."""
    be = model.runtime.backend
    p, c = be.params, model.config
    nh, nkv, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, np.float32(c.rms_norm_eps)
    inv = model.runtime.backend.model.inv_freq
    total = len(prompt) + steps + 1
    kc = np.zeros((c.num_hidden_layers, total, nkv, hd), np.float32)
    vc = np.zeros_like(kc)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    def rope(x, pos, heads):
        x = x.reshape(-1, heads, hd)
        a = pos[:, None].astype(np.float32) * inv
        cos, sin = np.cos(a)[:, None], np.sin(a)[:, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def step(ids, start):
        n = len(ids)
        pos = np.arange(start, start + n)
        h = p.embed[ids]
        for i, L in enumerate(p.layers):
            x = norm(h, L.input_norm)
            q = rope(x @ L.q_proj.w.T, pos, nh)
            kc[i, start : start + n] = rope(x @ L.k_proj.w.T, pos, nkv)
            vc[i, start : start + n] = (x @ L.v_proj.w.T).reshape(n, nkv, hd)
            k, v = kc[i, : start + n], vc[i, : start + n]
            q = q.reshape(n, nkv, nh // nkv, hd)
            s = np.einsum("qkgd,tkd->kgqt", q, k) / np.float32(np.sqrt(hd))
            s = s + np.triu(np.full((n, start + n), -np.inf, np.float32), start + 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("kgqt,tkd->qkgd", s, v).reshape(n, nh * hd)
            h = h + a @ L.o_proj.w.T
            x = norm(h, L.post_norm)
            g = x @ L.gate_proj.w.T
            h = h + (g / (1 + np.exp(-g)) * (x @ L.up_proj.w.T)) @ L.down_proj.w.T
        return norm(h[-1:], p.norm) @ p.lm_head.w.T

    logits = step(np.array(prompt), 0)
    t0 = time.perf_counter()
    for i in range(steps):
        tok = int(np.argmax(logits[0]))
        logits = step(np.array([tok]), len(prompt) + i)
    return steps / (time.perf_counter() - t0)


def gemv_roofline_tps(model: ondevice.Model, repeats: int = 5) -> tuple[float, float]:
    """(GB/s, tok/s) of the bare matrix-vector products over every weight, once per token."""
    be = model.runtime.backend
    mats = [lin.w for L in be.params.layers for lin in (L.q_proj, L.k_proj, L.v_proj, L.o_proj,
            L.gate_proj, L.up_proj, L.down_proj)] + [be.params.lm_head.w]
    xs = {m.shape[1]: np.ones(m.shape[1], np.float32) for m in mats}
    for m in mats:
        m @ xs[m.shape[1]]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for m in mats:
            m @ xs[m.shape[1]]
    dt = (time.perf_counter() - t0) / repeats
    return sum(m.nbytes for m in mats) / dt / 1e9, 1 / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--baseline-tokens", type=int, default=48)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = ondevice.load(args.model, backend="numpy", quiet=True)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    special = set(model.tokenizer.eos_token_ids)
    prompt = [int(t) for t in rng.integers(100, model.config.vocab_size, args.prompt_tokens)
              if int(t) not in special]
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
    model.generate(prompt[:16], max_tokens=4, temperature=0)  # warm-up
    runs = []
    for _ in range(2):
        n = sum(1 for _ in model.stream(prompt, params))
        t = model.timings
        runs.append({"prefill_tok_per_s": t.prefill_tps, "decode_tok_per_s": t.decode_tps,
                     "generated": n})
    best = max(runs, key=lambda r: r["decode_tok_per_s"])
    baseline = plain_numpy_decode_tps(model, prompt, args.baseline_tokens)
    gbps, roof = gemv_roofline_tps(model)
    out = {
        "benchmark": "numpy_backend",
        "model": str(model.path),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count()},
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen_tokens,
        "load_seconds": round(load_s, 2),
        "prefill_tok_per_s": round(max(r["prefill_tok_per_s"] for r in runs), 1),
        "decode_tok_per_s": round(best["decode_tok_per_s"], 2),
        "baseline_plain_numpy_decode_tok_per_s": round(baseline, 2),
        "decode_ratio_vs_plain_numpy": round(best["decode_tok_per_s"] / baseline, 3),
        "gemv_bandwidth_gb_per_s": round(gbps, 2),
        "gemv_roofline_tok_per_s": round(roof, 2),
        "decode_fraction_of_roofline": round(best["decode_tok_per_s"] / roof, 3),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
