"""Speculative decoding: proposers, per-sequence adaptivity and verification.

A sequence in decode gets up to k proposed tokens; the engine schedules its last token and the
proposals as k + 1 query rows in the same flattened batch as everybody else's rows, asks for
the logits of all of them and verifies here:

* **greedy** (and any proposal without a distribution, i.e. prompt lookup): each row is sampled
  exactly as without speculation (same sampler, same penalties context, same random draws), and
  the proposals are accepted up to the first one that differs from the token sampled at its
  position; that sampled token ends the step. For a point-mass proposal q = delta(d) this *is*
  the standard rejection scheme (accept with min(1, p(d)/q(d)) = p(d), else draw from the
  normalized residual max(0, p - q), which is p without d), realized with a coupling that
  draws one token x ~ p per position and accepts iff x == d. So the output of a seeded
  request is the same with or without speculation, whatever the batch or k.
* **draft-model sampling** (a proposal d ~ q with the draft's distribution q): the standard
  scheme of Leviathan et al. / Chen et al. 2023: accept with probability min(1, p(d)/q(d)),
  else draw from the normalized residual max(0, p - q) and stop; if all k were accepted, draw
  a bonus token from the last row. The draws come from the sequence's own generator (and the
  draft's proposals from a second generator spawned from the same seed), so a fixed seed
  reproduces.

Rejected positions give their KV slots back (`KVCacheManager.truncate`); blocks are only
hashed for the prefix cache up to the accepted tokens.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import numpy as np

from ..batch import BatchInput
from ..kv import KVCacheManager
from ..sampling import (
    SampleResult,
    SamplingParams,
    apply_penalties,
    filtered_probs,
    log_softmax,
)
from .request import Sequence

DRAFT_SPAWN_KEY = 0x5350
"""Second element of the draft generator's spawn key: disjoint from the target sampler's
``(index,)`` key, so the draft's draws never consume or mirror the target's."""

PROBE_STEPS = 16
"""Steps after which a sequence the rule keeps from speculating proposes a couple of tokens
anyway (when full acceptance would pay at the measured costs), so that its acceptance rate
and the costs behind the rule are measured again rather than trusted forever."""

RATE_MEMORY = 0.9
"""Weight of the past in a sequence's acceptance counts, per verification (and, while it
does not speculate, 0.95 per step: its estimate drifts back to the prior of 0.5). With
k = 1 and every proposal right, the rate settles at 10.5 / 11 = 0.95."""

CLEAR_GAIN = 1.05
"""The rule speculates only for a step throughput this much above the plain step's: its
timings vary by several percent from step to step on a shared machine, and in a batch of
16 one sequence's speculation can add a few percent at most (measured: at 1.02, prompt
lookup at 16 requests ran at 0.90x)."""

COOLDOWN_STEPS = 8
"""Steps a draft-model sequence skips speculation after its acceptance collapsed."""

LOW_ACCEPTANCE = 0.2
"""Below this running acceptance rate (at k = 1) a draft-model sequence pauses speculation."""

MATCH_MEMORY = 0.98
"""Weight of the past in the engine-wide acceptance counts of each lookup match length."""

MATCH_PRIOR = 2.0
"""A sequence's acceptance rate after an n-gram match of length n is its own counts for n
plus this many proposals at the engine-wide rate for n (`MATCH_MEMORY`): a new sequence
starts from what matches of that length have been worth, and its own record takes over."""


# --------------------------------------------------------------------------------------------
# Distributions


def target_probs(params: SamplingParams, logits: np.ndarray, prompt_ids: list[int],
                 output_ids: list[int]) -> np.ndarray:
    """The distribution `Sampler` draws from for this row: penalties, temperature, top-k,
    top-p, min-p, normalized (float64, so that ratios and residuals are not rounded away)."""
    x = apply_penalties(logits, prompt_ids, output_ids,
                        repetition_penalty=params.repetition_penalty,
                        presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty)
    probs = filtered_probs(x, params).astype(np.float64)
    return probs / probs.sum()


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One inverse-CDF draw over the tokens with positive probability."""
    candidates = np.flatnonzero(probs > 0)
    cdf = np.cumsum(probs[candidates])
    u = rng.random() * cdf[-1]
    return int(candidates[min(int(np.searchsorted(cdf, u, side="right")), len(candidates) - 1)])


