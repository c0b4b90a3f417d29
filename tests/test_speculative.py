"""Speculative decoding (prompt lookup and draft models) in the paged engine: greedy output
identical to plain decoding on every backend, the target distribution kept when sampling
(chi-square), seeds reproduce, rejected KV slots given back, preemption, n > 1, stop strings,
bad input as one-line errors, and the real model's golden prompts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_engine import mixed_prompts, run_all
from tiny import tiny_config, tiny_gemma_config, write_model

from ondevice.backends import available_backends, backend_class
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.engine import Engine
from ondevice.engine.request import Request, Sequence
from ondevice.engine.speculative import (
    COLD_SAMPLES,
    PROBE_STEPS,
    PromptLookup,
    StepCost,
    expected_tokens,
    verify,
)
from ondevice.errors import RequestError
from ondevice.kv import KVCacheManager
from ondevice.modeldir import ModelDir
from ondevice.sampling import Sampler, SamplingParams, softmax
from ondevice.settings import EngineConfig, SpeculativeConfig, backend_options

FLOAT32 = {"numpy": {}, "cpu": {}, "mlx": {"device": "cpu", "dtype": "float32"},
           "wgpu": {"dtype": "float32"}}
BACKENDS = [name for name, (ok, _) in available_backends().items() if ok and name in FLOAT32]
METHODS = ["prompt_lookup", "draft"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return ModelDir(tiny_model_dir)


@pytest.fixture(scope="module")
def bad_draft_dir(tmp_path_factory):
    """Same architecture and tokenizer, other random weights: most proposals are rejected."""
    return ModelDir(write_model(tmp_path_factory.mktemp("draft") / "m", tiny_config(), seed=7))


def backend(name, md, num_blocks=512, block_size=8):
    return backend_class(name)(md, num_blocks=num_blocks, block_size=block_size,
                               options=backend_options(name, FLOAT32[name]))


def engine(md, name="numpy", spec=None, draft_md=None, num_blocks=512, caching=True, **kw):
    draft = backend(name, draft_md) if draft_md is not None else None
    return Engine(backend(name, md, num_blocks), md.tokenizer,
                  context_length=md.config.context_length, enable_prefix_caching=caching,
                  model_id="tiny", speculative=spec, draft_backend=draft, **kw)


def spec(method, k, **kw):
    """Adaptivity off unless asked: every step then really speculates (k proposals)."""
    kw.setdefault("adaptive", False)
    if method == "draft":
        kw.setdefault("draft_model", "tiny-draft")
    return SpeculativeConfig(method=method, num_tokens=k, **kw)


def repetitive_prompts(vocab, count=16, seed=0):
    """Mixed lengths, each with a repeated stretch, so prompt lookup finds matches."""
    return [p + p[: 40] + p[: 20] for p in mixed_prompts(vocab, count, seed, lengths=(5, 160))]


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


# -- greedy: identical output ---------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_with_speculation_equals_plain(model_dir, bad_draft_dir, name, method):
    """16 concurrent mixed requests, k = 1..8, a draft that is mostly wrong (many rejections):
    the same tokens as without speculation, every block back, invariants after every step."""
    reqs = [(p, GREEDY) for p in repetitive_prompts(model_dir.config.vocab_size)]
    plain = run_all(engine(model_dir, name), reqs)
    for k in range(1, 9):
        eng = engine(model_dir, name, spec(method, k),
                     bad_draft_dir if method == "draft" else None)
        assert run_all(eng, reqs) == plain, k
        st = eng.stats()
        assert st["spec_proposed_tokens"] > 0
        assert 0 <= st["spec_accepted_tokens"] < st["spec_proposed_tokens"]


def test_speculation_with_sliding_window_paging(tmp_path):
    """A Gemma-shaped target and draft whose local layers page a window of 6 tokens (1.5
    blocks of 4): prompt lookup and draft proposals (k = 8, more than the window, so the
    draft's own window moves past what a rejection takes it back to) give the plain output."""
    md = ModelDir(write_model(tmp_path / "g", tiny_gemma_config(sliding_window=6)))
    draft_md = ModelDir(write_model(tmp_path / "d", tiny_gemma_config(sliding_window=6), seed=7))
    reqs = [(p, GREEDY) for p in repetitive_prompts(md.config.vocab_size, 6)]

    def make(config=None, draft=None):
        return Engine(backend("numpy", md, block_size=4), md.tokenizer,
                      context_length=md.config.context_length, model_id="tiny",
                      speculative=config,
                      draft_backend=backend("numpy", draft, block_size=4) if draft else None)

    plain = run_all(make(), reqs)
    for method, k in (("prompt_lookup", 8), ("draft", 8), ("draft", 3)):
        eng = make(spec(method, k), draft_md if method == "draft" else None)
        assert eng.kv.windows == (0, 6)
        assert run_all(eng, reqs) == plain, (method, k)
        assert eng.stats()["spec_proposed_tokens"] > 0
        if method == "draft":
            draft_kv = eng.spec.draft.kv
            assert draft_kv.windows == (0, 6)
            assert all(p.num_free_blocks == p.num_blocks for p in draft_kv.pools)


def test_draft_identical_to_target_accepts_everything(model_dir):
    reqs = [(p, GREEDY) for p in mixed_prompts(model_dir.config.vocab_size, 4, lengths=(5, 50))]
    eng = engine(model_dir, "numpy", spec("draft", 5), model_dir)
    assert run_all(eng, reqs) == run_all(engine(model_dir), reqs)
    st = eng.stats()
    assert st["spec_acceptance_rate"] == 1.0
    assert st["steps"] < 24  # ~6 tokens per step after the prefill
    assert st["spec_mean_accepted_length"] > 3


def test_adaptive_rule_keeps_greedy_output_and_backs_off(model_dir, bad_draft_dir):
    reqs = [(p, GREEDY) for p in repetitive_prompts(model_dir.config.vocab_size)]
    plain = run_all(engine(model_dir), reqs)
    for method in METHODS:
        eng = engine(model_dir, "numpy", spec(method, 8, adaptive=True),
                     bad_draft_dir if method == "draft" else None)
        assert run_all(eng, reqs) == plain
    # The bad draft: after rejections k falls (tiny-model rows are nearly free, so it
    # does not stop altogether here; see test_batch_rule_...).
    st = eng.stats()
    assert st["spec_proposed_tokens"] < 16 * 23 * 8 / 2


def test_speculation_opt_out_per_request(model_dir):
    prompt = repetitive_prompts(model_dir.config.vocab_size, 1)[0]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative=False)
    eng = engine(model_dir, "numpy", spec("prompt_lookup", 4))
    assert run_all(eng, [(prompt, params)]) == run_all(engine(model_dir), [(prompt, GREEDY)])
    assert eng.stats()["spec_proposed_tokens"] == 0


