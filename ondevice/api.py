"""The Python API for apps that embed ondevice."""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constraints import Constraint
from .default_model import resolve_model
from .errors import RequestError, UnknownSamplingOptionError
from .modeldir import ModelDir
from .runtime import Runtime
from .sampling import SamplingParams
from .settings import BackendOptions, EngineConfig

Prompt = str | Sequence[dict[str, Any]] | list[int]


def sampling_params(params: SamplingParams | None = None, **sampling: Any) -> SamplingParams:
    """``params`` as given, or :class:`SamplingParams` built from keywords. An unknown keyword
    raises :class:`~ondevice.errors.UnknownSamplingOptionError` naming it, the closest
    accepted one and the full list (a typo is the usual cause)."""
    if params is not None:
        if sampling:
            raise RequestError("pass sampling options either as params or as keywords, "
                               "not both")
        return params
    _constraint_keywords(sampling)
    accepted = [f.name for f in dataclasses.fields(SamplingParams)] + list(CONSTRAINT_KEYWORDS)
    unknown = [k for k in sampling if k not in accepted]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownSamplingOptionError(
            f"unknown sampling option {name!r}; {hint}accepted: {', '.join(accepted)}",
            field=name)
    return SamplingParams(**sampling)


CONSTRAINT_KEYWORDS = ("response_format", "json_schema", "regex", "grammar")
"""Shorthands for ``SamplingParams.constraint``: OpenAI's ``response_format`` dict, a JSON
schema (dict or JSON text), a regular expression, or a Lark/GBNF grammar. One at most."""


def _constraint_keywords(sampling: dict[str, Any]) -> None:
    """Turn a constraint shorthand in ``sampling`` into its ``constraint`` (in place)."""
    given = [k for k in CONSTRAINT_KEYWORDS if sampling.get(k) is not None]
    for k in CONSTRAINT_KEYWORDS:
        if k in sampling and sampling[k] is None:  # an explicit None means "none"
            del sampling[k]
    if not given:
        return
    if len(given) > 1 or sampling.get("constraint") is not None:
        names = given + (["constraint"] if sampling.get("constraint") is not None else [])
        raise RequestError(f"pass one constraint at most, got {', '.join(names)}")
    name = given[0]
    value = sampling.pop(name)
    if name == "response_format":
        sampling["constraint"] = Constraint.from_response_format(value)
    elif name == "json_schema":
        sampling["constraint"] = Constraint.json_schema(value)
    elif name == "regex":
        sampling["constraint"] = Constraint.regex(value)
    else:
        sampling["constraint"] = Constraint.grammar(value)


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a reply."""

    text: str  # new text (may be "" while a multi-byte character or a stop string is pending)
    token_id: int | None
    finish_reason: str | None = None  # "stop" or "length" on a sample's last chunk
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    index: int = 0  # which sample, for n > 1


@dataclass
class Timings:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # submission to first token
    decode_seconds: float = 0.0  # first token to last token

    @property
    def prefill_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        steps = max(self.generated_tokens - 1, 0)  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class _Clock:
    """Times one generation into its model's ``timings`` and turns engine outputs into
    :class:`Chunk` s (for :meth:`Model.stream` and :meth:`Model.astream` alike)."""

    def __init__(self, model: Model, prompt_tokens: int):
        self.model = model
        self.timings = Timings(prompt_tokens=prompt_tokens)
        self.start = time.perf_counter()
        self.first: float | None = None

    def chunk(self, out) -> Chunk:
        now, t = time.perf_counter(), self.timings
        if self.first is None:
            self.first = now
            t.prefill_seconds = now - self.start
            t.cached_prompt_tokens = out.num_cached_tokens
        t.generated_tokens += len(out.token_ids)
        t.decode_seconds = now - self.first
        self.model.timings = t
        return Chunk(out.text, out.token_ids[0] if out.token_ids else None, out.finish_reason,
                     out.logprob, out.top_logprobs, out.index)


class Model:
    """A model ready to generate. Build it with :func:`ondevice.load`. Thread-safe: requests
    from several threads are batched together by the engine. A context manager: ``with
    ondevice.load() as model: ...`` closes it (and frees its KV pool) at the end."""

    def __init__(self, runtime: Runtime, path: Path):
        self.runtime = runtime
        self.path = path
        self.timings = Timings()  # of the last generation that finished in this thread's call
        self._front = None  # the asyncio front, made on first astream()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    def context_limit(self) -> int:
        """Tokens a prompt plus its reply may hold (the model's context or the KV pool)."""
        return self.runtime.context_limit

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for raw text, for chat messages (through the chat template), or ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        prompt = list(prompt)
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Iterator[Chunk]:
        """Stream the reply to ``prompt``.

        ``prompt`` is raw text (completed as it is), a list of chat messages
        (``{"role": ..., "content": ...}``, rendered with the model's chat template), or token
        ids. Sampling options are :class:`SamplingParams` fields, given as keywords or as
        ``params``. Closing the iterator early cancels the request and frees its KV blocks.
        """
        params = sampling_params(params, **sampling)
        ids = self.encode_prompt(prompt)
        self._compile(params)
        clock = _Clock(self, len(ids))
        for out in self.runtime.sync.generate(ids, params):
            yield clock.chunk(out)

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None,
                      **sampling) -> AsyncIterator[Chunk]:
        """:meth:`stream` for asyncio apps: ``async for chunk in model.astream(...)``.

        The engine runs on its own thread; this coroutine only waits for its outputs, so the
        event loop stays free, and concurrent calls are batched together as threads' are.
        Leaving the loop early (``break``, cancellation) aborts the request and frees its KV
        blocks. ``timings`` is updated as with :meth:`stream`.
        """
        from .engine import AsyncEngine

        params = sampling_params(params, **sampling)
        ids = self.encode_prompt(prompt)
        self._compile(params)
        if self._front is None:  # one front per model: it holds no state but the loop
            self._front = AsyncEngine(self.runtime.loop)
        clock = _Clock(self, len(ids))
        gen = self._front.generate(ids, params)
        try:
            async for out in gen:
                yield clock.chunk(out)
        finally:
            await gen.aclose()  # aborts the engine request when we stop early

    def _compile(self, params: SamplingParams) -> None:
        """Compile the request's constraint here, on the caller's thread (cached), so that
        the engine thread, which steps every running request, only finds it in the cache."""
        if params.constraint is not None:
            self.runtime.engine.constraints.compile(params.constraint)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 **sampling) -> str | list[str]:
        """The whole reply to ``prompt`` (see :meth:`stream`); a list of replies when n > 1.

        Structured output: ``response_format={"type": "json_schema", "json_schema":
        {"schema": {...}}}`` (or ``{"type": "json_object"}``), or the shorthands
        ``json_schema={...}``, ``regex="..."``, ``grammar="..."`` (Lark or GBNF); the reply
        then always matches unless it is cut short (``finish_reason == "length"``).
        ``logit_bias={token_id: bias}`` shifts single tokens (-100 bans, 100 forces)."""
        texts: dict[int, list[str]] = {}
        n = 1
        for chunk in self.stream(prompt, params, **sampling):
            texts.setdefault(chunk.index, []).append(chunk.text)
            n = max(n, chunk.index + 1)
        replies = ["".join(texts.get(i, [])) for i in range(n)]
        return replies[0] if sampling_params(params, **sampling).n == 1 else replies

    def save_prompt_cache(self, path: str | os.PathLike, prompt: Prompt) -> int:
        """Save the KV of ``prompt``'s full blocks to ``path`` (safetensors); returns the
        number of tokens saved. A later process loads it to skip that prefill."""
        from .engine.prompt_cache import save_prompt_cache

        ids = self.encode_prompt(prompt)
        return self.runtime.loop.call(lambda: save_prompt_cache(self.runtime.engine, ids, path))

    def load_prompt_cache(self, path: str | os.PathLike) -> int:
        """Load a saved prompt cache into the KV pool; requests starting with its tokens reuse
        it. Returns the number of tokens loaded. The model and block size must match."""
        from .engine.prompt_cache import load_prompt_cache

        return self.runtime.loop.call(lambda: load_prompt_cache(self.runtime.engine, path))

    def stats(self) -> dict:
        """Engine metrics: running/waiting, KV blocks, utilization, prefix hits, tokens/s."""
        return self.runtime.stats()

    def close(self) -> None:
        self.runtime.close()