def _result(params: SamplingParams, logits: np.ndarray, prompt_ids: list[int],
            output_ids: list[int], token: int) -> SampleResult:
    """A SampleResult for a token chosen by the rejection scheme, with logprobs as `Sampler`
    reports them (log-softmax of the penalized, untruncated row)."""
    if params.logprobs is None:
        return SampleResult(token, None, None)
    lp = log_softmax(apply_penalties(logits, prompt_ids, output_ids,
                                     repetition_penalty=params.repetition_penalty,
                                     presence_penalty=params.presence_penalty,
                                     frequency_penalty=params.frequency_penalty))
    top = np.argsort(-lp, kind="stable")[: params.logprobs]
    return SampleResult(token, float(lp[token]), [(int(i), float(lp[i])) for i in top])


# --------------------------------------------------------------------------------------------
# Verification


def verify(seq: Sequence, rows: np.ndarray, proposals: list[int],
           qs: list[np.ndarray] | None) -> list[SampleResult]:
    """The tokens a sequence emits this step: its accepted proposals, then one sampled token.

    ``rows`` are the target's logits after the last token and after each proposal
    (``len(proposals) + 1`` rows); ``qs`` the draft's distribution for each proposal, or None
    for point-mass proposals (prompt lookup, greedy drafts). Nothing is mutated but the
    sequence's random generator.
    """
    req, params = seq.request, seq.request.params
    prompt, out = req.prompt_ids, seq.output_ids
    emitted: list[SampleResult] = []
    toks: list[int] = []
    m = len(proposals)
    for i in range(m + 1):
        context = out + toks
        if qs is None or params.is_greedy or i == m:
            res = seq.sampler.sample(rows[i], prompt, context)
            emitted.append(res)
            toks.append(res.token_id)
            if i == m or res.token_id != proposals[i]:
                break
            continue
        d, q = proposals[i], qs[i]
        p = target_probs(params, rows[i], prompt, context)
        rng = seq.sampler.rng
        if rng.random() * q[d] < p[d]:  # accept with min(1, p(d) / q(d))
            token = d
        else:
            residual = np.maximum(p - q, 0.0)
            token = _draw(residual if residual.sum() > 0 else p, rng)
        emitted.append(_result(params, rows[i], prompt, context, token))
        toks.append(token)
        if token != d:
            break
    return emitted


# --------------------------------------------------------------------------------------------
# Proposers


class NgramIndex:
    """Where the latest occurrence of each n-gram (n <= ``ngram_max``) of a growing token
    list ends, filled in as the list grows: a lookup costs a few dict probes per step
    instead of a scan of the whole context (84 us per sequence at 300 tokens, and growing
    with the context, which for prompt lookup is a long document)."""

    def __init__(self, ngram_max: int):
        self.ngram_max = ngram_max
        self.done = 0  # n-grams ending before this position are indexed
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> where its continuation starts

    def extend(self, token_ids: list[int], end: int) -> None:
        """Index the n-grams ending before position ``end``."""
        if end < self.done:  # the list was cut (not done by the engine): start again
            self.done, self.after = 0, {}
        for last in range(self.done, end):
            for n in range(1, min(self.ngram_max, last + 1) + 1):
                self.after[tuple(token_ids[last + 1 - n : last + 1])] = last + 1
        self.done = max(self.done, end)