def test_preemption_mid_speculation_resumes_identically(model_dir, bad_draft_dir):
    prompts = mixed_prompts(model_dir.config.vocab_size, lengths=(5, 200), seed=1)
    reqs = [(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts]
    plain = run_all(engine(model_dir), reqs)
    for method in METHODS:
        eng = engine(model_dir, "numpy", spec(method, 6), bad_draft_dir if method == "draft"
                     else None, num_blocks=40)
        assert run_all(eng, reqs) == plain
        assert eng.scheduler.num_preemptions > 0
        assert eng.stats()["spec_proposed_tokens"] > 0


def test_prefix_cache_with_speculation(model_dir):
    """Blocks are hashed for accepted tokens only: later requests hit the cache and decode
    the same tokens as a cache-less plain engine."""
    rng = np.random.default_rng(2)
    vocab = model_dir.config.vocab_size
    shared = rng.integers(3, vocab, 100).tolist()
    reqs = [(shared + rng.integers(3, vocab, k).tolist() + shared[:30], GREEDY)
            for k in (3, 9, 17, 30)]
    eng = engine(model_dir, "numpy", spec("prompt_lookup", 8))
    got = run_all(eng, reqs[:1]) + run_all(eng, reqs[1:])
    assert eng.stats()["prefix_cache_hits"] >= 3 * 96
    assert got == run_all(engine(model_dir, caching=False), reqs)


def test_stop_strings_and_eos_inside_accepted_runs(model_dir):
    """A stop inside a run of accepted tokens ends the output there, as without speculation."""
    prompts = repetitive_prompts(model_dir.config.vocab_size, 8, seed=3)
    base = run_all(engine(model_dir), [(p, GREEDY) for p in prompts])
    tok = model_dir.tokenizer
    reqs = []
    for p, out in zip(prompts, base, strict=True):
        text = tok.decode(out[0][:12])
        stop = text[len(text) // 2:][:3] or "x"
        reqs.append((p, SamplingParams(max_tokens=24, temperature=0, stop=stop,
                                       stop_token_ids=(out[0][20],))))
    eng = engine(model_dir, "numpy", spec("prompt_lookup", 8))
    assert run_all(eng, reqs) == run_all(engine(model_dir), reqs)


# -- sampling -------------------------------------------------------------------------------

def test_seeded_sampling_with_prompt_lookup_equals_plain_and_n_samples(model_dir):
    """Prompt lookup proposes point masses: verification draws each position exactly as
    plain sampling does, so seeded output (n > 1 included) does not change at all."""
    prompts = repetitive_prompts(model_dir.config.vocab_size, 6, seed=4)
    reqs = [(p, SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=i, n=2,
                               ignore_eos=True)) for i, p in enumerate(prompts)]
    eng = engine(model_dir, "numpy", spec("prompt_lookup", 6))
    assert run_all(eng, reqs) == run_all(engine(model_dir), reqs)
    assert eng.stats()["spec_accepted_tokens"] > 0


def test_draft_sampling_seed_reproduces_alone_or_batched(model_dir, bad_draft_dir):
    prompts = mixed_prompts(model_dir.config.vocab_size, 6, seed=5, lengths=(5, 60))
    reqs = [(p, SamplingParams(max_tokens=16, temperature=1.0, seed=10 + i, ignore_eos=True))
            for i, p in enumerate(prompts)]
    sp = spec("draft", 4, adaptive=True)
    first = run_all(engine(model_dir, "numpy", sp, bad_draft_dir), reqs)
    assert run_all(engine(model_dir, "numpy", sp, bad_draft_dir), reqs) == first
    alone = [run_all(engine(model_dir, "numpy", sp, bad_draft_dir), [r])[0] for r in reqs[:3]]
    assert alone == first[:3]


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty normal approximation)."""
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] < 5:  # fold a small remainder into the largest cell
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmax(exp)] += observed[~keep].sum()
        exp[np.argmax(exp)] += expected[~keep].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _fake_seq(params, prompt, index=0):
    req = Request("r", prompt, params)
    return Sequence("r", req, index, list(prompt) + [5], Sampler(params, index=index), None,
                    num_output=1)


def test_rejection_sampling_keeps_the_target_distribution():
    """verify() on fixed target rows and a deliberately different draft distribution: the
    first emitted token follows p (chi-square over 20,000 seeded draws), the second one its
    own row's p given the first was accepted, and a fixed seed reproduces."""
    rng = np.random.default_rng(0)
    vocab = 12
    rows = rng.normal(0, 1.5, (3, vocab)).astype(np.float32)
    q_logits = rng.normal(0, 1.5, (2, vocab)).astype(np.float32)
    q = [softmax(x).astype(np.float64) for x in q_logits]
    q = [x / x.sum() for x in q]
    p0 = softmax(rows[0]).astype(np.float64)
    first, runs = np.zeros(vocab), 20000
    for seed in range(runs):
        params = SamplingParams(temperature=1.0, seed=seed)
        seq = _fake_seq(params, [1, 2, 3])
        draw = np.random.default_rng([seed, 99])
        props = [int(draw.choice(vocab, p=q[0])), int(draw.choice(vocab, p=q[1]))]
        out = verify(seq, rows, props, q)
        first[out[0].token_id] += 1
    assert _chi_square_p(first, p0 / p0.sum() * runs) > 1e-3
    params = SamplingParams(temperature=1.0, seed=42)
    a = verify(_fake_seq(params, [1, 2, 3]), rows, [3, 4], q)
    b = verify(_fake_seq(params, [1, 2, 3]), rows, [3, 4], q)
    assert [r.token_id for r in a] == [r.token_id for r in b]


