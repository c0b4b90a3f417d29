"""The Python API for apps that embed ondevice."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .default_model import resolve_model
from .errors import RequestError
from .modeldir import ModelDir
from .runtime import Runtime, Timings
from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer

Prompt = str | Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a reply."""

    text: str  # new text (may be "" while a multi-byte character or a stop string is pending)
    token_id: int | None  # None for a final flush of held-back text
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Model:
    """A model ready to generate. Build it with :func:`ondevice.load`."""

    def __init__(self, runtime: Runtime, path: Path):
        self.runtime = runtime
        self.path = path

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def config(self):
        return self.runtime.config

    @property
    def backend(self) -> str:
        return self.runtime.backend_name

    @property
    def timings(self) -> Timings:
        """Token counts and timings of the last generation."""
        return self.runtime.timings

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a raw text prompt, or for chat messages through the chat template."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Iterator[Chunk]:
        """Stream the reply to ``prompt``.

        ``prompt`` is raw text (completed as it is) or a list of chat messages
        (``{"role": ..., "content": ...}``, rendered with the model's chat template).
        Sampling options are :class:`SamplingParams` fields, given as keywords or as ``params``.
        """
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise RequestError("pass sampling options either as params or as keywords, not both")
        ids = prompt if _is_token_ids(prompt) else self.encode_prompt(prompt)
        detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=True, stop=params.stop)
        steps = self.runtime.generate_ids(list(ids), params)
        try:
            for step in steps:
                text = detok.add(step.token_id)
                if detok.stopped:
                    yield Chunk(text, step.token_id, "stop", step.logprob, step.top_logprobs)
                    return
                if step.finish_reason:
                    text += detok.flush()
                yield Chunk(text, step.token_id, step.finish_reason, step.logprob, step.top_logprobs)
        finally:
            steps.close()  # frees the KV blocks even when the caller stops early

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> str:
        """The whole reply to ``prompt`` as a string (see :meth:`stream`)."""
        return "".join(c.text for c in self.stream(prompt, params, **sampling))


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def load(
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    *,
    kv_memory: int | str | None = None,
    block_size: int = 16,
    quiet: bool = False,
) -> Model:
    """Load a model for generation.

    Args:
        model: a model directory, a ``.gguf`` file (converted once into the cache), or None
            for the embedded default model (SmolLM2-135M-Instruct).
        backend: ``"auto"`` or a backend name (see ``ondevice backends``).
        kv_memory: KV cache budget in bytes or as text (``"256MiB"``); default: one full
            context, at least 256 MiB.
        block_size: tokens per KV block.
    """
    path = resolve_model(model, quiet=quiet)
    runtime = Runtime(ModelDir(path), backend, kv_memory=kv_memory, block_size=block_size)
    _ = runtime.tokenizer  # load now so that a missing tokenizer fails here, not mid-chat
    return Model(runtime, path)