class PromptLookup:
    """Propose the continuation of the latest earlier occurrence of the sequence's last n-gram
    (n from ``ngram_max`` down to ``ngram_min``) in prompt + output. No model; the state is
    each sequence's `NgramIndex`."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def index(self) -> NgramIndex:
        return NgramIndex(self.ngram_max)

    def match(self, token_ids: list[int], k: int, index: NgramIndex | None = None
              ) -> tuple[list[int], int]:
        """Up to k proposals and the length n of the n-gram they follow (0: no match).
        ``index``: the sequence's, kept between steps (a new one otherwise). A longer match
        is a better bet: on the benchmark's greedy outputs of the default model, the first
        proposal after a 1-gram was right 13 times in 61, after a 2- to 4-gram 105 in 148."""
        index = index if index is not None else self.index()
        length = len(token_ids)
        index.extend(token_ids, length - 1)  # occurrences before the trailing n-gram itself
        for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            start = index.after.get(tuple(token_ids[length - n :]))
            if start is not None:  # the latest match: nearest context wins
                return list(token_ids[start : start + k]), n
        return [], 0

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return self.match(token_ids, k)[0]


@dataclass
class _DraftState:
    toks: list[int]
    k: int
    props: list[int] = field(default_factory=list)
    qs: list[np.ndarray] = field(default_factory=list)
    failed: bool = False


class DraftModel:
    """Proposals from a smaller model with the same vocabulary, on its own backend and KV pool.

    The draft keeps KV per sequence (its own `KVCacheManager`, no prefix cache) and catches up
    on the tokens it has not seen before it proposes; after verification it keeps the KV of
    the accepted proposals and drops the rest, like the target. Greedy requests get the
    draft's argmax; sampled ones a draw from the draft's distribution (same sampling
    parameters), which verification needs as q. A draft with a trimmed head
    (``ondevice convert --draft-head``) has logits for its listed tokens only: the others
    get probability 0 in q, so it never proposes them.
    """

    def __init__(self, backend, *, max_num_batched_tokens: int, context_length: int):
        self.backend = backend
        self.head_ids = backend.head_ids  # a trimmed head: logits column -> token id
        self.vocab_size = backend.config.vocab_size
        self.block_size = backend.block_size
        layout = backend.kv_layout
        self.layer_groups = layout.layer_group if layout.num_groups > 1 else ()
        self.kv = KVCacheManager(backend.group_blocks, backend.block_size, enable_caching=False,
                                 windows=layout.windows)
        self.budget = max_num_batched_tokens
        self.context_limit = min(context_length, self.kv.reach(max_num_batched_tokens))
        self.computed: dict[str, int] = {}
        self._rngs: dict[str, np.random.Generator] = {}
        self.num_forwards = 0
        self.seconds: float | None = None  # a draft forward pass (decode rows), averaged
        self.token_seconds: float | None = None  # per token of a catch-up chunk, averaged
        self._time_passes()

    def _time_passes(self) -> None:
        """What a one-row draft pass and a catch-up token cost, before any decision depends
        on them: passes of one row and of a 32-token chunk over a scratch sequence, the
        fastest of the repeats after the first (which pays first use)."""
        sid = "\0draft-timing"
        chunk = 32
        if self.kv.allocate_slots(sid, [0] * chunk, chunk) is None:
            return
        try:
            tables = self.kv.batch_tables(sid)

            def fastest(tokens: int) -> float:
                batch = BatchInput.build([([0] * tokens, 0, tables)], self.block_size,
                                         logits_for=[True], layer_groups=self.layer_groups)
                times = []
                for _ in range(3):
                    began = time.perf_counter()
                    self.backend.forward(batch)
                    times.append(time.perf_counter() - began)
                return min(times[1:])

            self.seconds = fastest(1)
            self.token_seconds = fastest(chunk) / chunk
        finally:
            self.kv.free(sid)

    def behind(self, seq: Sequence) -> int:
        """Tokens of ``seq`` the draft has not processed: its catch-up before it can propose
        (the whole context for a sequence it has never seen)."""
        return max(0, len(seq.token_ids) - self.computed.get(seq.seq_id, 0))

    def catch_up_seconds(self, seq: Sequence) -> float:
        """What the catch-up of ``seq`` would cost, from the catch-up chunks measured so far
        (0 before any was measured)."""
        return self.behind(seq) * (self.token_seconds or 0.0)

    def release(self, seq_id: str) -> None:
        """Forget a sequence (finished, aborted): its draft blocks go back to the pool."""
        self.kv.free(seq_id)
        self.computed.pop(seq_id, None)
        self._rngs.pop(seq_id, None)

    def accept(self, seq_id: str, num_valid: int) -> None:
        """Keep the draft's KV for the first ``num_valid`` tokens of the sequence only."""
        done = self.computed.get(seq_id)
        if done is not None and num_valid < done:
            if not self.kv.window_intact(seq_id, num_valid):
                # Its proposal steps moved a sliding window past blocks the next token reads
                # (more proposals than the window is long): catch up from scratch instead.
                self.release(seq_id)
                return
            self.kv.truncate(seq_id, num_valid)
            self.computed[seq_id] = num_valid

    def _rng(self, seq: Sequence) -> np.random.Generator:
        rng = self._rngs.get(seq.seq_id)
        if rng is None:
            key = (seq.index, DRAFT_SPAWN_KEY)
            rng = np.random.default_rng(np.random.SeedSequence(seq.request.params.seed,
                                                               spawn_key=key))
            self._rngs[seq.seq_id] = rng
        return rng

    def propose(self, items: list[tuple[Sequence, int]]
                ) -> list[tuple[list[int], list[np.ndarray] | None]]:
        """Up to k proposals per ``(sequence, k)``, with the draft's distributions (None for
        greedy requests). Runs the draft's catch-up and k - 1 more decode steps, batched."""
        states = []
        for seq, k in items:
            fits = len(seq.token_ids) + k <= self.context_limit
            states.append(_DraftState(list(seq.token_ids), k if fits else 0))
        active = {seq.seq_id for seq, _ in items}
        while True:
            entries, wanted, owners = [], [], []
            budget = self.budget
            for (seq, _), st in zip(items, states, strict=True):
                if st.failed or len(st.props) >= st.k or budget <= 0:
                    continue
                sid = seq.seq_id
                done = self.computed.get(sid, 0)
                take = min(len(st.toks) - done, budget)
                if not self._allocate(sid, st.toks, take, active):
                    st.failed = True
                    self.release(sid)
                    continue
                entries.append((st.toks[done:done + take], done, self.kv.batch_tables(sid)))
                wanted.append(done + take == len(st.toks))
                owners.append((seq, st))
                self.computed[sid] = done + take
                budget -= take
            if not entries:
                break
            batch = BatchInput.build(entries, self.block_size, logits_for=wanted,
                                     layer_groups=self.layer_groups)
            began = time.perf_counter()
            logits = self.backend.forward(batch)
            took = time.perf_counter() - began
            if batch.num_tokens <= 2 * len(entries):  # decode rows (after an accepted
                self.seconds = smoothed(self.seconds, took, 0.3)  # proposal: two), no chunk
            elif batch.num_tokens >= 4 * len(entries):  # mostly catch-up: cost per token
                self.token_seconds = smoothed(self.token_seconds, took / batch.num_tokens, 0.3)
            self.num_forwards += 1
            row = 0
            for (seq, st), want in zip(owners, wanted, strict=True):
                if want:
                    self._pick(seq, st, logits[row])
                    row += 1
        return [(st.props, None if seq.request.params.is_greedy else st.qs)
                for (seq, _), st in zip(items, states, strict=True)]

    def _allocate(self, sid: str, toks: list[int], take: int, active: set[str]) -> bool:
        if self.kv.allocate_slots(sid, toks, take) is not None:
            return True
        # Out of draft blocks: drop the KV of sequences not proposing this step (they catch up
        # again when they next speculate), then try once more.
        for other in [s for s in self.computed if s not in active]:
            self.release(other)
        return self.kv.allocate_slots(sid, toks, take) is not None

    def _pick(self, seq: Sequence, st: _DraftState, row: np.ndarray) -> None:
        if self.head_ids is not None:  # columns of a trimmed head: the rest cannot be drawn
            full = np.full(self.vocab_size, -np.inf, np.float32)
            full[self.head_ids] = row
            row = full
        params = seq.request.params
        context = seq.output_ids + st.props
        if params.is_greedy:
            x = apply_penalties(row, seq.request.prompt_ids, context,
                                repetition_penalty=params.repetition_penalty,
                                presence_penalty=params.presence_penalty,
                                frequency_penalty=params.frequency_penalty)
            token = int(np.argmax(x))
        else:
            q = target_probs(params, row, seq.request.prompt_ids, context)
            token = _draw(q, self._rng(seq))
            st.qs.append(q)
        st.props.append(token)
        st.toks.append(token)