def test_engine_draft_sampling_matches_target_distribution(model_dir, bad_draft_dir):
    """End to end on a tiny model: the second generated token (the first one verified against
    the bad draft's proposal) over 1,500 seeds follows the target's distribution given the
    first token (exact, from the target's own logits): chi-square per first token, pooled."""
    prompt = mixed_prompts(model_dir.config.vocab_size, 1, seed=6, lengths=(12, 12))[0]
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=6, seed=s, ignore_eos=True)
              for s in range(1500)]
    eng = engine(model_dir, "numpy", spec("draft", 3, max_batch_rows=4096), bad_draft_dir,
                 max_num_seqs=256, max_num_batched_tokens=4096)
    outs = run_all(eng, [(prompt, p) for p in params])
    assert eng.stats()["spec_proposed_tokens"] >= 1500
    pairs = Counter((o[0][0], o[0][1]) for o in outs)
    firsts = Counter(o[0][0] for o in outs)
    ref = NumpyBackend(model_dir, num_blocks=64, block_size=8)
    ref_engine = Engine(ref, model_dir.tokenizer, context_length=1024, model_id="ref")
    from ondevice.engine.engine import score_tokens
    from ondevice.engine.speculative import target_probs

    observed, expected = [], []
    for t1, count in firsts.items():
        if count < 40:
            continue
        logits = score_tokens(ref_engine, prompt + [t1], logits_for="last")[-1]
        p = target_probs(params[0], logits, prompt, [t1])
        support = np.flatnonzero(p > 0)
        observed.extend(pairs[(t1, t2)] for t2 in support)
        expected.extend(count * p[support])
        assert sum(pairs[(t1, t2)] for t2 in range(len(p)) if p[t2] == 0) == 0
    assert len(observed) >= 12
    assert _chi_square_p(np.array(observed, float), np.array(expected)) > 1e-3


