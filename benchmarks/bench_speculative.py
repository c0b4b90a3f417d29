"""Speculative decoding on vs off, side by side in one process, same model and backend.

Sections (each printed as JSON; all of them written to ``--out``):

* ``rows``: one forward pass of the target at a context of 256 tokens, by number of
  sequences and query rows per sequence: what k proposals cost on top of a decode row. The
  engine's batch rule (``SpeculativeConfig.max_batch_rows``) comes from these figures.
* ``lookup``: prompt lookup on input-grounded tasks (summarize a given text, extract fields,
  edit a code snippet given in the prompt), greedy, the real default model: decode tok/s with
  and without speculation, the ratio per repeat (runs alternate off/on), whether the greedy
  output is identical, the acceptance rate, and the ``bound``: what an oracle that proposes
  exactly the lookup tokens that will be accepted would reach on the same output (tokens
  per step, and the speed-up at the step costs measured in the run).
* ``draft``: the same with a draft model: ``--draft`` (a model directory), or a quantized
  copy of the target (``--draft-quantize q4``, or ``keep``: a GGUF's own quantization, whose
  values the f32 target was expanded from), else a draft cut from the target itself (its
  first ``--draft-layers`` layers, the final norm and the tied head).
* ``concurrency``: the same tasks at 4 and 16 concurrent requests (speculation should back off
  rather than slow the batch down).

Usage (the runs behind ``benchmarks/results/speculative-*.json``)::

    python benchmarks/bench_speculative.py --backend cpu --quantize f32 \\
        --draft-quantize keep --repeats 3 --out benchmarks/results/speculative-cpu.json
    python benchmarks/bench_speculative.py --model gemma-3-270m-q4_k_m.gguf --backend cpu \\
        --quantize f32 --draft-quantize q4 --draft-head 32768 --repeats 3 \\
        --sections rows,draft --out benchmarks/results/speculative-gemma3-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ondevice.backends import backend_class
from ondevice.batch import BatchInput
from ondevice.bench.common import model_variant
from ondevice.default_model import default_model_dir, resolve_model
from ondevice.engine import Engine
from ondevice.engine.speculative import PromptLookup, StepCost
from ondevice.modeldir import ModelDir
from ondevice.sampling import SamplingParams
from ondevice.settings import SpeculativeConfig, backend_options

ARTICLE = (
    "The city council of Lindenfeld voted on Tuesday to build a new public library on the site "
    "of the old train station. The project will cost 12 million euros and is expected to open "
    "in the spring of 2028. The mayor, Anna Keller, said the library will have a children's "
    "wing, a café and a workshop with 3D printers. Some residents opposed the plan because the "
    "station building is more than a hundred years old, but the council promised to keep its "
    "clock tower and the main hall. Construction will start in March, and the old platform "
    "will become a small park with benches and trees."
)
RECORD = (
    "Hello, my name is Daniel Okafor and I am writing about order number 48213. I live at "
    "17 Maple Street, Springfield, and you can reach me at daniel.okafor@example.com or on "
    "+1 555 0142. The order was placed on 3 October and the parcel has not arrived yet."
)
CODE = '''def average(values):
    total = 0
    count = 0
    for value in values:
        total = total + value
        count = count + 1
    if count == 0:
        return 0
    return total / count


def maximum(values):
    best = values[0]
    for value in values:
        if value > best:
            best = value
    return best
'''
TASKS = {
    "summarize": f"{ARTICLE}\n\nSummarize the text above in three sentences.",
    "extract": f"{RECORD}\n\nFill in this form with the details from the message above:\n"
               "Name:\nOrder number:\nAddress:\nEmail:\nPhone:",
    "code_edit": "Fix the bug in this code and show the whole corrected code:\n```python\n"
                 + CODE.replace("return total / count", "return total / cont") + "```",
}

BASE_TASKS = {  # for base models (no chat template): the tasks as documents to continue
    "summarize": f"Article:\n{ARTICLE}\n\nSummary of the article in three sentences:\n",
    "extract": f"Message:\n{RECORD}\n\nThe details from the message above:\nName:",
    "code_edit": "Buggy code:\n```python\n" + CODE.replace("return total / count",
                                                          "return total / cont")
                 + "```\n\nThe whole code with the bug fixed:\n```python\n",
}


def cut_draft(target: Path, layers: int, out: Path) -> Path:
    """A draft model directory: the target's first ``layers`` layers, final norm and head."""
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in sorted(target.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
                continue
            tensors[name] = t
    save_file(tensors, out / "model.safetensors")
    for f in target.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file() \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    return out


def make_backend(name: str, md: ModelDir, num_blocks: int, block_size: int):
    return backend_class(name)(md, num_blocks=num_blocks, block_size=block_size,
                               options=backend_options(name, None))


def run(backend, tokenizer, context_length: int, prompts: list[list[int]],
        params: SamplingParams, spec: SpeculativeConfig | None, draft=None) -> dict:
    """Run ``prompts`` concurrently on a fresh engine; decode tok/s after every first token."""
    engine = Engine(backend, tokenizer, context_length=context_length, model_id="bench",
                    speculative=spec, draft_backend=draft)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    first: dict[str, float] = {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
            first.setdefault(o.request_id, now)
    end = time.perf_counter()
    start = max(first.values())
    n = sum(len(t) for t in tokens.values()) - len(ids)
    st = engine.stats()
    return {
        "outputs": [tokens[rid] for rid in ids],
        "decode_tok_s": n / (end - start) if end > start else 0.0,
        "generated": n + len(ids),
        "steps": st["steps"],
        "acceptance_rate": st.get("spec_acceptance_rate"),
        "mean_accepted_length": st.get("spec_mean_accepted_length"),
        "proposed": st.get("spec_proposed_tokens"),
        "accepted": st.get("spec_accepted_tokens"),
        "cost": engine.spec.cost if engine.spec is not None else None,
    }


def lookup_bound(prompts: list[list[int]], outputs: list[list[int]], spec: SpeculativeConfig,
                 cost: StepCost) -> dict:
    """What prompt lookup could give on these greedy outputs at best: an oracle that proposes
    exactly the tokens lookup would get right (up to k) each step. ``tokens_per_step`` if
    verification were free; ``ratio``: decode speed-up at the step costs the run measured
    (single stream only: the cost of k extra rows of one sequence)."""
    lookup = PromptLookup(spec.ngram_min, spec.ngram_max)
    steps, seconds, tokens = 0, 0.0, 0
    for prompt, out in zip(prompts, outputs, strict=True):
        i = 1  # the first token comes with the prompt's prefill
        while i < len(out):
            props = lookup.propose(prompt + out[:i], spec.num_tokens)
            a = 0
            while a < len(props) and i + a < len(out) and props[a] == out[i + a]:
                a += 1
            steps += 1
            seconds += cost.time(1 + a) or 0.0
            i += a + 1
        tokens += len(out) - 1
    one = cost.time(1)
    return {"tokens_per_step": round(tokens / max(steps, 1), 3),
            "ratio": round(tokens * one / seconds, 3) if one and seconds else None}


def compare(backend, tokenizer, ctx, prompts, params, spec, draft, repeats) -> dict:
    """Alternate off/on runs; ratios within each repeat pair."""
    offs, ons, ratios = [], [], []
    identical = True
    for _ in range(repeats):
        off = run(backend, tokenizer, ctx, prompts, params, None)
        on = run(backend, tokenizer, ctx, prompts, params, spec, draft)
        identical &= off["outputs"] == on["outputs"]
        offs.append(off["decode_tok_s"])
        ons.append(on["decode_tok_s"])
        ratios.append(on["decode_tok_s"] / off["decode_tok_s"])
    return {
        "requests": len(prompts),
        "generated_tokens": on["generated"],
        "off_tok_s": [round(x, 2) for x in offs],
        "on_tok_s": [round(x, 2) for x in ons],
        "ratios": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "identical_greedy_output": identical,
        "acceptance_rate": on["acceptance_rate"],
        "mean_accepted_length": on["mean_accepted_length"],
        "proposed": on["proposed"],
        "accepted": on["accepted"],
        "steps_off_on": [off["steps"], on["steps"]],
        **({"bound": lookup_bound(prompts, off["outputs"], spec, on["cost"])}
           if spec.method == "prompt_lookup" and len(prompts) == 1 else {}),
    }


def rows_section(backend, block_size: int) -> list[dict]:
    out = []
    for seqs, rows in [(1, 1), (1, 2), (1, 3), (1, 5), (1, 9), (1, 17), (4, 1), (4, 3), (4, 5),
                       (8, 1), (8, 3), (16, 1), (16, 2), (16, 3)]:
        per = 256 // block_size + 2
        entries = [([5] * rows, 256, list(range(s * per, (s + 1) * per))) for s in range(seqs)]
        batch = BatchInput.build(entries, block_size, logits_for=[rows] * seqs)
        backend.forward(batch)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            backend.forward(batch)
            times.append(time.perf_counter() - t)
        out.append({"seqs": seqs, "rows_per_seq": rows, "rows": seqs * rows,
                    "ms": round(min(times) * 1e3, 1)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--model", default=None,
                    help="target model: a directory or .gguf file (default: the default model)")
    ap.add_argument("--quantize", default=None,
                    help="target stored as f32 | f16 | q8 | q4 (default: as the model is stored)")
    ap.add_argument("--draft-quantize", default=None,
                    help="draft = a copy of the target stored as q8 | q4 | keep (a GGUF's own "
                         "quantization), instead of --draft")
    ap.add_argument("--group-size", type=int, default=64, help="group size of --draft-quantize")
    ap.add_argument("--draft-head", type=int, default=None, metavar="N",
                    help="trim the draft's output head to N tokens (end-of-turn tokens, then "
                         "the most frequent in --head-corpus)")
    ap.add_argument("--head-corpus", action="append", default=None,
                    help="text file(s) for --draft-head [default: README.md]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--draft", default=None, help="draft model directory")
    ap.add_argument("--draft-backend", default=None)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--draft-k", type=int, default=4)
    ap.add_argument("--sections", default="rows,lookup,concurrency,draft")
    ap.add_argument("--concurrency", default="4,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))

    if args.quantize:
        target = model_variant(args.model, args.quantize)
    elif args.model:
        target = resolve_model(args.model, quiet=True)
    else:
        target = default_model_dir(quiet=True)
    md = ModelDir(target)
    block_size, num_blocks = 16, 2048
    backend = make_backend(args.backend, md, num_blocks, block_size)
    tok, ctx = md.tokenizer, md.config.context_length
    if tok.chat_template:
        prompts = {name: tok.encode_chat([{"role": "user", "content": text}],
                                         add_generation_prompt=True)
                   for name, text in TASKS.items()}
    else:  # a base model: the same tasks as text to continue
        prompts = {name: tok.encode(BASE_TASKS[name]) for name in TASKS}
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    report: dict = {
        "benchmark": "speculative decoding, on vs off in one run",
        "machine": f"{platform.machine()}, {platform.system()}, shared 2-core VM",
        "model": target.name, "quantize": args.quantize, "backend": args.backend, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }

    def emit(key, value):
        report[key] = value
        print(json.dumps({key: value}), flush=True)

    if "rows" in sections:
        emit("rows", rows_section(backend, block_size))
    lookup = SpeculativeConfig(method="prompt_lookup", num_tokens=args.k)
    if "lookup" in sections:
        emit("lookup", {name: compare(backend, tok, ctx, [p], greedy, lookup, None, args.repeats)
                        for name, p in prompts.items()})
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if "concurrency" in sections:
        res = {}
        for c in levels:
            ps = [prompts[name] for name in list(TASKS) * c][:c]
            res[str(c)] = compare(backend, tok, ctx, ps, greedy, lookup, None,
                                  max(1, args.repeats - 1))
        emit("lookup_concurrency", res)
    if "draft" in sections:
        tmp = Path(tempfile.mkdtemp(prefix="draft-"))
        if args.draft:
            draft_dir, what = Path(args.draft), args.draft
        elif args.draft_quantize == "keep":  # the GGUF's own quantization, imported as is
            draft_dir = resolve_model(args.model, quiet=True) if args.model \
                else default_model_dir(quiet=True)
            what = "the target's GGUF quantization, imported as it is"
        elif args.draft_quantize:
            draft_dir = model_variant(args.model, args.draft_quantize,
                                      group_size=args.group_size)
            what = f"the target stored as {args.draft_quantize} (group size {args.group_size})"
        else:
            draft_dir = cut_draft(target, args.draft_layers, tmp / "draft")
            what = f"first {args.draft_layers} layers of the target"
        if args.draft_head:
            from ondevice.converters.draft_head import head_token_ids, make_draft_head

            corpus = args.head_corpus or [str(Path(__file__).parents[1] / "README.md")]
            base = ModelDir(draft_dir)
            ids = head_token_ids(base.tokenizer, [Path(f).read_text() for f in corpus],
                                 args.draft_head, base.config.vocab_size)
            draft_dir = make_draft_head(draft_dir, tmp / "draft-head", ids)
            what += (f", head trimmed to {args.draft_head} tokens (end-of-turn, then by "
                     f"frequency in {', '.join(Path(f).name for f in corpus)})")
        dmd = ModelDir(draft_dir)
        draft = make_backend(args.draft_backend or args.backend, dmd, num_blocks, block_size)
        spec = SpeculativeConfig(method="draft", draft_model=str(draft_dir),
                                 num_tokens=args.draft_k)
        res = {"draft": what, "draft_dir": draft_dir.name,
               "draft_backend": args.draft_backend or args.backend, "k": args.draft_k}
        res.update({name: compare(backend, tok, ctx, [p], greedy, spec, draft, args.repeats)
                    for name, p in prompts.items()})
        for c in levels:
            ps = [prompts[name] for name in list(TASKS) * c][:c]
            res[f"concurrency_{c}"] = compare(backend, tok, ctx, ps, greedy, spec, draft,
                                              max(1, args.repeats - 1))
        emit("draft", res)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