# --------------------------------------------------------------------------------------------
# Adaptivity and counters


def smoothed(old: float | None, sample: float, rate: float) -> float:
    """An exponential average of timings that moves halfway to a faster sample (the first
    samples pay page faults and cold caches) and by ``rate`` toward a slower one (a busy
    machine)."""
    if old is None or sample < old:
        return sample if old is None else old + 0.5 * (sample - old)
    return old + rate * (sample - old)


COLD_SAMPLES = 3
"""A row count's time is the fastest of its first this-many samples, then an average: the
first decode step after a prefill took 47 ms against 19 ms for the next ones (default
model, f32, `cpu`), and halfway to 19 would still have made a q4 draft look worth starting."""


class StepCost:
    """Measured forward-pass seconds by number of query rows (exponential averages), so that
    the choice of k uses this backend's real cost of extra rows, not an assumption.

    A row count never measured is interpolated linearly between the nearest measured counts
    around it (prefill chunks give the far end), or costs as much as the nearest count below
    it when it is small (an optimistic guess, so that it gets tried and measured once).
    Beyond every measurement the cost grows in proportion to the rows. No count costs more
    than a larger one measured: a slow sample (a cold first pass, a busy moment) of a count
    the rule then avoids would otherwise never be measured again, and a noisy one-row time
    above the two-row time would make a proposal look free."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}
        self.samples: dict[int, int] = {}
        self._rows: list[int] = []  # measured counts, ascending
        self._low: list[float] = []  # their times, each at most any larger count's

    def observe(self, rows: int, seconds: float) -> None:
        n = self.samples[rows] = self.samples.get(rows, 0) + 1
        old = self.seconds.get(rows)
        if old is not None and n <= COLD_SAMPLES:  # the fastest of the first few samples
            self.seconds[rows] = min(old, seconds)
        else:
            self.seconds[rows] = smoothed(old, seconds, self.smoothing)
        self._rows = sorted(self.seconds)
        self._low = [self.seconds[r] for r in self._rows]
        for i in range(len(self._low) - 2, -1, -1):
            self._low[i] = min(self._low[i], self._low[i + 1])

    def time(self, rows: int) -> float | None:
        i = bisect.bisect_left(self._rows, rows)
        if i < len(self._rows) and self._rows[i] == rows:
            return self._low[i]
        if i == 0:
            return None
        r, below = self._rows[i - 1], self._low[i - 1]
        if i < len(self._rows):  # between two measurements: on the line through them
            q = self._rows[i]
            return below + (self._low[i] - below) * (rows - r) / (q - r)
        return below * (rows / r if r >= 8 else 1.0)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verification of k proposals emits when each is accepted with probability
    ``rate`` independently: 1 + rate + ... + rate**k."""
    return float(sum(rate ** i for i in range(k + 1)))


