"""Which sequences run this step, and with how many tokens: continuous batching.

Every step: running sequences first (decode rows and unfinished prefill chunks, oldest first),
each growing its block table; when the pool runs out, the newest running sequence is preempted
(its blocks freed, recomputed later). Then, if nothing was preempted, waiting sequences are
admitted first come, first served, each reusing its longest cached prefix. A per-step token
budget splits long prompts into chunks (chunked prefill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..kv import KVCacheManager
from .request import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)
    # Speculative decoding: slots allocated past a sequence's new tokens for its proposals.
    spec: dict[Sequence, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sequence joins right after its parent, sharing its blocks."""
        seq.status = Status.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, speculate: dict[Sequence, tuple[int, bool]] | None = None
                 ) -> SchedulerOutput:
        """``speculate``: per decoding sequence, ``(k, pinned)``: slots for k proposed tokens
        to allocate after its last token. They shrink to the step's remaining token budget
        unless pinned (a pinned k must not depend on the batch; the budget is then exceeded
        by at most k), and are dropped rather than preempting anyone when blocks run short."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n <= 0:  # nothing to compute (cannot happen for a live sequence; be safe)
                i += 1
                continue
            extra, pinned = (speculate or {}).get(seq, (0, False))
            if n < seq.num_uncomputed:
                extra = 0
            elif not pinned:
                extra = min(extra, budget - n)
            # The slots are allocated before the proposals exist (a draft model runs after
            # scheduling); allocate_slots only checks the token list's length.
            if extra > 0 and self.kv.allocate_slots(
                    seq.seq_id, seq.token_ids + [0] * extra, n + extra) is not None:
                out.scheduled.append((seq, n))
                out.spec[seq] = extra
                budget -= n + extra
                i += 1
                continue
            while self.kv.allocate_slots(seq.seq_id, seq.token_ids, n) is None:
                victim = self.running.pop()  # the newest running sequence goes first
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out  # no admissions in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            blocks, cached = self.kv.get_computed_blocks(seq.seq_id, seq.token_ids)
            n = min(len(seq.token_ids) - cached, budget)
            if self.kv.allocate_slots(seq.seq_id, seq.token_ids, n, blocks) is None:
                break  # head of the queue does not fit yet: keep FCFS order
            self.waiting.popleft()
            seq.num_computed = cached
            if seq.index == 0 and seq.num_output == 0:
                seq.request.num_cached_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, go first in the queue."""
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING  # back in the queue; nothing tells the two apart
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, status: Status) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
