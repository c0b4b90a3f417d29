"""``ondevice eval``: how far a backend or quantization drifts from a reference.

On one text (the shipped public-domain passages, or any file) both the reference (by
default NumPy at float32) and each candidate give next-token logits at every position. From
them: perplexity of each, the KL divergence KL(reference || candidate) of the next-token
distributions per position (mean, 99th percentile, max), and top-1 agreement. Then both
continue a set of prompts greedily, and the share of tokens generated before the first
divergence is the greedy agreement. A verdict compares these with thresholds the user sets.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..backends import KNOWN, backend_class
from .common import (
    BenchError,
    _group_size,
    machine_info,
    model_variant,
    parse_list,
    parse_quantize,
)

SCHEMA_VERSION = 1
ROWS_PER_CHUNK = 64  # log-softmax in float64 over this many positions at a time


@dataclass(frozen=True)
class Thresholds:
    """Limits of a passing candidate; ``None`` leaves a figure unchecked."""

    max_mean_kl: float | None = 0.1
    max_p99_kl: float | None = None
    min_top1: float | None = 0.85
    max_ppl_ratio: float | None = 1.1
    min_greedy: float | None = None


@dataclass(frozen=True)
class Spec:
    """A backend and a storage format, written ``numpy-f32``."""

    backend: str
    quantize: str

    @classmethod
    def parse(cls, text: str) -> Spec:
        backend, sep, quant = text.strip().rpartition("-")
        if not sep or not backend:
            raise BenchError(f"{text!r}: write a backend and storage as BACKEND-QUANT, "
                             "e.g. numpy-f32")
        parse_quantize(quant)
        return cls(backend, quant)

    def __str__(self) -> str:
        return f"{self.backend}-{self.quantize}"


# -- inputs ------------------------------------------------------------------------------------
def builtin_text() -> str:
    """The shipped evaluation text (public-domain passages, see data/SOURCES.md)."""
    return resources.files("ondevice.bench").joinpath("data/builtin.txt").read_text("utf-8")


def builtin_prompts() -> list[dict]:
    """Prompts for the greedy-continuation check: chat messages or raw text."""
    data = resources.files("ondevice.bench").joinpath("data/prompts.json").read_text("utf-8")
    return json.loads(data)


def load_text(text_file: str | os.PathLike | None, dataset: str | None) -> tuple[str, str]:
    """(text, where it came from)."""
    if text_file is not None:
        path = Path(text_file)
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BenchError(f"cannot read --text {path}: {err}") from None
        if not text.strip():
            raise BenchError(f"--text {path} is empty")
        return text, str(path)
    if dataset in (None, "builtin"):
        return builtin_text(), "builtin"
    raise BenchError(f"unknown --dataset {dataset!r} (the one shipped is 'builtin')")


# -- metrics -----------------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def drift(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict:
    """Per-position figures of two ``[n, vocab]`` logit arrays over ``targets`` (``[n]``, the
    token that follows each position)."""
    if ref.shape != cand.shape:
        raise BenchError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    kl, agree, nll_ref, nll_cand = [], [], [], []
    rows = np.arange(len(targets))
    for lo in range(0, len(targets), ROWS_PER_CHUNK):
        sl = slice(lo, lo + ROWS_PER_CHUNK)
        lr, lc = log_softmax(ref[sl]), log_softmax(cand[sl])
        kl.append(np.sum(np.exp(lr) * (lr - lc), axis=-1))
        agree.append(lr.argmax(-1) == lc.argmax(-1))
        idx = rows[sl] - lo, targets[sl]
        nll_ref.append(-lr[idx])
        nll_cand.append(-lc[idx])
    # Rounding can leave an identical pair a hair below zero; KL itself never is.
    kl_all = np.maximum(np.concatenate(kl), 0.0)
    nr, nc = np.concatenate(nll_ref), np.concatenate(nll_cand)
    return {
        "positions": int(len(targets)),
        "kl": {"mean": float(kl_all.mean()), "p99": float(np.percentile(kl_all, 99)),
               "max": float(kl_all.max())},
        "top1_agreement": float(np.concatenate(agree).mean()),
        "reference_perplexity": float(math.exp(nr.mean())),
        "perplexity": float(math.exp(nc.mean())),
    }


def _prompt_ids(tokenizer, p: dict) -> list[int]:
    """A greedy prompt's ids: chat messages through the template, or, for a base model
    without one (Gemma 3 270M), their text as one raw prompt with the tokenizer's BOS."""
    if "messages" not in p:
        return tokenizer.encode(p["prompt"])
    if tokenizer.chat_template is None:
        text = "\n".join(m["content"] for m in p["messages"])
        return tokenizer.encode(text, add_special_tokens=True)
    return tokenizer.encode_chat(p["messages"], add_generation_prompt=True)