# -- KV accounting --------------------------------------------------------------------------

def test_truncate_gives_back_blocks_and_keeps_invariants():
    kv = KVCacheManager(10, block_size=4)
    tokens = list(range(20))
    assert kv.allocate_slots("a", tokens, 6) is not None  # 2 blocks
    kv.cache_blocks("a", tokens, 5)  # block 0 hashed
    assert kv.allocate_slots("a", tokens, 9) is not None  # 15 tokens: 4 blocks
    assert kv.num_free_blocks == 6
    kv.truncate("a", 9)  # 3 blocks keep tokens 0..8
    assert kv.num_free_blocks == 7 and kv.num_tokens("a") == 9
    kv.check_invariants()
    with pytest.raises(ValueError, match="registered"):
        kv.truncate("a", 3)
    with pytest.raises(ValueError, match="cannot truncate"):
        kv.truncate("a", 10)
    kv.free("a")
    assert kv.num_free_blocks == 10
    kv.check_invariants()


def test_bad_draft_pool_returns_to_initial_free_count(model_dir, bad_draft_dir):
    eng = engine(model_dir, "numpy", spec("draft", 8), bad_draft_dir, num_blocks=96)
    draft_kv = eng.spec.draft.kv
    free0 = (eng.kv.num_free_blocks, draft_kv.num_free_blocks)
    reqs = [(p, SamplingParams(max_tokens=30, temperature=t, seed=i, ignore_eos=True))
            for i, (p, t) in enumerate(zip(repetitive_prompts(model_dir.config.vocab_size, 12),
                                           [0, 1.0] * 6, strict=True))]
    run_all(eng, reqs)  # checks the target's invariants after every step
    st = eng.stats()
    assert st["spec_proposed_tokens"] - st["spec_accepted_tokens"] > 100  # many rejections
    for seq_id in list(eng.spec.draft.computed):
        eng.spec.release(seq_id)
    draft_kv.check_invariants()
    assert (eng.kv.num_free_blocks, draft_kv.num_free_blocks) == free0
    assert not eng.spec.draft.computed  # finished sequences left nothing behind


# -- rules and units ------------------------------------------------------------------------