@dataclass
class _Counts:
    hits: float = 0.0  # accepted proposals, older verifications weighted down
    trials: float = 0.0  # proposals judged (a rejection ends a run: later ones are not)

    def count(self, hits: float, trials: float, memory: float) -> None:
        self.hits = self.hits * memory + hits
        self.trials = self.trials * memory + trials

    def estimate(self, prior: float = 0.5, weight: float = 1.0) -> float:
        """The acceptance rate per proposed token, ``weight`` proposals of ``prior`` added."""
        return (self.hits + prior * weight) / (self.trials + weight)


@dataclass
class _Adapt(_Counts):
    k: int = 1
    idle: int = PROBE_STEPS - 1  # steps since it last speculated (new: probe at once)
    cooldown: int = 0
    match: int = -1  # n-gram length behind this step's lookup proposals (-1: a draft's)
    by_match: dict[int, _Counts] = field(default_factory=dict)  # its counts per n

    @property
    def rate(self) -> float:
        return self.estimate()


class Speculator:
    """Decides k per sequence and step, holds the proposer, counts what was proposed.

    The rule, per step, over the decoding sequences in running order: with R query rows
    already in the step producing T tokens, a sequence whose proposals are accepted at rate
    a (recent verifications' accepted / judged proposals, with half a success and half a
    failure as prior) gets the k in 0..k_max that maximizes the step's throughput
    ``(T + E(a, k) - 1) / t(R + k)``, where E(a, k) = 1 + a + ... + a^k is the expected
    number of tokens its verification emits and t the measured forward time at that many
    rows (`StepCost`). So k shrinks when acceptance is low, and speculation stops when extra
    rows cost more than they bring — on a large batch (compute-bound rows) or on a backend
    whose multi-row products are slow. ``max_batch_rows`` caps the rows speculation may add
    up to. A new sequence, and one not speculating for `PROBE_STEPS` steps (its counts fade
    back to the prior meanwhile), proposes two tokens if that would pay at full acceptance,
    so the rule measures before it trusts the prior, and looks again after slow rows or poor
    proposals. Timings follow a faster
    sample quickly and a slower one gradually (`smoothed`).

    Seeded sampled requests verified against a draft distribution (`pinned`) cannot take
    timings into account (their random draws depend on k): their k follows their own history
    only: ``accepted + 1`` after a rejection, +2 after a full acceptance, and a pause of
    `COOLDOWN_STEPS` steps when their rate falls below `LOW_ACCEPTANCE` at k = 1.
    """

    def __init__(self, config, draft: DraftModel | None = None):
        self.config = config
        self.k_max = config.num_tokens
        self.lookup = PromptLookup(config.ngram_min, config.ngram_max) \
            if config.method == "prompt_lookup" else None
        self.draft = draft
        self.cost = StepCost()
        self._adapt: dict[str, _Adapt] = {}
        self._by_match: dict[int, _Counts] = {}  # engine-wide counts per lookup match length
        self._ngrams: dict[str, NgramIndex] = {}  # prompt lookup: each sequence's index
        self.num_proposed = 0
        self.num_accepted = 0
        self.num_verified = 0  # verifications with at least one proposal
        self.num_emitted = 0  # tokens emitted by those verifications (accepted + 1 each)

    def pinned(self, seq: Sequence) -> bool:
        """A seeded sampled request verified against a draft distribution: its random draws
        depend on k, so its k must not depend on other requests or on timings."""
        p = seq.request.params
        return self.draft is not None and p.seed is not None and not p.is_greedy

    def _state(self, seq: Sequence) -> _Adapt:
        st = self._adapt.get(seq.seq_id)
        if st is None:
            st = self._adapt[seq.seq_id] = _Adapt(k=self.k_max)
        return st

    def lookup_match(self, seq: Sequence, k: int) -> tuple[list[int], int]:
        """Prompt lookup's proposals for ``seq`` (up to k) and their match length."""
        assert self.lookup is not None
        index = self._ngrams.get(seq.seq_id)
        if index is None:
            index = self._ngrams[seq.seq_id] = self.lookup.index()
        return self.lookup.match(seq.token_ids, k, index)

    def _rate(self, st: _Adapt) -> float:
        """The acceptance rate expected of this step's proposals: for prompt lookup, that of
        its match length (`MATCH_PRIOR`); for a draft, the sequence's."""
        if st.match < 0:
            return st.rate
        common = self._by_match.get(st.match)
        prior = common.estimate() if common is not None else 0.5
        own = st.by_match.get(st.match)
        return own.estimate(prior, MATCH_PRIOR) if own is not None else prior

    def pinned_k(self, seq: Sequence, remaining: int) -> int:
        """k of a pinned sequence (its own history only)."""
        st = self._state(seq)
        if st.cooldown > 0:
            st.cooldown -= 1
            return 0
        return max(0, min(st.k if self.config.adaptive else self.k_max, remaining))

    def choose_k(self, seq: Sequence, k_cap: int, rows: int, tokens: float,
                 draft_calls: int = 0, remaining: int | None = None,
                 running: int = 1, match: int = -1) -> int:
        """The k (<= k_cap) that maximizes the step's measured throughput; see the class.
        ``draft_calls``: draft forward passes other sequences already need this step (a
        sequence asking for more adds the difference, at the draft's measured cost).
        ``remaining``: tokens the sequence may still emit; a draft that must first catch up
        on the sequence's context is only started when the time speculation saves over them
        repays that catch-up, judged on a plain decode step of all ``running`` sequences
        (what the steps ahead look like, not this one, which may be mostly a prefill).
        ``match``: the n-gram length behind prompt-lookup proposals (whose rate is kept per
        length, see `MATCH_PRIOR`)."""
        st = self._state(seq)
        st.match = match
        if not self.config.adaptive:
            return k_cap
        base = self.cost.time(rows)
        if base is None:
            return 0  # measure the plain step first: without it no gain can be judged
        if self.draft is not None and self.draft.behind(seq) \
                and self.cost.samples.get(running, 0) < COLD_SAMPLES:
            return 0  # no catch-up before the plain step it is judged on is known
        if self.draft is not None and self.draft.seconds is None:
            # Not timed at start (no free block then): learned by running it, for one
            # sequence (every sequence that starts it pays a catch-up on its context).
            return 0 if draft_calls else min(2, k_cap)

        def value(k: int, rate: float, rows: int = rows, tokens: float = tokens,
                  draft_calls: int = draft_calls) -> float | None:
            t = self.cost.time(rows + k)
            if t is None:
                return None
            if self.draft is not None:
                t += max(0, k - draft_calls) * (self.draft.seconds or 0.0)
            return (tokens + expected_tokens(rate, k) - 1) / t

        plain = tokens / base

        def repaid(k: int, rate: float, tokens_ahead: int | None = remaining) -> bool:
            """Whether the draft's catch-up is repaid over ``tokens_ahead`` tokens by the
            time k proposals save on a plain decode step of the running sequences."""
            if self.draft is None or tokens_ahead is None:
                return True
            catch_up = self.draft.catch_up_seconds(seq)
            if catch_up == 0.0:
                return True
            t = self.cost.time(running)
            v = value(k, rate, running, float(running), 0)
            if t is None or v is None or v <= running / t:
                return False
            return catch_up < tokens_ahead * (t / running - 1 / v)

        rate = self._rate(st)
        best_k, best = 0, plain
        for k in range(1, k_cap + 1):
            v = value(k, rate)
            if v is not None and v > best * CLEAR_GAIN:
                best_k, best = k, v
        if best_k and repaid(best_k, rate):
            st.idle = 0
            return best_k
        st.idle += 1
        st.count(0, 0, 0.95)  # unmeasured for a while: back toward the prior
        for counts in st.by_match.values():
            counts.count(0, 0, 0.95)
        if st.idle >= PROBE_STEPS:
            st.idle = 0
            k = min(2, k_cap)
            v = value(k, 1.0)
            # If all right; and a draft's catch-up must pay within the probe's own horizon,
            # since the rule may decline again after it. Probes 17 tokens behind had slowed
            # a q4 draft of the default model to 0.86x, and judging a sequence's first probe
            # over all its remaining tokens to 0.88-0.91x (one whole-prompt catch-up each),
            # while it won only 1.06x with the full-head q4 draft of Gemma 3.
            ahead = min(remaining, PROBE_STEPS) if remaining is not None else None
            if v is not None and v > plain * CLEAR_GAIN and repaid(k, 1.0, ahead):
                return k
        return 0

    def expected(self, seq: Sequence, k: int) -> float:
        return expected_tokens(self._rate(self._state(seq)), k)

    def update(self, seq: Sequence, proposed: int, accepted: int, emitted: int) -> None:
        if not proposed:
            return
        self.num_proposed += proposed
        self.num_accepted += accepted
        self.num_verified += 1
        self.num_emitted += emitted
        st = self._state(seq)
        # Acceptance per proposed token: a run of a accepted then a rejection is a + 1
        # Bernoulli trials with a successes; a full acceptance is a trials, all successes.
        trials = accepted + (accepted < proposed)
        st.count(accepted, trials, RATE_MEMORY)
        if st.match >= 0:
            st.by_match.setdefault(st.match, _Counts()).count(accepted, trials, RATE_MEMORY)
            self._by_match.setdefault(st.match, _Counts()).count(accepted, trials,
                                                                 MATCH_MEMORY)
        st.k = min(self.k_max, st.k + 2) if accepted == proposed else max(1, accepted + 1)
        if self.draft is not None and st.k == 1 and st.rate < LOW_ACCEPTANCE:
            st.cooldown = COOLDOWN_STEPS
            st.hits, st.trials = 0.0, 0.0  # probe again after the pause, from the prior

    def release(self, seq_id: str) -> None:
        self._adapt.pop(seq_id, None)
        self._ngrams.pop(seq_id, None)
        if self.draft is not None:
            self.draft.release(seq_id)

    def stats(self) -> dict[str, float | int]:
        return {
            "spec_proposed_tokens": self.num_proposed,
            "spec_accepted_tokens": self.num_accepted,
            "spec_acceptance_rate": round(self.num_accepted / self.num_proposed, 4)
            if self.num_proposed else 0.0,
            "spec_mean_accepted_length": round(self.num_accepted / self.num_verified, 4)
            if self.num_verified else 0.0,
            "spec_tokens_per_verification": round(self.num_emitted / self.num_verified, 4)
            if self.num_verified else 0.0,
            "spec_verifications": self.num_verified,
        }