def greedy_agreement(ref: list[list[int]], cand: list[list[int]]) -> dict:
    """Share of each continuation generated before the first token that differs."""
    shares, identical = [], 0
    for a, b in zip(ref, cand, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        shares.append(n / max(len(a), 1))
        identical += a == b
    return {"prompts": len(ref), "tokens_each": len(ref[0]) if ref else 0,
            "agreement": float(np.mean(shares)) if shares else 1.0,
            "identical": identical, "per_prompt": shares}


def verdict(row: dict, t: Thresholds) -> list[str]:
    """The reasons a candidate fails (empty: it passes)."""
    fails = []
    if t.max_mean_kl is not None and not row["kl"]["mean"] <= t.max_mean_kl:
        fails.append(f"mean KL {row['kl']['mean']:.4g} > {t.max_mean_kl:g}")
    if t.max_p99_kl is not None and not row["kl"]["p99"] <= t.max_p99_kl:
        fails.append(f"p99 KL {row['kl']['p99']:.4g} > {t.max_p99_kl:g}")
    if t.min_top1 is not None and not row["top1_agreement"] >= t.min_top1:
        fails.append(f"top-1 agreement {row['top1_agreement']:.3f} < {t.min_top1:g}")
    if t.max_ppl_ratio is not None and not row["perplexity_ratio"] <= t.max_ppl_ratio:
        fails.append(f"perplexity ratio {row['perplexity_ratio']:.4g} > {t.max_ppl_ratio:g}")
    if t.min_greedy is not None and not row["greedy"]["agreement"] >= t.min_greedy:
        fails.append(f"greedy agreement {row['greedy']['agreement']:.3f} < {t.min_greedy:g}")
    return fails


# -- running models ----------------------------------------------------------------------------
class _Loaded:
    """A model on one backend with a KV pool just large enough for the evaluation."""

    def __init__(self, path: Path, backend: str, tokens_needed: int):
        from ..api import load
        from ..config import ModelConfig

        config = ModelConfig.from_file(path / "config.json")
        per_token = backend_class(backend).kv_bytes_per_token(config)
        self.model = load(path, backend=backend, quiet=True,
                                   kv_memory=per_token * (tokens_needed + 64))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.runtime.logits_for(ids)

    def greedy(self, prompts: list[dict], n: int) -> list[list[int]]:
        out = []
        for p in prompts:
            ids = self.prompt_ids(p)
            out.append([c.token_id for c in self.model.stream(
                ids, max_tokens=n, temperature=0, ignore_eos=True)])
        return out

    def prompt_ids(self, p: dict) -> list[int]:
        return _prompt_ids(self.model.tokenizer, p)

    def close(self) -> None:
        self.model.close()
        del self.model
        gc.collect()


class _CoreML:
    """A Core ML export of the model, run anywhere by the NumPy MIL interpreter that
    ``ondevice.converters.coreml`` verifies packages with (Core ML itself runs only on
    macOS). Exports are cached under ``bench/coreml`` in the ondevice home."""

    MODES = {"f16": "f16", "q8": "int8", "q4": "int4"}  # ours -> the exporter's
    CHUNK = 128  # tokens per predict call while scoring or prefilling

    def __init__(self, src: Path, quantize: str, tokens_needed: int, progress: bool):
        try:
            from ..converters.coreml import export_coreml, read_manifest
            from ..converters.coreml.interpreter import MILInterpreter
        except ImportError as err:
            raise BenchError(f"Core ML verification is not available: {err}") from None
        from ..default_model import home
        from ..modeldir import ModelDir

        if quantize not in self.MODES:
            raise BenchError(f"Core ML exports f16, q8 (int8) or q4 (int4), not {quantize}")
        md = ModelDir(src)
        try:
            self.tokenizer = md.tokenizer
            context = md.config.context_length
        finally:
            md.close()
        bs = 16
        max_context = min(context - context % bs, -(-(tokens_needed + 1) // bs) * bs)
        if max_context < tokens_needed:
            raise BenchError(f"{tokens_needed} tokens exceed the context {context}")
        self.storage = self.MODES[quantize]
        out = (home() / "bench" / "coreml" / f"{src.name}-{_dir_key(src)}-{self.storage}"
               f"-ctx{max_context}" / "model.mlpackage")
        if not (out.parent / "DONE").is_file():
            export_coreml(src, out, quantize=self.storage, max_context=max_context,
                          block_size=bs, logits="all", force=True, progress=progress)
            (out.parent / "DONE").write_text("")
        self.manifest = read_manifest(out)
        self.interp = MILInterpreter.open(out)
        self.block_size = self.manifest["block_size"]
        self.table = np.arange(self.manifest["max_blocks_per_sequence"], dtype=np.int32)
        self.blocks = [int(b) for b in self.table]

    def _forward(self, state, ids: list[int], start: int) -> np.ndarray:
        from ..batch import BatchInput

        batch = BatchInput.build([(ids, start, self.blocks)], self.block_size, logits_for="all")
        out = self.interp.predict({
            "input_ids": batch.token_ids, "positions": batch.positions,
            "slot_mapping": batch.slot_mapping, "block_table": self.table,
            "seq_len": batch.seq_lens,
        }, state)
        return np.asarray(out["logits"], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        state = self.interp.make_state()
        return np.concatenate([self._forward(state, ids[i:i + self.CHUNK], i)
                               for i in range(0, len(ids), self.CHUNK)])

    def greedy(self, prompts: list[dict], n: int) -> list[list[int]]:
        out = []
        for p in prompts:
            ids = _prompt_ids(self.tokenizer, p)
            state = self.interp.make_state()
            for i in range(0, len(ids), self.CHUNK):
                last = self._forward(state, ids[i:i + self.CHUNK], i)[-1]
            tokens = []
            for _ in range(n):
                tokens.append(int(np.argmax(last)))
                if len(tokens) < n:
                    last = self._forward(state, [tokens[-1]], len(ids) + len(tokens) - 1)[-1]
            out.append(tokens)
        return out

    def close(self) -> None:
        self.interp.close()
        gc.collect()


def _dir_key(path: Path) -> str:
    import hashlib

    parts = [str(path.resolve())]
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def text_ids(path: Path, text: str, max_tokens: int) -> list[int]:
    from ..modeldir import ModelDir

    md = ModelDir(path)
    try:
        ids = md.tokenizer.encode(text, add_special_tokens=True)
        limit = md.config.context_length - 1
    finally:
        md.close()
    if len(ids) < 2:
        raise BenchError("the evaluation text is shorter than two tokens")
    return ids[:min(max_tokens, limit)]


def run_eval(
    model: str | None, backends: list[str], quantize: list[str], *,
    candidates: list[str] | None = None, against: str = "numpy-f32", reference_model: str | None = None,
    text_file: str | None = None, dataset: str | None = None, max_tokens: int = 512,
    greedy_tokens: int = 32, group_size: int = 64, thresholds: Thresholds | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate every ``backend`` x ``quantize`` candidate, and every ``candidates`` spec
    (``"mlx-q4"``), against the reference spec and return the report (``verdict`` is
    ``"pass"`` when every candidate passes)."""
    from tqdm import tqdm

    thresholds = thresholds or Thresholds()
    backends = parse_list(backends)
    quantize = parse_quantize(quantize) or ["f32"]
    ref_spec = Spec.parse(against)
    specs = [Spec(b, q) for b in backends for q in quantize]
    specs += [Spec.parse(c) for c in parse_list(candidates)]
    specs = list(dict.fromkeys(specs))
    if not specs:
        raise BenchError("nothing to evaluate: give --backend B (and --quantize) or --candidate")
    if max_tokens < 2 or greedy_tokens < 1:
        raise BenchError("--max-tokens must be >= 2 and --greedy-tokens >= 1")
    for b in dict.fromkeys([*(c.backend for c in specs), ref_spec.backend]):
        if b == "coreml" and b != ref_spec.backend:
            # A candidate through the exporter and its interpreter, on any OS.
            for c in specs:
                if c.backend == "coreml" and c.quantize not in _CoreML.MODES:
                    raise BenchError(
                        f"Core ML exports f16, q8 (int8) or q4 (int4), not {c.quantize}")
            continue
        if b not in KNOWN:
            raise BenchError(f"unknown backend {b!r} (known: {', '.join(KNOWN)})")
        backend_class(b)  # BackendUnavailableError says why it cannot run here
    text, source = load_text(text_file, dataset)
    prompts = builtin_prompts()
    bar = tqdm(total=2 * (len(specs) + 1), desc="eval", unit="step", file=sys.stderr,
               disable=not progress, leave=False)

    def tick(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    try:
        ref_path = model_variant(reference_model if reference_model is not None else model,
                                 ref_spec.quantize, group_size=group_size, quiet=not progress)
        ids = text_ids(ref_path, text, max_tokens)
        need = max(len(ids), 128 + greedy_tokens)  # the greedy prompts are short
        ref = _Loaded(ref_path, ref_spec.backend, need)
        try:
            ref_logits = ref.logits(ids)[:-1]  # the last position has no next token in the text
            tick(f"reference {ref_spec} text")
            ref_greedy = ref.greedy(prompts, greedy_tokens)
            tick(f"reference {ref_spec} greedy")
        finally:
            ref.close()
        targets = np.asarray(ids[1:])
        rows = []
        for spec in specs:
            if spec.backend == "coreml":
                # Exported from the float32 weights: the package's own storage is the
                # quantization (f16, or Core ML's int8/int4).
                path = model_variant(model, "f32", quiet=not progress)
                cand = _CoreML(path, spec.quantize, need, progress)
            else:
                path = model_variant(model, spec.quantize, group_size=group_size,
                                     quiet=not progress)
                cand = _Loaded(path, spec.backend, need)
            try:
                row = drift(ref_logits, cand.logits(ids)[:-1], targets)
                tick(f"{spec} text")
                row["greedy"] = greedy_agreement(ref_greedy, cand.greedy(prompts, greedy_tokens))
                tick(f"{spec} greedy")
            finally:
                cand.close()
            row = {"backend": spec.backend, "quantize": spec.quantize, "model_dir": str(path),
                   "storage": getattr(cand, "storage", spec.quantize),
                   "group_size": None if spec.backend == "coreml" else _group_size(path),
                   "runs_on": "MIL interpreter (NumPy)" if spec.backend == "coreml"
                   else spec.backend,
                   **row, "perplexity_ratio": row["perplexity"] / row["reference_perplexity"]}
            row["failures"] = verdict(row, thresholds)
            row["verdict"] = "fail" if row["failures"] else "pass"
            rows.append(row)
        del ref_logits
        return {
            "schema": "ondevice.eval", "schema_version": SCHEMA_VERSION,
            "model": model or "default (SmolLM2-135M-Instruct)",
            "reference": {"backend": ref_spec.backend, "quantize": ref_spec.quantize,
                          "model_dir": str(ref_path),
                          "perplexity": rows[0]["reference_perplexity"] if rows else None},
            "text": {"source": source, "tokens": len(ids), "positions": len(ids) - 1},
            "greedy_prompts": len(prompts), "greedy_tokens": greedy_tokens,
            "thresholds": asdict(thresholds),
            "machine": machine_info(),
            "candidates": rows,
            "verdict": "fail" if any(r["failures"] for r in rows) else "pass",
        }
    finally:
        bar.close()


def format_eval(report: dict) -> str:
    """The table printed by ``ondevice eval``."""
    ref = report["reference"]
    lines = [f"reference {ref['backend']}-{ref['quantize']}: perplexity "
             f"{ref['perplexity']:.4f} on {report['text']['positions']} positions "
             f"({report['text']['source']})",
             f"{'candidate':<14}{'ppl':>9}{'ppl ratio':>10}{'KL mean':>11}{'KL p99':>11}"
             f"{'KL max':>11}{'top-1':>8}{'greedy':>8}  verdict"]
    for r in report["candidates"]:
        lines.append(
            f"{r['backend'] + '-' + r['quantize']:<14}{r['perplexity']:>9.4f}"
            f"{r['perplexity_ratio']:>10.4f}{r['kl']['mean']:>11.3e}{r['kl']['p99']:>11.3e}"
            f"{r['kl']['max']:>11.3e}{r['top1_agreement']:>8.3f}"
            f"{r['greedy']['agreement']:>8.3f}  {r['verdict'].upper()}"
            + (f" ({'; '.join(r['failures'])})" if r["failures"] else ""))
    t = report["thresholds"]
    lines.append("thresholds: " + ", ".join(f"{k}={v}" for k, v in t.items() if v is not None))
    lines.append(f"verdict: {report['verdict'].upper()}")
    return "\n".join(lines)


__all__ = ["Spec", "Thresholds", "drift", "format_eval", "run_eval"]
