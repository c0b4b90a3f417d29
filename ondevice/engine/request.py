"""Requests, their sequences (one per parallel sample), and what the engine reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..constraints import Matcher
from ..sampling import Sampler, SamplingParams
from ..tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: the prompt plus what has been sampled for it so far.

    ``token_ids`` always ends with the last sampled token, whose KV is not computed yet, so a
    decode step and a (resumed) prefill are the same thing: compute
    ``token_ids[num_computed:]``, then sample when the end is reached.
    """

    seq_id: str
    request: Request
    index: int
    token_ids: list[int]
    sampler: Sampler
    detok: IncrementalDetokenizer | None
    status: Status = Status.WAITING
    num_computed: int = 0
    num_output: int = 0
    finish_reason: str | None = None
    # The sequence's place in its request's decoding constraint (ondevice.constraints.Matcher);
    # it has consumed exactly the output tokens, so it survives preemption as it is.
    matcher: Matcher | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_output :] if self.num_output else []

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    first_token_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.status.finished for s in self.seqs)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one sequence of a request.

    ``token_ids`` and ``text`` are the new token(s) and text of this step; ``finish_reason`` is
    set on a sequence's last output ("stop", "length" or "abort"). ``index`` tells the parallel
    samples of an ``n > 1`` request apart.
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
