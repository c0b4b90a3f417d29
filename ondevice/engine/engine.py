"""The engine: requests in, one batched forward pass per step, streamed outputs out."""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..batch import BatchInput
from ..constraints import ConstraintCompiler
from ..errors import RequestError, SamplingError
from ..kv import KVCacheManager
from ..sampling import Sampler, SampleResult, SamplingParams
from ..settings import SpeculativeConfig
from ..tokenizer import IncrementalDetokenizer
from .request import Request, RequestOutput, Sequence, Status
from .scheduler import Scheduler
from .speculative import DraftModel, Speculator, verify

THROUGHPUT_WINDOW = 10.0  # seconds of history behind the tokens/s figure


class Engine:
    """Continuous batching over one backend and one paged KV pool. Not thread-safe: the
    synchronous and asyncio fronts (``frontends.py``) drive it from one thread.

    Args:
        backend: a loaded backend (owns the physical KV pool).
        tokenizer: for eos ids and streaming text (None: token ids only).
        context_length: the model's context length.
        enable_prefix_caching: share full KV blocks between requests with the same prefix.
        model_id: goes into every block hash, so a cache is never shared across models.
        speculative: speculative decoding settings (None: off).
        draft_backend: the loaded draft model's backend, for ``speculative.method == "draft"``
            (it owns the draft's KV pool; same vocabulary as ``backend``).
    """

    def __init__(self, backend, tokenizer=None, *, context_length: int,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 enable_prefix_caching: bool = True, model_id: str = "",
                 speculative: SpeculativeConfig | None = None, draft_backend=None):
        if getattr(backend, "head_ids", None) is not None:
            raise RequestError(f"this model's output head covers {len(backend.head_ids)} of "
                               f"{backend.config.vocab_size} tokens: it is a draft model "
                               "(use it with --speculative draft --draft-model)")
        self.backend = backend
        self.tokenizer = tokenizer
        self.block_size = backend.block_size
        # One block table per KV group of the backend's pools (see ondevice.kv.layout).
        layout = backend.kv_layout
        self.layer_groups = layout.layer_group if layout.num_groups > 1 else ()
        self.kv = KVCacheManager(backend.group_blocks, backend.block_size,
                                 enable_caching=enable_prefix_caching, extra_keys=(model_id,),
                                 windows=layout.windows)
        self.model_id = model_id
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs)
        chunk = max_num_batched_tokens + (speculative.num_tokens if speculative else 0)
        self.context_limit = min(context_length, self.kv.reach(chunk))
        self.vocab_size = backend.config.vocab_size
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._generated: deque[tuple[float, int]] = deque()
        self.num_generated = 0
        self.num_prompt_tokens = 0
        self.num_steps = 0
        self.num_topk_steps = 0  # steps whose tokens were picked on the backend's device
        self._constraints: ConstraintCompiler | None = None
        self._mask_pool: ThreadPoolExecutor | None = None  # token masks beside the forward
        self.spec: Speculator | None = None
        if speculative is not None:
            if speculative.num_tokens + 1 > max_num_batched_tokens:
                raise RequestError(f"num_speculative_tokens {speculative.num_tokens} needs "
                                   f"max_num_batched_tokens >= {speculative.num_tokens + 1}")
            draft = None
            if speculative.method == "draft":
                if draft_backend is None:
                    raise RequestError("speculative method 'draft' needs a loaded draft model")
                if draft_backend.config.vocab_size != self.vocab_size:
                    raise RequestError(
                        f"the draft model's vocabulary ({draft_backend.config.vocab_size} "
                        f"tokens) differs from the target's ({self.vocab_size})")
                draft = DraftModel(draft_backend, max_num_batched_tokens=max_num_batched_tokens,
                                   context_length=draft_backend.config.context_length)
            self.spec = Speculator(speculative, draft)

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """Raise RequestError for a request that can never run; allocates nothing."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.context_limit:
            raise RequestError(
                f"prompt has {len(prompt_ids)} tokens; the limit is {self.context_limit - 1} "
                f"(context {self.context_limit} tokens incl. the KV pool of "
                f"{self.backend.num_blocks} blocks x {self.block_size})"
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise RequestError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if params is not None:
            bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise SamplingError(f"logit_bias names token {bad[0]}, outside the vocabulary "
                                    f"[0, {self.vocab_size})", field="logit_bias")
            if params.constraint is not None:
                self.constraints.compile(params.constraint)  # cached: compiled once per text

    @property
    def constraints(self) -> ConstraintCompiler:
        """The compiler and cache of decoding constraints (thread-safe: the fronts compile on
        the caller's thread before submitting, so the engine thread finds them cached)."""
        if self._constraints is None:
            if self.tokenizer is None:
                raise RequestError("decoding constraints need the model's tokenizer")
            self._constraints = ConstraintCompiler(
                self.tokenizer.backend.to_str(), self.vocab_size,
                sorted(self.tokenizer.eos_token_ids))
        return self._constraints

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        req = Request(rid, prompt_ids, params)
        req.seqs.append(self._new_seq(req, 0, list(prompt_ids)))
        self.requests[rid] = req
        self.scheduler.add(req.seqs[0])
        return rid

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, skip_special_tokens=True,
                                           stop=req.params.stop)
        seq_id = req.request_id if index == 0 else f"{req.request_id}#{index}"
        seq = Sequence(seq_id, req, index, token_ids, Sampler(req.params, index=index), detok)
        if req.params.constraint is not None:  # each sample walks its own copy
            seq.matcher = self.constraints.compile(req.params.constraint).matcher()
        return seq

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now; its blocks are free when this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        outs = []
        for seq in req.seqs:
            if not seq.status.finished:
                self.scheduler.finish(seq, Status.FINISHED_ABORTED)
                if self.spec is not None:
                    self.spec.release(seq.seq_id)
                outs.append(RequestOutput(req.request_id, seq.index, (), "", "abort"))
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        lookups = self._plan_speculation() if self.spec is not None else {}
        sched = self.scheduler.schedule(
            {seq: (len(props), pinned) for seq, (props, pinned) in lookups.items()})
        if not sched.scheduled:
            return []
        for group in range(self.kv.num_groups):
            copies = self.kv.take_copies(group)
            if copies:
                self.backend.copy_blocks(copies, group)
        proposals = self._proposals(sched.spec, lookups) if sched.spec else {}
        entries, wants = [], []
        for seq, n in sched.scheduled:
            start = seq.num_computed
            props = proposals.get(seq, ([], None))[0]
            if len(props) < sched.spec.get(seq, 0):  # fewer proposals than slots: give back
                self.kv.truncate(seq.seq_id, start + n + len(props))
            entries.append((seq.token_ids[start:start + n] + props, start,
                            self.kv.batch_tables(seq.seq_id)))
            # Rows whose logits are needed: the last token's, plus one per proposal.
            wants.append(1 + len(props) if start + n == len(seq.token_ids) else 0)
        batch = BatchInput.build(entries, self.block_size, logits_for=wants,
                                 layer_groups=self.layer_groups)
        sampled = [seq for (seq, _), w in zip(sched.scheduled, wants, strict=True) if w]
        pending = self._start_masks(sampled)
        began = time.perf_counter()
        logits = self._forward(batch, sampled)
        if self.spec is not None:  # what rows cost on this backend: speculation's k rule
            self.spec.cost.observe(batch.num_tokens, time.perf_counter() - began)
        masks = pending.result() if pending is not None else {}
        self.num_steps += 1
        outputs: list[RequestOutput] = []
        row = 0
        for (seq, n), want in zip(sched.scheduled, wants, strict=True):
            if want > 1:
                props, qs = proposals[seq]
                outputs.extend(self._verify(seq, n, logits[row:row + want], props, qs))
                row += want
                continue
            seq.num_computed += n
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed)
            if seq.num_output == 0 and seq.index == 0:
                self.num_prompt_tokens += n
            if not want:
                continue  # a prefill chunk: no token yet
            row_logits = logits[row]
            row += 1
            req = seq.request
            if req.params.n > 1 and not req.forked:
                self._fork(seq)
                for child in req.seqs[1:]:  # fresh matchers: the parent's first mask fits
                    outputs.extend(self._sample(child, row_logits, masks.get(seq)))
            outputs.extend(self._sample(seq, row_logits, masks.get(seq)))
        return outputs

    def _forward(self, batch: BatchInput, sampled: list[Sequence]) -> np.ndarray | None:
        """Logits of the rows to sample. When every such row is plain greedy and the backend
        selects top-k on its device (wgpu), only each row's argmax is read back; the row
        handed to the sampler is then -inf but for that token, which greedy picks alike."""
        if not batch.num_tokens:
            return None
        if (not self.backend.capabilities.device_topk or not sampled
                or not all(_plain_greedy(s.request.params) for s in sampled)):
            return self.backend.forward(batch)
        ids, vals = self.backend.forward_topk(batch, 1)
        rows = np.full((len(ids), self.vocab_size), -np.inf, np.float32)
        for r, (i, v) in enumerate(zip(ids[:, 0], vals[:, 0], strict=True)):
            if 0 <= i < self.vocab_size:  # no id: every logit was NaN or -inf (sampler raises)
                rows[r, i] = v
        self.num_topk_steps += 1
        return rows

    def _fork(self, seq: Sequence) -> None:
        """n > 1: the other samples share the prompt's blocks (copy-on-write on the last)."""
        req = seq.request
        req.forked = True
        for i in range(1, req.params.n):
            child = self._new_seq(req, i, list(seq.token_ids))
            self.kv.fork(seq.seq_id, child.seq_id)
            child.num_computed = seq.num_computed
            req.seqs.append(child)
            self.scheduler.add_running(child, after=req.seqs[-2])

    # -- speculative decoding -------------------------------------------------------------
    def _plan_speculation(self) -> dict[Sequence, tuple[list[int], bool]]:
        """Per decoding sequence: its prompt-lookup proposals (or, for a draft model, a list
        of k placeholders: the draft runs after scheduling) and whether it is pinned.

        k follows `Speculator`'s rule: the throughput of the step at the measured cost of its
        rows (and of the draft's forward passes), so that a large batch or a low acceptance
        rate turns speculation off; ``max_batch_rows`` caps the rows it may fill up to."""
        spec = self.spec
        assert spec is not None
        running = self.scheduler.running
        budget = self.scheduler.max_num_batched_tokens
        rows = min(budget, sum(s.num_uncomputed for s in running))
        tokens = float(sum(1 for s in running if s.num_uncomputed == 1))
        spare = spec.config.max_batch_rows - rows
        draft_calls = 0  # draft forward passes already planned this step (shared by all)
        plan: dict[Sequence, tuple[list[int], bool]] = {}
        for seq in running:
            if seq.num_uncomputed != 1 or seq.num_output == 0:
                continue  # prefill (or resuming after preemption): nothing to verify against
            p = seq.request.params
            if not p.speculative or p.constraint is not None or p.logit_bias:
                continue  # verification samples the raw rows: no masks, no bias there
            remaining = min(p.max_tokens - seq.num_output,
                            self.context_limit - len(seq.token_ids)) - 1
            if remaining <= 0:
                continue
            pinned = spec.pinned(seq)  # (only draft-model sequences are)
            props: list[int] | None = None
            if pinned:
                k = spec.pinned_k(seq, remaining)
            else:
                cap = min(spec.k_max, remaining, spare)
                if cap <= 0:
                    continue
                props, match = spec.lookup_match(seq, cap) if spec.lookup else (None, -1)
                cap = len(props) if props is not None else cap
                k = spec.choose_k(seq, cap, rows, tokens, draft_calls, remaining,
                                  len(running), match) if cap else 0
            if k <= 0:
                continue
            plan[seq] = (props[:k] if props is not None else [0] * k, pinned)
            if not pinned:
                rows += k
                spare -= k
                tokens += spec.expected(seq, k) - 1
            draft_calls = max(draft_calls, k)
        return plan

    def _proposals(self, slots: dict[Sequence, int], lookups: dict
                   ) -> dict[Sequence, tuple[list[int], list[np.ndarray] | None]]:
        """The proposals of the sequences that got speculative slots this step."""
        spec = self.spec
        assert spec is not None
        if spec.draft is None:
            return {seq: (lookups[seq][0][:k], None) for seq, k in slots.items()}
        items = list(slots.items())
        return dict(zip((seq for seq, _ in items), spec.draft.propose(items), strict=True))

    def _verify(self, seq: Sequence, n: int, rows: np.ndarray, props: list[int],
                qs: list[np.ndarray] | None) -> list[RequestOutput]:
        """Accept a prefix of the proposals, give the rejected slots back, emit the tokens."""
        spec = self.spec
        assert spec is not None
        length = len(seq.token_ids)
        results = verify(seq, rows, props, qs)
        accepted = [r.token_id for r in results[:-1]]
        seq.num_computed += n + len(accepted)
        self.kv.truncate(seq.seq_id, seq.num_computed)
        # Only blocks filled by accepted tokens are hashed (the rejected ones' KV is garbage).
        self.kv.cache_blocks(seq.seq_id, seq.token_ids + accepted, seq.num_computed)
        spec.update(seq, len(props), len(accepted), len(results))
        if spec.draft is not None:
            spec.draft.accept(seq.seq_id, length + len(accepted))
        outputs: list[RequestOutput] = []
        for result in results:
            outputs.extend(self._emit(seq, result))
            if seq.status.finished:
                break  # a stop inside the accepted run: the rest is not output
        return outputs

    def _sample(self, seq: Sequence, logits: np.ndarray,
                mask: np.ndarray | None = None) -> list[RequestOutput]:
        req = seq.request
        if mask is not None or req.params.logit_bias:
            logits = self._adjust(seq, logits, mask)
        result = seq.sampler.sample(logits, req.prompt_ids, seq.output_ids)
        if seq.matcher is not None and not seq.matcher.consume(result.token_id):
            # Cannot happen with the mask applied; end the reply rather than the engine loop.
            seq.matcher = None
        return self._emit(seq, result)

    # -- constraints and logit bias ---------------------------------------------------------
    def _start_masks(self, sampled: list[Sequence]) -> Future | None:
        """Compute the token masks of the constrained rows on a worker thread while the
        backend runs the forward pass (llguidance releases the GIL)."""
        constrained = [s for s in sampled if s.matcher is not None]
        if not constrained:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="ondevice-masks")
        compiler = self.constraints

        def work() -> dict[Sequence, np.ndarray]:
            rows = compiler.masks([s.matcher for s in constrained])
            return dict(zip(constrained, rows, strict=True))

        return self._mask_pool.submit(work)

    def _adjust(self, seq: Sequence, logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """A copy of the row with the request's logit bias added and disallowed tokens at
        -inf. A mask that allows nothing (a matcher in an error state) allows end of
        sequence, so the reply ends instead of the sampler failing."""
        row = np.array(logits, dtype=np.float32, copy=True)
        bias = seq.request.params.logit_bias
        if bias:
            ids = np.fromiter((t for t, _ in bias), dtype=np.int64, count=len(bias))
            row[ids] += np.fromiter((b for _, b in bias), dtype=np.float32, count=len(bias))
        if mask is not None:
            if not mask.any():
                mask = np.zeros_like(mask)
                mask[[t for t in self._eos if t < self.vocab_size]] = True
            row[~mask] = -np.inf
        return row

    def _emit(self, seq: Sequence, result: SampleResult) -> list[RequestOutput]:
        """Append one chosen token to the sequence, stream it, and finish it if it stops."""
        req, p = seq.request, seq.request.params
        token = int(result.token_id)
        seq.token_ids.append(token)
        seq.num_output += 1
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        self.num_generated += 1
        self._generated.append((now, 1))
        text = seq.detok.add(token) if seq.detok is not None else ""
        finish = None
        if seq.detok is not None and seq.detok.stopped:
            finish = "stop"
        elif (token in self._eos and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"
        elif p.constraint is not None and (seq.matcher is None or seq.matcher.is_stopped):
            finish = "stop"  # the constraint is complete: nothing more may follow
        elif seq.num_output >= p.max_tokens or len(seq.token_ids) >= self.context_limit:
            finish = "length"
        if finish and seq.detok is not None and not seq.detok.stopped:
            text += seq.detok.flush()
        if finish:
            status = Status.FINISHED_STOPPED if finish == "stop" else Status.FINISHED_LENGTH
            self.scheduler.finish(seq, status)
            if self.spec is not None:
                self.spec.release(seq.seq_id)
            seq.finish_reason = finish
            if req.finished:
                self.requests.pop(req.request_id, None)
        return [RequestOutput(
            req.request_id, seq.index, (token,), text, finish, result.logprob, result.top_logprobs,
            num_prompt_tokens=len(req.prompt_ids), num_cached_tokens=req.num_cached_tokens,
        )]

    # -- metrics -------------------------------------------------------------------------
    def kv_utilization(self) -> float:
        """Token slots holding live tokens / slots in allocated blocks (shared blocks once)."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for seq in self.scheduler.running:
            if seq.seq_id not in self.kv:
                continue
            ntok = self.kv.num_tokens(seq.seq_id)
            for i, b in enumerate(self.kv.block_ids(seq.seq_id)):
                filled[b] = max(filled.get(b, 0), min(bs, ntok - i * bs))
        return sum(filled.values()) / (len(filled) * bs) if filled else 0.0

    def stats(self) -> dict[str, float | int]:
        kv = self.kv.stats()
        now = time.monotonic()
        while self._generated and now - self._generated[0][0] > THROUGHPUT_WINDOW:
            self._generated.popleft()
        window = (now - self._generated[0][0]) if len(self._generated) > 1 else 0.0
        tps = (sum(n for _, n in self._generated) - 1) / window if window > 0 else 0.0
        queries = kv["prefix_queries"]
        # KV bytes per group: group 0 the full-attention layers, group 1 (when the model has
        # sliding-window layers) the windowed ones, whose blocks leave with the window.
        groups: dict[str, int] = {}
        block_bytes = self.backend.kv_group_block_bytes()
        for g, (info, nbytes) in enumerate(zip(kv["groups"], block_bytes, strict=True)):
            groups[f"kv_group{g}_window"] = info["window"]
            groups[f"kv_group{g}_blocks_total"] = info["blocks_total"]
            groups[f"kv_group{g}_blocks_used"] = info["blocks_used"]
            groups[f"kv_group{g}_bytes_total"] = info["blocks_total"] * nbytes
            groups[f"kv_group{g}_bytes_used"] = info["blocks_used"] * nbytes
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": kv["blocks_total"],
            "kv_blocks_used": kv["blocks_used"],
            "kv_blocks_free": kv["blocks_free"],
            "kv_blocks_cached_free": kv["blocks_cached_free"],
            "kv_block_size": self.block_size,
            "kv_bytes_total": sum(v for k, v in groups.items() if k.endswith("_bytes_total")),
            "kv_bytes_used": sum(v for k, v in groups.items() if k.endswith("_bytes_used")),
            **groups,
            "kv_utilization": round(self.kv_utilization(), 4),
            "prefix_cache_queries": queries,
            "prefix_cache_hits": kv["prefix_hits"],
            "prefix_cache_hit_rate": round(kv["prefix_hits"] / queries, 4) if queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated,
            "prompt_tokens": self.num_prompt_tokens,
            "steps": self.num_steps,
            "tokens_per_second": round(tps, 2),
            **(self.spec.stats() if self.spec is not None else {}),
        }


def score_tokens(engine: Engine, token_ids: list[int], *, logits_for: str = "all",
                 register: bool = False) -> np.ndarray:
    """Run ``token_ids`` through the model outside the scheduler, in blocks of their own, in
    chunks of the step budget; returns the logits of every row (``"all"``) or of the last
    (``"last"``). With ``register`` the full blocks enter the prefix cache, where they stay
    (free but cached) after this returns. Run it on the engine thread, between steps."""
    engine.validate(token_ids)
    rid = f"direct-{next(engine._ids)}"
    chunk = engine.scheduler.max_num_batched_tokens
    rows = []
    try:
        done = 0
        while done < len(token_ids):
            part = token_ids[done:done + chunk]
            if engine.kv.allocate_slots(rid, token_ids, len(part)) is None:
                raise RequestError(f"not enough free KV blocks for {len(token_ids)} tokens")
            batch = BatchInput.build([(part, done, engine.kv.batch_tables(rid))],
                                     engine.block_size, logits_for=logits_for,
                                     layer_groups=engine.layer_groups)
            rows.append(engine.backend.forward(batch))
            done += len(part)
            if register:
                engine.kv.cache_blocks(rid, token_ids, done)
    finally:
        engine.kv.free(rid)
    return np.concatenate(rows) if logits_for == "all" else rows[-1]


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy (by the sampler's own definition, ``is_greedy``) with nothing that needs the
    whole row: no penalties, no logprobs."""
    return (p.is_greedy and p.logprobs is None and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and p.constraint is None and not p.logit_bias)