def load(
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    *,
    engine: EngineConfig | None = None,
    options: BackendOptions | dict[str, Any] | None = None,
    kv_memory: int | str | None = None,
    block_size: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    enable_prefix_caching: bool | None = None,
    quiet: bool = False,
) -> Model:
    """Load a model for local generation (``ondevice.load`` adds the ``policy`` keyword).

    Args:
        model: a model name (``ondevice list``; an alias such as ``"smollm2:135m"``, a Hub
            repo ``"org/name[:TAG]"`` or a model package, pulled into the store on first
            use), a model directory, a ``.gguf`` file (imported once into the store), or None
            for the embedded default model (SmolLM2-135M-Instruct).
        backend: ``"auto"`` or a backend name (see ``ondevice backends``).
        engine: an :class:`ondevice.EngineConfig` (block size, sequences, token budget,
            prefix caching, KV memory); the keywords below override single fields of it.
        options: the backend's options (e.g. :class:`ondevice.MlxOptions`), or a dict of
            overrides on top of the environment's defaults (``{"threads": 2}``).
        kv_memory: KV cache budget in bytes or as text (``"256MiB"``); default: one full
            context, at least 256 MiB, at most a quarter of the free memory.
        block_size: tokens per KV block (16).
        max_num_seqs: sequences decoded together at most (64).
        max_num_batched_tokens: tokens per engine step; longer prompts are chunked (512).
        enable_prefix_caching: reuse the KV of shared prompt prefixes across requests (True).
        quiet: no progress output while a GGUF file is imported.
    """
    engine = (engine or EngineConfig()).merged(
        kv_memory=kv_memory, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching)
    spec = engine.speculative
    if spec is not None and spec.draft_model is not None:
        # A draft given as a .gguf file is converted once, like the model itself.
        import dataclasses

        draft = str(resolve_model(spec.draft_model, quiet=quiet))
        engine = dataclasses.replace(engine, speculative=dataclasses.replace(spec,
                                                                             draft_model=draft))
    path = resolve_model(model, quiet=quiet)
    md = ModelDir(path)
    _ = md.tokenizer  # load now so that a missing tokenizer fails here, not mid-chat
    runtime = Runtime(md, backend, engine=engine, options=options)
    return Model(runtime, path)
