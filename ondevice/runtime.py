"""A loaded model on one backend with its KV pool, and token-level generation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends import backend_class, resolve
from .batch import BatchInput
from .errors import RequestError
from .kv import SimpleBlockAllocator
from .modeldir import ModelDir
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # tokens per forward pass while reading a prompt: bounds attention memory
DEFAULT_KV_MEMORY = 256 << 20


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_size(text: str | int) -> int:
    """``"256MiB"``, ``"1GB"``, ``"512m"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, scale = s[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        value = float(s) * scale
    except ValueError:
        raise RequestError(f"cannot read memory size {text!r} (try 256MiB or 1GiB)") from None
    if value <= 0:
        raise RequestError(f"memory size must be positive, got {text!r}")
    return int(value)


@dataclass
class Step:
    """One generated token."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # "stop" (eos / stop token), "length", or None


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of the prefill pass; the rest are decode steps.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Runtime:
    """Model + backend + KV pool. ``generate_ids`` streams tokens for one prompt at a time."""

    def __init__(
        self, model_dir: ModelDir, backend: str = "auto", *, kv_memory: int | str | None = None,
        block_size: int = 16,
    ):
        self.model_dir = model_dir
        self.config = model_dir.config
        self.backend_name = resolve(backend)
        cls = backend_class(self.backend_name)
        per_block = cls.kv_bytes_per_token(self.config) * block_size
        if kv_memory is None:
            # Enough for one full context, at least DEFAULT_KV_MEMORY, at most a quarter of RAM.
            budget = max(DEFAULT_KV_MEMORY, self.config.context_length * per_block // block_size)
            budget = min(budget, _total_memory() // 4)
        else:
            budget = parse_size(kv_memory)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise RequestError(f"KV memory {budget} bytes is less than one block ({per_block} bytes)")
        self.backend = cls(model_dir, num_blocks=num_blocks, block_size=block_size)
        # The backend holds its own copy of the weights now: unmap the files so that their
        # pages stop counting against this process.
        model_dir.close()
        self.allocator = SimpleBlockAllocator(num_blocks, block_size)
        self.timings = Timings()

    @property
    def tokenizer(self):
        return self.model_dir.tokenizer

    @property
    def max_tokens_in_pool(self) -> int:
        return self.allocator.num_blocks * self.allocator.block_size

    @property
    def context_limit(self) -> int:
        return min(self.config.context_length, self.max_tokens_in_pool)

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise RequestError("the prompt is empty")
        if num_prompt_tokens >= self.context_limit:
            raise RequestError(
                f"prompt has {num_prompt_tokens} tokens; the limit is {self.context_limit - 1} "
                f"(context {self.config.context_length}, KV pool {self.max_tokens_in_pool} tokens)"
            )

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Step]:
        """Yield generated tokens until eos, a stop token, ``max_tokens`` or the context ends.

        Stop *strings* are the caller's business (they need text). Closing the generator early
        frees the sequence's blocks.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(len(prompt_ids))
        vocab = self.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        sampler = Sampler(params)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        stop_ids = eos | set(params.stop_token_ids)
        table: list[int] = []
        output: list[int] = []
        timings = self.timings = Timings(prompt_tokens=len(prompt_ids))
        bs = self.allocator.block_size
        try:
            # Prefill in chunks; only the last chunk's last row needs logits.
            t0 = time.perf_counter()
            done = 0
            while done < len(prompt_ids):
                chunk = prompt_ids[done : done + PREFILL_CHUNK]
                self.allocator.grow(table, done + len(chunk))
                logits = self.backend.forward(BatchInput.build([(chunk, done, table)], bs))
                done += len(chunk)
            timings.prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            while True:
                result = sampler.sample(logits[0], prompt_ids, output)
                token = int(result.token_id)
                output.append(token)
                timings.generated_tokens = len(output)
                total = len(prompt_ids) + len(output)
                if token in stop_ids:
                    finish = "stop"
                elif len(output) >= params.max_tokens or total >= self.context_limit:
                    finish = "length"
                else:
                    finish = None
                yield Step(token, result.logprob, result.top_logprobs, finish)
                if finish:
                    return
                self.allocator.grow(table, total)
                logits = self.backend.forward(BatchInput.build([([token], total - 1, table)], bs))
                timings.decode_seconds = time.perf_counter() - t0
        finally:
            timings.decode_seconds = time.perf_counter() - t0
            self.allocator.free(table)

    def logits_for(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits after every position of ``token_ids`` (float32 ``[n, vocab]``)."""
        self.check_prompt(len(token_ids))
        table: list[int] = []
        rows = []
        try:
            for done in range(0, len(token_ids), PREFILL_CHUNK):
                chunk = token_ids[done : done + PREFILL_CHUNK]
                self.allocator.grow(table, done + len(chunk))
                batch = BatchInput.build([(chunk, done, table)], self.allocator.block_size, "all")
                rows.append(self.backend.forward(batch))
        finally:
            self.allocator.free(table)
        return np.concatenate(rows)