def test_prompt_lookup_proposes_latest_continuation():
    pl = PromptLookup(1, 3)
    assert pl.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 2) == [5, 6]
    assert pl.propose([1, 2, 3], 4) == []
    assert pl.propose([7, 8, 7], 3) == [8, 7]
    assert pl.match([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 2) == ([5, 6], 3)
    assert pl.match([4, 5, 6, 5], 2) == ([6, 5], 1) and pl.match([1, 2], 2) == ([], 0)


def test_prompt_lookup_index_kept_across_steps_matches_a_full_scan():
    """A sequence's n-gram index, extended as its tokens grow, proposes exactly what a scan
    of the whole context for the latest earlier occurrence of the longest n-gram does."""
    def scan(ids, k, n_min, n_max):
        for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
            ends = [e for e in range(n - 1, len(ids) - 1) if ids[e + 1 - n:e + 1] == ids[-n:]]
            if ends:
                return ids[ends[-1] + 1:ends[-1] + 1 + k], n
        return [], 0

    rng = np.random.default_rng(3)
    for n_min, n_max in [(1, 4), (2, 3), (3, 5)]:
        pl = PromptLookup(n_min, n_max)
        ids = rng.integers(0, 5, 150).tolist()
        index = pl.index()
        for length in range(1, len(ids) + 1):
            assert pl.match(ids[:length], 4, index) == scan(ids[:length], 4, n_min, n_max)


def test_step_cost_and_expected_tokens():
    cost = StepCost()
    assert cost.time(3) is None
    cost.observe(1, 0.030)
    cost.observe(9, 0.060)
    assert cost.time(5) == pytest.approx(0.045)  # on the line between measurements
    assert cost.time(18) == pytest.approx(0.120)  # beyond them: in proportion
    cost.observe(512, 1.0)  # a prefill chunk: rows in between are no longer "free"
    assert cost.time(40) == pytest.approx(0.06 + 0.94 * 31 / 503)
    assert expected_tokens(0.0, 5) == 1 and expected_tokens(1.0, 4) == 5
    cost.observe(3, 0.2)  # a cold pass: no dearer than the larger counts measured
    assert cost.time(3) == pytest.approx(0.06) and cost.time(2) == pytest.approx(0.045)
    cold = StepCost()
    for sample, expected in ((0.1, 0.1), (0.03, 0.03), (0.05, 0.03), (0.05, 0.036)):
        cold.observe(1, sample)  # the fastest of the first COLD_SAMPLES, then an average
        assert cold.time(1) == pytest.approx(expected)
    noisy = StepCost()
    noisy.observe(1, 0.030)
    noisy.observe(2, 0.025)  # two rows measured faster than one: one costs no more
    assert noisy.time(1) == pytest.approx(0.025) and noisy.time(4) == pytest.approx(0.025)


def test_batch_rule_stops_speculation_when_rows_are_expensive(model_dir):
    """With measured costs where every extra row costs a full decode row, a 16-sequence batch
    at a modest acceptance rate gets no proposals; one sequence with a cheap extra row does."""
    eng = engine(model_dir, "numpy", spec("prompt_lookup", 4, adaptive=True))
    sp = eng.spec
    for r in range(1, 40):
        sp.cost.observe(r, 0.01 * r)
    seq = _fake_seq(GREEDY, [1, 2, 3])
    assert sp.choose_k(seq, 4, rows=16, tokens=16) == 0
    cheap = engine(model_dir, "numpy", spec("prompt_lookup", 4, adaptive=True)).spec
    cheap.cost.observe(1, 0.03)
    for r in range(2, 10):
        cheap.cost.observe(r, 0.035)
    assert cheap.choose_k(seq, 4, rows=1, tokens=1) >= 2


def test_rule_probes_again_and_learns_from_counts(model_dir):
    """A sequence the rule stopped (poor acceptance) proposes two tokens after PROBE_STEPS
    idle steps when full acceptance would pay; accepted proposals raise its rate at once
    (decayed counts), and a timing sample faster than the estimate is followed at once."""
    sp = engine(model_dir, "numpy", spec("prompt_lookup", 4, adaptive=True)).spec
    sp.cost.observe(1, 0.030)
    for r in range(2, 10):
        sp.cost.observe(r, 0.031)
    seq = _fake_seq(GREEDY, [1, 2, 3])
    st = sp._state(seq)
    assert sp.choose_k(seq, 4, rows=1, tokens=1) >= 1  # new: measured before the prior
    st.count(0, 40, 1.0)  # 40 rejections in a row
    st.idle = 0
    ks = [sp.choose_k(seq, 4, rows=1, tokens=1) for _ in range(PROBE_STEPS)]
    assert ks == [0] * (PROBE_STEPS - 1) + [2]
    sp.update(seq, proposed=2, accepted=2, emitted=3)
    assert 0.1 < st.rate < 0.5
    for _ in range(8):
        sp.update(seq, proposed=4, accepted=4, emitted=5)
    assert st.rate > 0.6 and sp.choose_k(seq, 4, rows=1, tokens=1) >= 2
    # Expensive rows: no probe either, since even right proposals would not pay.
    dear = engine(model_dir, "numpy", spec("prompt_lookup", 4, adaptive=True)).spec
    for r in range(1, 10):
        dear.cost.observe(r, 0.03 * r)
    ks = [dear.choose_k(seq, 4, rows=1, tokens=1) for _ in range(3 * PROBE_STEPS)]
    assert ks == [0] * (3 * PROBE_STEPS)
    cost = StepCost()
    cost.observe(1, 0.100)  # a cold first step
    cost.observe(1, 0.030)
    cost.observe(1, 0.030)
    assert cost.time(1) < 0.05
    cost.observe(1, 0.300)  # one slow step moves it a little
    assert cost.time(1) < 0.15


def test_rule_weighs_lookup_proposals_by_match_length(model_dir):
    """Prompt-lookup acceptance is counted per n-gram match length, engine-wide and per
    sequence: after 1-gram matches were mostly wrong and 4-gram matches right, a new
    sequence speculates after a 4-gram match and not after a 1-gram one, and its own record
    then outweighs the engine's."""
    sp = engine(model_dir, "numpy", spec("prompt_lookup", 4, adaptive=True)).spec
    sp.cost.observe(1, 0.030)
    for r in range(2, 10):
        sp.cost.observe(r, 0.030 + 0.006 * (r - 1))
    old = _fake_seq(GREEDY, [1, 2, 3])
    for _ in range(20):
        sp.choose_k(old, 4, rows=1, tokens=1, match=1)
        sp.update(old, proposed=4, accepted=0, emitted=1)
        sp.choose_k(old, 4, rows=1, tokens=1, match=4)
        sp.update(old, proposed=4, accepted=4, emitted=5)
    new = _fake_seq(GREEDY, [1, 2, 3])
    new.seq_id = "other"
    sp._state(new).idle = 0  # past its first probe
    assert sp.choose_k(new, 4, rows=1, tokens=1, match=1) == 0
    assert sp.choose_k(new, 4, rows=1, tokens=1, match=4) == 4
    assert sp.expected(new, 4) > 4.0
    for _ in range(12):  # this sequence's 4-gram matches are wrong
        sp.choose_k(new, 4, rows=1, tokens=1, match=4)
        sp.update(new, proposed=1, accepted=0, emitted=1)
    assert sp.choose_k(new, 4, rows=1, tokens=1, match=4) == 0


def test_draft_catch_up_must_be_repaid(model_dir):
    """A draft that has never seen a sequence starts only when the time speculation saves
    over the sequence's remaining tokens, on a plain decode step of the running sequences,
    repays its catch-up: not for a sequence about to end, and not on a prefill-heavy step
    (where extra rows are nearly free) of a batch whose decode steps would not gain."""
    sp = engine(model_dir, "numpy", spec("draft", 4, adaptive=True), draft_md=model_dir).spec
    sp.draft.seconds, sp.draft.token_seconds = 0.01, 0.01
    sp.cost.observe(1, 0.030)
    for r in range(2, 10):
        sp.cost.observe(r, 0.031)
    for r in range(17, 21):
        sp.cost.observe(r, 0.130)
    sp.cost.observe(512, 1.0)
    seq = _fake_seq(GREEDY, [1, 2, 3])  # 4 tokens to catch up on: 0.04 s
    # Not before the plain step is measured COLD_SAMPLES times (its first sample is cold).
    assert sp.choose_k(seq, 4, rows=1, tokens=1, remaining=100) == 0
    for _ in range(COLD_SAMPLES - 1):
        sp.cost.observe(1, 0.030)
    for _ in range(COLD_SAMPLES):
        sp.cost.observe(16, 0.100)
    assert sp.choose_k(seq, 4, rows=1, tokens=1, remaining=100) == 1
    assert sp.choose_k(seq, 4, rows=1, tokens=1, remaining=1) == 0
    assert sp.choose_k(seq, 4, rows=512, tokens=1, remaining=100, running=16) == 0
    sp.draft.computed[seq.seq_id] = len(seq.token_ids)  # caught up: this step alone counts
    assert sp.choose_k(seq, 4, rows=512, tokens=1, remaining=100, running=16) >= 1
    # A probe (the rule declined: poor acceptance) must repay its catch-up within
    # PROBE_STEPS tokens, not over all remaining ones: 40 tokens behind (0.4 s) it is not
    # made, 4 tokens behind it is.
    far = _fake_seq(GREEDY, list(range(1, 40)))
    far.seq_id = "far"
    for behind, probes in ((40, False), (4, True)):
        sp.draft.computed[far.seq_id] = len(far.token_ids) - behind
        st = sp._state(far)
        st.hits, st.trials = 0.0, 40.0
        st.idle = 0
        ks = [sp.choose_k(far, 4, rows=1, tokens=1, remaining=100)
              for _ in range(PROBE_STEPS)]
        assert ks == [0] * (PROBE_STEPS - 1) + [2 if probes else 0]


@pytest.mark.parametrize("kw, match", [
    ({"num_tokens": 0}, "num_speculative_tokens"),
    ({"num_tokens": 17}, "num_speculative_tokens"),
    ({"num_tokens": True}, "num_speculative_tokens"),
    ({"method": "medusa"}, "method"),
    ({"method": "draft"}, "draft model"),
    ({"draft_model": "x"}, "only used"),
    ({"ngram_min": 3, "ngram_max": 2}, "ngram_min"),
])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(RequestError, match=match) as err:
        SpeculativeConfig(**kw)
    assert "\n" not in str(err.value)


def test_k_larger_than_the_step_budget_is_refused(model_dir):
    with pytest.raises(RequestError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=4, speculative=SpeculativeConfig(num_tokens=8))
    with pytest.raises(RequestError, match="max_num_batched_tokens"):
        engine(model_dir, "numpy", spec("prompt_lookup", 8), max_num_batched_tokens=4)


# -- drafts with a trimmed head (FR-Spec) ----------------------------------------------------

def _trimmed(md, out, ids):
    from ondevice.converters.draft_head import make_draft_head

    return ModelDir(make_draft_head(md.path, out, ids))


@pytest.fixture(scope="module")
def head_models(tmp_path_factory):
    """(full, trimmed, ids) for a tied Llama, a Gemma 3 and a 4-bit Llama: the trimmed head
    keeps every other token, most frequent first in a small text."""
    from ondevice.converters.draft_head import rank_tokens

    root = tmp_path_factory.mktemp("heads")
    out = {}
    for name, cfg, bits in (("llama", tiny_config(), None), ("gemma", tiny_gemma_config(), None),
                            ("llama-q4", tiny_config(), 4)):
        md = ModelDir(write_model(root / name, cfg, bits=bits, group_size=32))
        order = rank_tokens(md.tokenizer, ["the cat sat on the mat, the end"],
                            md.config.vocab_size)
        ids = order[: md.config.vocab_size // 2]
        out[name] = (md, _trimmed(md, root / f"{name}-head", ids), ids)
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_trimmed_head_logits_are_the_full_heads_columns(head_models, name):
    """On every backend the trimmed draft's logits are the full model's at its token ids."""
    for full, trimmed, ids in head_models.values():
        assert trimmed.config.draft_head_tokens == len(ids)
        assert (trimmed.draft_head_ids == ids).all()
        groups = _groups(full)
        tables = [list(range(5 * g, 5 * g + 5)) for g in range(max(groups, default=0) + 1)]
        batch = BatchInput.build([(list(range(3, 40)), 0, tables if groups else tables[0])],
                                 8, logits_for=[3], layer_groups=groups)
        want = backend(name, full).forward(batch)[:, ids]
        got = backend(name, trimmed).forward(batch)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def _groups(md):
    layout = backend_class("numpy").default_kv_layout(md.config)
    return layout.layer_group if layout.num_groups > 1 else ()


def test_trimmed_head_draft_keeps_greedy_output(head_models, tmp_path):
    """A trimmed copy of the target drafts: greedy output unchanged; with every token kept
    (in another order) it accepts everything, with half of them only tokens it has."""
    full, trimmed, ids = head_models["llama"]
    reqs = [(p, GREEDY) for p in repetitive_prompts(full.config.vocab_size, 6)]
    plain = run_all(engine(full), reqs)
    perm = np.random.default_rng(0).permutation(full.config.vocab_size)
    everything = _trimmed(full, tmp_path / "all", perm)
    eng = engine(full, "numpy", spec("draft", 4), everything)
    assert run_all(eng, reqs) == plain
    assert eng.stats()["spec_acceptance_rate"] == 1.0
    eng = engine(full, "numpy", spec("draft", 4), trimmed)
    proposed = []
    original = eng.spec.draft.propose

    def spy(items):
        out = original(items)
        proposed.extend(t for props, _ in out for t in props)
        return out

    eng.spec.draft.propose = spy
    assert run_all(eng, reqs) == plain
    assert proposed and set(proposed) <= set(ids.tolist())
    assert all(p.num_free_blocks == p.num_blocks for p in eng.spec.draft.kv.pools)


def test_trimmed_head_bad_input(head_models, tmp_path):
    full, trimmed, ids = head_models["llama"]
    from ondevice.converters.draft_head import make_draft_head
    from ondevice.errors import ModelFormatError, OndeviceError

    with pytest.raises(RequestError, match="it is a draft model") as err:
        engine(trimmed)
    assert "\n" not in str(err.value)
    for bad, match in ((list(ids[:3]) + [ids[0]], "repeat"),
                       ([full.config.vocab_size], "ids in"), ([], "ids in")):
        with pytest.raises(OndeviceError, match=match):
            make_draft_head(full.path, tmp_path / "x", bad)
        assert not (tmp_path / "x").exists()
    with pytest.raises(OndeviceError, match="already has a trimmed"):
        make_draft_head(trimmed.path, tmp_path / "y", [1, 2])
    from ondevice.converters.coreml import export_coreml

    with pytest.raises(OndeviceError, match="trimmed output head"):
        export_coreml(str(trimmed.path), tmp_path / "d.mlpackage")
    broken = tmp_path / "broken"
    for text, match in (("{", "not valid JSON"),
                        (json.dumps({"token_ids": ids.tolist()[:-1]}), "must be"),
                        (json.dumps({"token_ids": [int(ids[0])] * len(ids)}), "repeats"),
                        (json.dumps({"token_ids": [-1] + ids.tolist()[1:]}), "must be"),
                        (" " * (20 * len(ids) + 2000), "too large"), (None, "missing")):
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(trimmed.path, broken)
        head = broken / "draft_head.json"
        if text is None:
            head.unlink()
        else:
            head.write_text(text)
        with pytest.raises(ModelFormatError, match=match) as err:
            backend("numpy", ModelDir(broken))
        assert "\n" not in str(err.value)


def test_convert_draft_head_cli(model_dir, tmp_path):
    """``ondevice convert --draft-head N``: a draft directory whose head keeps the
    end-of-turn tokens and the corpus's most frequent tokens first; flags checked."""
    from click.testing import CliRunner

    from ondevice.apps.cli import cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra zebra zebra quokka quokka")
    out = tmp_path / "draft"
    run = CliRunner().invoke
    r = run(cli, ["convert", str(model_dir.path), "--draft-head", "40", "--head-corpus",
                  str(corpus), "-o", str(out)])
    assert r.exit_code == 0, r.output
    draft = ModelDir(out)
    ids = draft.draft_head_ids.tolist()
    assert draft.config.draft_head_tokens == 40 and ids[0] in model_dir.tokenizer.eos_token_ids
    counts = Counter(model_dir.tokenizer.encode(corpus.read_text()))
    assert set(counts) <= set(ids) and counts[ids[1]] == max(counts.values())
    eng = engine(model_dir, "numpy", spec("draft", 3), draft)
    reqs = [(p, GREEDY) for p in repetitive_prompts(model_dir.config.vocab_size, 3)]
    assert run_all(eng, reqs) == run_all(engine(model_dir), reqs)
    r = run(cli, ["convert", str(model_dir.path), "--draft-head", "40", "-o", str(out)])
    assert r.exit_code == 1 and "exists" in r.output
    r = run(cli, ["convert", str(model_dir.path), "--draft-head", "0", "-o",
                  str(tmp_path / "z")])
    assert r.exit_code == 1 and "keeps 1 to" in r.output
    r = run(cli, ["convert", str(model_dir.path), "--head-corpus", str(corpus), "-o",
                  str(tmp_path / "z")])
    assert r.exit_code != 0 and "--head-corpus needs --draft-head" in r.output
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.source").exists()


def test_draft_with_other_vocabulary_is_a_one_line_error(model_dir, tmp_path):
    from ondevice.runtime import Runtime

    other = write_model(tmp_path / "other", tiny_config(vocab_size=model_dir.config.vocab_size
                                                        + 8))
    renamed = tmp_path / "renamed"
    shutil.copytree(model_dir.path, renamed)
    tok = json.loads((renamed / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(w for w, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300  # same size, same merges, two ids swapped
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    for bad in (other, renamed):
        cfg = EngineConfig(speculative=SpeculativeConfig(method="draft", draft_model=str(bad)))
        with pytest.raises(RequestError, match="tokenizer or vocabulary") as err:
            Runtime(ModelDir(model_dir.path), "numpy", engine=cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(RequestError, match="needs a loaded draft model"):
        engine(model_dir, "numpy", spec("draft", 2))


def test_runtime_loads_a_draft_and_cli_flags(model_dir, tmp_path):
    from ondevice.runtime import Runtime

    cfg = EngineConfig(kv_memory="8MiB", speculative=SpeculativeConfig(
        method="draft", draft_model=str(model_dir.path), num_tokens=3, adaptive=False))
    rt = Runtime(ModelDir(model_dir.path), "numpy", engine=cfg)
    try:
        prompt = mixed_prompts(model_dir.config.vocab_size, 1, lengths=(9, 9))[0]
        got = [o.token_ids[0] for o in rt.sync.generate(prompt, GREEDY)]
        assert len(got) == 24 and rt.stats()["spec_acceptance_rate"] == 1.0
    finally:
        rt.close()
    for args, match in ((["--speculative", "prompt_lookup", "--num-speculative-tokens", "0"],
                         "num_speculative_tokens"),
                        (["--num-speculative-tokens", "3"], "need --speculative"),
                        (["--speculative", "draft", "--draft-model", str(tmp_path / "none")],
                         "not found")):
        p = subprocess.run([sys.executable, "-m", "ondevice", "generate", "-p", "hi",
                            "--model", str(model_dir.path), "-b", "numpy", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stderr
        assert match in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# -- the real model -------------------------------------------------------------------------

def _cut_draft(target: Path, layers: int, out: Path) -> Path:
    """A draft from the target itself: its first layers, final norm and tied head."""
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in sorted(target.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) < layers:
                tensors[name] = t
    save_file(tensors, out / "model.safetensors")
    for f in target.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def golden_backends(real_model_dir, tmp_path_factory):
    """The default model (f32) and a draft cut from its first 6 layers, on NumPy, loaded once
    for the golden checks below."""
    md = ModelDir(real_model_dir)
    draft_md = ModelDir(_cut_draft(real_model_dir, 6, tmp_path_factory.mktemp("draft") / "m"))
    return (md, NumpyBackend(md, num_blocks=64, block_size=16),
            NumpyBackend(draft_md, num_blocks=64, block_size=16))


# Every k from 1 to 8 runs on the tiny model on every backend; on the real model a spread of
# them keeps the suite's time (each check is its own test, within the per-test timeout).
@pytest.mark.real_model
@pytest.mark.parametrize("method, k", [("prompt_lookup", 1), ("prompt_lookup", 8),
                                       ("draft", 4)])
def test_golden_greedy_with_speculation(golden_backends, golden_cases, method, k):
    """The default model's golden prompts, all at once, with speculation: exactly the golden
    greedy tokens."""
    md, target, draft = golden_backends
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    reqs = [(c["prompt_ids"], params) for c in golden_cases]
    want = [{0: c["greedy_ids"]} for c in golden_cases]
    eng = Engine(target, md.tokenizer, context_length=md.config.context_length,
                 model_id=f"{method}{k}", speculative=spec(method, k),
                 draft_backend=draft if method == "draft" else None)
    assert run_all(eng, reqs) == want, (method, k)
    assert eng.stats()["spec_proposed_tokens"] > 0
