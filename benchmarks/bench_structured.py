"""Structured output: what constrained decoding costs and what it buys, as JSON.

1. Decode throughput at 1 and 16 concurrent requests, constrained by a mid-size JSON schema
   vs unconstrained, on the same prompts. Each unconstrained request generates exactly as
   many tokens as its constrained twin did (``max_tokens`` = that length, ``ignore_eos``), so
   both runs have the same batch shape at every step; runs alternate, repeated.
2. Schema compile time: the llguidance tokenizer (once per model), cold compiles of distinct
   schemas, cached compiles of the same text; per-token mask time (computed on the engine's
   mask thread beside the forward pass) and the time to apply a mask to a logits row.
3. On a small set of schemas: the share of replies that parse and validate when the prompt
   only asks for JSON, vs constrained (greedy, both).

    python benchmarks/bench_structured.py [--model DIR] [--backend auto] [--repeats 3]
        [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import ondevice
from ondevice.constraints import Constraint, ConstraintCompiler
from ondevice.engine import Engine
from ondevice.sampling import SamplingParams

MID_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,16}@[a-z]{1,12}\\.(com|org)$"},
        "city": {"type": "string", "maxLength": 30},
        "interests": {"type": "array", "items": {"enum": ["music", "sports", "travel",
                                                          "books", "cooking", "science"]},
                      "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 40},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "city", "interests", "address", "active"],
    "additionalProperties": False,
}

PEOPLE = ["a retired teacher", "a young chef", "a marathon runner", "a jazz musician",
          "a software engineer", "a librarian", "a farmer", "a pilot", "a nurse",
          "a photographer", "a chemist", "a carpenter", "a student", "a painter",
          "a fisherman", "a journalist"]

VALIDITY_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string"},
                                      "country": {"type": "string"}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"},
                                      "reason": {"type": "string", "maxLength": 80}},
     "required": ["answer", "reason"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"},
                                                 "minItems": 3, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string"},
                                      "age": {"type": "integer", "minimum": 0,
                                              "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    MID_SCHEMA,
]
VALIDITY_QUESTIONS = [
    ["What is the capital of Italy?", "Where is the Eiffel Tower?",
     "Name a big city in Japan.", "Where was Mozart born?"],
    ["Is water wet?", "Is the sun a star?", "Can fish fly?", "Is 7 a prime number?"],
    ["Name three colors.", "What colors are in a rainbow?", "Colors of the French flag?",
     "Name three warm colors."],
    ["Invent a character.", "Describe your grandmother.", "Who is Albert Einstein?",
     "Make up a person."],
    [f"Describe {p}." for p in PEOPLE[:4]],
]


def make_engine(model: ondevice.Model, max_num_seqs: int = 64) -> Engine:
    rt = model.runtime
    rt.loop.shutdown()  # the benchmark drives the engine directly, on this thread
    return Engine(rt.backend, rt.tokenizer, context_length=rt.config.context_length,
                  max_num_seqs=max_num_seqs, model_id=rt.model_id)


def chat_ids(model: ondevice.Model, text: str) -> list[int]:
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Submit all, step to the end. Decode phase: from the step where the last request got its
    first token to the end (every request is decoding then, none is prefilling)."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    texts = {r: [] for r in rids}
    counts = {r: 0 for r in rids}
    finish = {}
    steps: list[tuple[float, int]] = []  # (end time, tokens sampled in the step)
    first_all = None
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        n = 0
        for o in outs:
            n += len(o.token_ids)
            counts[o.request_id] += len(o.token_ids)
            texts[o.request_id].append(o.text)
            if o.finish_reason:
                finish[o.request_id] = o.finish_reason
        steps.append((now, n))
        if first_all is None and all(counts[r] for r in rids):
            first_all = len(steps) - 1
    end = time.perf_counter()
    start_t = steps[first_all][0]
    decode_tokens = sum(n for _, n in steps[first_all + 1:])
    return {"texts": ["".join(texts[r]) for r in rids], "tokens": [counts[r] for r in rids],
            "finish": [finish.get(r) for r in rids], "seconds": end - t0,
            "decode_tps": decode_tokens / (end - start_t) if end > start_t else 0.0,
            "total_tps": sum(counts.values()) / (end - t0)}


def throughput(engine: Engine, model: ondevice.Model, concurrency: int, repeats: int,
               max_tokens: int) -> dict:
    prompts = [chat_ids(model, f"Describe {PEOPLE[i % len(PEOPLE)]} as a JSON profile with "
                               f"name, age, email, city, interests, address and active.")
               for i in range(concurrency)]
    constraint = Constraint.json_schema(MID_SCHEMA)
    engine.constraints.compile(constraint)  # compile time is measured separately
    rows = []
    mask_calls: list[tuple[float, int]] = []
    compiler = engine.constraints
    plain_masks = compiler.masks

    def timed_masks(matchers):
        t = time.perf_counter()
        out = plain_masks(matchers)
        mask_calls.append((time.perf_counter() - t, len(matchers)))
        return out

    compiler.masks = timed_masks  # instance attribute: this benchmark's engine only
    try:
        for _ in range(repeats):
            con = run(engine, prompts, [SamplingParams(max_tokens=max_tokens, temperature=0,
                                                       constraint=constraint)] * concurrency)
            lengths = con["tokens"]
            plain = run(engine, prompts, [SamplingParams(max_tokens=n, temperature=0,
                                                         ignore_eos=True) for n in lengths])
            assert plain["tokens"] == lengths
            valid = 0
            for text, fin in zip(con["texts"], con["finish"], strict=True):
                valid += fin == "stop" and _valid(text, MID_SCHEMA)
            print(f"concurrency {concurrency}: constrained {con['decode_tps']:.1f} tok/s, "
                  f"unconstrained {plain['decode_tps']:.1f} tok/s", file=sys.stderr)
            rows.append({"constrained_decode_tps": round(con["decode_tps"], 2),
                         "unconstrained_decode_tps": round(plain["decode_tps"], 2),
                         "ratio": round(con["decode_tps"] / plain["decode_tps"], 4),
                         "constrained_total_tps": round(con["total_tps"], 2),
                         "unconstrained_total_tps": round(plain["total_tps"], 2),
                         "tokens": sum(lengths), "valid_replies": valid})
    finally:
        del compiler.masks
    per_token = sum(t for t, _ in mask_calls) / max(sum(n for _, n in mask_calls), 1)
    ratios = [r["ratio"] for r in rows]
    return {"concurrency": concurrency, "runs": rows,
            "median_constrained_decode_tps": statistics.median(
                r["constrained_decode_tps"] for r in rows),
            "median_unconstrained_decode_tps": statistics.median(
                r["unconstrained_decode_tps"] for r in rows),
            "median_ratio": statistics.median(ratios),
            "overhead_pct": round(100 * (1 - statistics.median(ratios)), 2),
            "mask_seconds_per_token": per_token,
            "mask_calls": len(mask_calls)}


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def compile_times(model: ondevice.Model, repeats: int) -> dict:
    tok = model.tokenizer
    vocab = model.config.vocab_size
    t = time.perf_counter()
    compiler = ConstraintCompiler(tok.backend.to_str(), vocab, sorted(tok.eos_token_ids))
    compiler._tokenizer()
    tokenizer_s = time.perf_counter() - t
    cold, cached = [], []
    for i in range(max(repeats, 3) * 3):
        schema = dict(MID_SCHEMA, description=f"variant {i}")  # a new text: a cold compile
        c = Constraint.json_schema(schema)
        t = time.perf_counter()
        compiler.compile(c)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiler.compile(Constraint.json_schema(schema))
        cached.append(time.perf_counter() - t)
    # Applying a mask: bool row -> -inf where disallowed, on a copy of a float32 row.
    row = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    mask = np.zeros(vocab, dtype=bool)
    mask[::7] = True
    t = time.perf_counter()
    for _ in range(200):
        r = row.copy()
        r[~mask] = -np.inf
    apply_s = (time.perf_counter() - t) / 200
    return {"llguidance_tokenizer_seconds": round(tokenizer_s, 4),
            "cold_compile_seconds_median": statistics.median(cold),
            "cold_compile_seconds_max": max(cold),
            "cached_compile_seconds_median": statistics.median(cached),
            "apply_mask_seconds_per_row": apply_s}


def validity(engine: Engine, model: ondevice.Model, max_tokens: int) -> dict:
    prompts, schemas = [], []
    for schema, questions in zip(VALIDITY_SCHEMAS, VALIDITY_QUESTIONS, strict=True):
        for q in questions:
            prompts.append(chat_ids(model, f"{q}\nReply with only a JSON object that matches "
                                           f"this JSON schema: {json.dumps(schema)}"))
            schemas.append(schema)
    out = {}
    for label, constrained in (("unconstrained", False), ("constrained", True)):
        params = [SamplingParams(max_tokens=max_tokens, temperature=0,
                                 constraint=Constraint.json_schema(s) if constrained else None)
                  for s in schemas]
        res = run(engine, prompts, params)
        ok = [_valid(_strip_fences(t), s) for t, s in zip(res["texts"], schemas, strict=True)]
        out[label] = {"valid": sum(ok), "total": len(ok), "share": round(sum(ok) / len(ok), 3),
                      "length_cut": sum(f == "length" for f in res["finish"])}
        if not constrained:
            out[label]["sample_reply"] = res["texts"][0][:200]
    out["note"] = ("unconstrained replies are accepted after stripping a ``` code fence; "
                   "greedy, same prompts (which include the schema) for both")
    return out


def _strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    model = ondevice.load(args.model, args.backend, quiet=True)
    engine = make_engine(model)
    result = {
        "benchmark": "structured",
        "model": str(model.path.name), "backend": model.backend,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "schema": "MID_SCHEMA (7 properties: strings with maxLength and patterns, an enum "
                  "array, a nested object, a boolean)",
        "repeats": args.repeats,
        "compile": compile_times(model, args.repeats),
    }
    print(f"compile: {result['compile']}", file=sys.stderr)

    def save() -> str:  # after every part: a run cut short still leaves what it measured
        text = json.dumps(result, indent=2)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    result["throughput"] = []
    for c in (16, 1):
        result["throughput"].append(throughput(engine, model, c, args.repeats, args.max_tokens))
        save()
    result["validity"] = validity(engine, model, args.max_tokens)
    print(save())


if __name__ == "__main__":
    main()
