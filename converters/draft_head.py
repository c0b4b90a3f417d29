"""A draft model with a trimmed output head: the speculative-decoding draft computes logits
for only the N most frequent tokens (the idea of FR-Spec, Zhao et al. 2025).

A small model's output head is a large share of what one decode step reads: Gemma 3 270M's
tied 262,144-token head is 63% of its weights. A draft only has to propose the target's
likely next tokens, and most running text uses few distinct ones, so its head can keep the
rows of the N tokens seen most often in a corpus. Its proposals are then always among
those N: a target token outside them is a rejected proposal, never a wrong output
(verification decides every emitted token).

The output directory is the source model plus ``lm_head.weight`` holding those rows (kept
in the source head's format, quantized or not), ``draft_head.json`` listing their token
ids in row order, and ``draft_head_tokens`` in config.json. The embedding is unchanged, so
the draft still reads every token of the context.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, OndeviceError
from ..modeldir import DRAFT_HEAD_FILE, ModelDir
from ..weights import SafetensorsWriter

HEAD = "lm_head"


def rank_tokens(tokenizer, texts: Iterable[str], vocab_size: int) -> np.ndarray:
    """Every token id, the most frequent in ``texts`` first (ties and unseen tokens in id
    order: byte-level vocabularies list their shortest, most reusable pieces first)."""
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    freq = np.zeros(vocab_size, dtype=np.int64)
    for tid, n in counts.items():
        if 0 <= tid < vocab_size:
            freq[tid] = n
    return np.argsort(-freq, kind="stable")


def head_token_ids(tokenizer, texts: Iterable[str], n: int, vocab_size: int) -> np.ndarray:
    """The ``n`` tokens a trimmed draft head keeps: the tokenizer's end-of-turn tokens, then
    the most frequent in ``texts`` (`rank_tokens`)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= vocab_size:
        raise OndeviceError(f"a draft head keeps 1 to {vocab_size} tokens, not {n!r}")
    first = [t for t in dict.fromkeys(getattr(tokenizer, "eos_token_ids", ()))
             if 0 <= t < vocab_size]
    rest = [int(t) for t in rank_tokens(tokenizer, texts, vocab_size) if int(t) not in first]
    return np.asarray((first + rest)[:n], dtype=np.int64)


def make_draft_head(src: str | Path, out: str | Path, token_ids: Iterable[int], *,
                    force: bool = False) -> Path:
    """Write ``src`` with a head trimmed to ``token_ids`` (row order = list order) to ``out``.

    Special tokens the tokenizer ends a turn with are worth including: a draft that cannot
    propose the end of a reply just gets its last proposal rejected.
    """
    src, out = Path(src), Path(out)
    md = ModelDir(src)
    c = md.config
    if c.draft_head_tokens:
        raise OndeviceError(f"{src} already has a trimmed draft head")
    ids = np.asarray(list(token_ids), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= c.vocab_size:
        raise OndeviceError(f"draft head token ids must be ids in [0, {c.vocab_size})")
    if np.unique(ids).size != ids.size:
        raise OndeviceError("draft head token ids repeat a token")
    if out.exists():
        if not force:
            raise OndeviceError(f"{out} exists (pass force=True to overwrite)")
        shutil.rmtree(out)
    source = HEAD if not c.tie_word_embeddings and f"{HEAD}.weight" in md.weights \
        else "model.embed_tokens"
    parts = [p for p in ("weight", "scales", "biases") if f"{source}.{p}" in md.weights]
    if parts != ["weight"] and parts != ["weight", "scales", "biases"]:
        raise ModelFormatError(f"{src}: {source} has an unexpected set of tensors")

    out.mkdir(parents=True)
    try:
        keep = [n for n in md.weights if not n.startswith(HEAD + ".")]
        arrays = {n: md.weights.get(n) for n in keep}  # memory-mapped views (bf16 widened)
        rows = {f"{HEAD}.{p}": md.weights.get(f"{source}.{p}")[ids] for p in parts}
        tensors = {**arrays, **rows}
        writer = SafetensorsWriter(out / "model.safetensors",
                                   [(n, a.dtype, a.shape) for n, a in tensors.items()])
        try:
            for name, array in tensors.items():
                writer.write(name, array)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        config["draft_head_tokens"] = int(ids.size)
        if len(parts) == 3:  # the trimmed head keeps its source's group size and bits
            gs, bits = md.quant_params(source)
            config["quantization"] = {**config["quantization"],
                                      HEAD: {"group_size": gs, "bits": bits}}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / DRAFT_HEAD_FILE).write_text(json.dumps({"token_ids": ids.tolist()}))
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model.") \
                    and f.name != DRAFT_HEAD_FILE:
                shutil.copy(f, out / f.name)
        ModelDir(out)  # the result loads
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
