"""A multi-turn conversation that keeps within the model's context."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .api import Chunk, Model
from .errors import RequestError
from .sampling import SamplingParams


@dataclass
class TurnStats:
    """Figures of one reply: token counts, wall time, speeds and time to first token."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    cached_prompt_tokens: int = 0
    prefill_tps: float = 0.0  # prompt tokens computed (not reused from the cache) per second
    decode_tps: float = 0.0  # tokens per second after the first
    ttft_seconds: float = 0.0  # from sending the prompt to the first token
    dropped_messages: int = 0


@dataclass
class SessionTotals:
    """Sums over every reply of a session (kept across /reset)."""

    replies: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


@dataclass
class ChatSession:
    """Messages so far plus an optional system prompt, sent through one :class:`Model`.

    When a conversation outgrows the context, the oldest turns are dropped (never the system
    prompt) and ``last.dropped_messages`` says how many.

    A base model (no chat template, e.g. Gemma 3 270M) is not chatted with: the conversation
    is one raw text (system prompt, then every message and reply as written) that the model
    continues; see :attr:`base_model`.
    """

    model: Model
    params: SamplingParams
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last: TurnStats = field(default_factory=TurnStats)
    total_generated: int = 0
    totals: SessionTotals = field(default_factory=SessionTotals)

    def prefix_ids(self) -> list[int]:
        """Tokens every turn's prompt starts with: the system part of the chat template (the
        longest common prefix of two different conversations), for a prompt cache."""
        a = self._render([{"role": "user", "content": "a"}])
        b = self._render([{"role": "user", "content": "b b"}])
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return a[:n]

    def reset(self) -> None:
        self.messages.clear()

    def _messages(self, messages: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages if messages is None else messages)

    @property
    def base_model(self) -> bool:
        """The model has no chat template: each turn completes the raw text so far."""
        return self.model.tokenizer.chat_template is None

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        if self.base_model:
            head = f"{self.system}\n" if self.system else ""
            text = head + "".join(m["content"] for m in messages)
            return self.model.tokenizer.encode(text, add_special_tokens=True)
        return self.model.tokenizer.encode_chat(self._messages(messages),
                                                add_generation_prompt=True)

    def _fit(self) -> tuple[list[int], int]:
        """Prompt ids for the conversation, dropping the oldest turns until a reply fits."""
        limit = self.model.context_limit
        reserve = min(self.params.max_tokens, max(limit // 4, 1))  # room left for the reply
        dropped = 0
        while True:
            ids = self._render(self.messages)
            if len(ids) + reserve <= limit or len(self.messages) <= 1:
                break
            # Drop the oldest user turn and the assistant reply that followed it.
            n = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:n]
            dropped += n
        if len(ids) >= limit:
            self.messages.pop()
            raise RequestError(
                f"the message is too long: {len(ids)} tokens with the system prompt, "
                f"the context holds {limit - 1}"
            )
        return ids, dropped

    def send(self, text: str) -> Iterator[Chunk]:
        """Add a user message and stream the assistant's reply (kept in the history, even if
        the caller stops early)."""
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        self.last = TurnStats(prompt_tokens=len(ids), dropped_messages=dropped)
        reply: list[str] = []
        t0 = time.perf_counter()
        # A routed model may send the turn to a cloud endpoint, which takes messages, not ids.
        prompt = self._messages() if getattr(self.model, "routes_requests", False) else ids
        try:
            for chunk in self.model.stream(prompt, self.params):
                reply.append(chunk.text)
                yield chunk
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            timings = self.model.timings
            self.last.generated_tokens = timings.generated_tokens
            self.last.cached_prompt_tokens = timings.cached_prompt_tokens
            self.last.seconds = time.perf_counter() - t0
            self.last.prefill_tps = timings.prefill_tps
            self.last.decode_tps = timings.decode_tps
            self.last.ttft_seconds = timings.prefill_seconds
            self.total_generated += timings.generated_tokens
            t = self.totals
            t.replies += 1
            t.prompt_tokens += self.last.prompt_tokens
            t.cached_prompt_tokens += timings.cached_prompt_tokens
            t.generated_tokens += timings.generated_tokens
            t.seconds += self.last.seconds

    def stats(self) -> dict[str, object]:
        return {
            "backend": self.model.backend,
            "messages": len(self.messages),
            "context_tokens": len(self._render(self.messages)) if self.messages else 0,
            "context_limit": self.model.context_limit,
            "last_prompt_tokens": self.last.prompt_tokens,
            "last_cached_prompt_tokens": self.last.cached_prompt_tokens,
            "last_generated_tokens": self.last.generated_tokens,
            "prefill_tok_per_s": round(self.last.prefill_tps, 1),
            "decode_tok_per_s": round(self.last.decode_tps, 1),
            "last_ttft_s": round(self.last.ttft_seconds, 3),
            "total_generated_tokens": self.total_generated,
            "total_prompt_tokens": self.totals.prompt_tokens,
            "total_cached_prompt_tokens": self.totals.cached_prompt_tokens,
            "replies": self.totals.replies,
            **self.model.stats(),
        }
