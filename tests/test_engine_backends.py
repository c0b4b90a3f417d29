"""The engine's guarantees (tests/test_engine.py, on NumPy) on every other backend that runs
here, at float32: batched = alone, preemption gives identical results, prefix caching hits with
the same tokens, and n > 1 samples (fork, copy-on-write) equal to NumPy's. A backend that should
run and does not is caught by tests/test_backends.py (ONDEVICE_REQUIRE_BACKENDS).

Each runs on the tiny Llama and on a tiny Gemma 3-shaped model whose local layers have a
window of 2.5 blocks (20 tokens, block size 8), so that prompts and generations run well past
the window; NumPy takes part for the Gemma model (test_engine.py covers it for the Llama). The
Gemma model's local layers keep their KV in a group of their own whose blocks go back to the
pool as they leave the window (window paging), which every test here checks happened; and a
sequence run far past a window of 2.5 blocks of 4 holds at most ceil(window / block size) + 1
local blocks while decoding, with the same tokens as a run that keeps every block."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_engine import GREEDY, mixed_prompts, run_all
from tiny import tiny_gemma_config, write_model

from ondevice.backends import available_backends, backend_class
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.engine import Engine
from ondevice.kv.layout import KVLayout
from ondevice.modeldir import ModelDir
from ondevice.sampling import SamplingParams
from ondevice.settings import backend_options

# Constructor keywords per backend: float32 arithmetic, MLX on its CPU device.
FLOAT32 = {"mlx": {"device": "cpu", "dtype": "float32"}, "wgpu": {"dtype": "float32"},
           "cpu": {}, "numpy": {}}
BACKENDS = [name for name, (ok, _) in available_backends().items() if ok and name in FLOAT32]
GEMMA_WINDOW = 20  # 2.5 blocks of 8


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_dir(request, tiny_model_dir, tmp_path_factory):
    if request.param == "llama":
        return ModelDir(tiny_model_dir)
    path = tmp_path_factory.mktemp("gemma3") / "model"
    return ModelDir(write_model(path, tiny_gemma_config(sliding_window=GEMMA_WINDOW)))


@pytest.fixture(params=BACKENDS)
def make_engine(request, model_dir):
    name = request.param  # NumPy too: the same guarantees on the reference, for both families

    def make(num_blocks=512, block_size=8, caching=True) -> Engine:
        backend = backend_class(name)(model_dir, num_blocks=num_blocks, block_size=block_size,
                                      options=backend_options(name, FLOAT32[name]))
        engine = Engine(backend, model_dir.tokenizer,
                        context_length=model_dir.config.context_length,
                        enable_prefix_caching=caching, model_id="tiny")
        engine.window_freed_steps = 0  # counted by paged_step below
        engine.step = paged_step(engine)
        return engine
    return make


def paged_step(engine: Engine):
    """``engine.step`` that counts the steps after which a windowed KV group holds fewer
    live blocks than its tables have entries (blocks went back to the pool)."""
    plain = engine.step

    def step():
        out = plain()
        kv = engine.kv
        for seq in engine.scheduler.running:
            if seq.seq_id in kv and any(kv.num_live_blocks(seq.seq_id, g)
                                        < len(kv.block_ids(seq.seq_id, g))
                                        for g in range(1, kv.num_groups)):
                engine.window_freed_steps += 1
                break
        return out
    return step


def check_paging(model_dir, *engines) -> None:
    """The Gemma model runs with window paging (two KV groups, blocks given back); the
    Llama has one group."""
    gemma = model_dir.config.is_gemma3
    for engine in engines:
        assert engine.kv.num_groups == (2 if gemma else 1)
        assert (engine.window_freed_steps > 0) == gemma


def run_alone(make_engine, requests, **kw):
    return [out for req in requests for out in run_all(make_engine(**kw), [req])]


def test_batched_equals_alone(model_dir, make_engine):
    prompts = mixed_prompts(model_dir.config.vocab_size, count=8, lengths=(5, 300))
    reqs = [(p, GREEDY) for p in prompts]
    engine = make_engine()
    assert run_all(engine, reqs) == run_alone(make_engine, reqs)
    assert engine.stats()["steps"] < 8 * 12  # requests really shared steps
    check_paging(model_dir, engine)


def test_preemption_gives_identical_results(model_dir, make_engine):
    prompts = mixed_prompts(model_dir.config.vocab_size, count=8, lengths=(5, 200), seed=1)
    reqs = [(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts]
    engine = make_engine(num_blocks=40)  # far fewer blocks than the requests hold together
    batched = run_all(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert batched == run_alone(make_engine, reqs)
    check_paging(model_dir, engine)


def test_prefix_caching_hits_and_same_tokens(model_dir, make_engine):
    rng = np.random.default_rng(2)
    vocab = model_dir.config.vocab_size
    shared = rng.integers(3, vocab, 100).tolist()
    reqs = [(shared + rng.integers(3, vocab, k).tolist(), GREEDY) for k in (3, 9, 17, 30)]
    engine = make_engine(caching=True)
    first = run_all(engine, reqs[:1])
    rest = run_all(engine, reqs[1:])
    assert engine.stats()["prefix_cache_hits"] >= 3 * 96
    assert first + rest == run_alone(make_engine, reqs, caching=False)
    check_paging(model_dir, engine)


def test_n_samples_fork_and_copy_on_write_equal_numpy(model_dir, make_engine):
    prompt = mixed_prompts(model_dir.config.vocab_size, count=1, lengths=(21, 21))[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3, ignore_eos=True)
    engine = make_engine()
    [ours] = run_all(engine, [(prompt, sp)])
    check_paging(model_dir, engine)
    numpy = Engine(NumpyBackend(model_dir, num_blocks=512, block_size=8), model_dir.tokenizer,
                   context_length=model_dir.config.context_length, model_id="tiny")
    [theirs] = run_all(numpy, [(prompt, sp)])
    assert ours == theirs


# -- window paging, far past the window --------------------------------------------------------
WINDOW, WINDOW_BS = 10, 4  # 2.5 blocks


@pytest.fixture(scope="module")
def gemma_window_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-window") / "model"
    return ModelDir(write_model(path, tiny_gemma_config(sliding_window=WINDOW)))


def window_engine(name, model_dir, *, paging: bool, num_blocks, budget=8) -> Engine:
    layout = KVLayout.for_config(model_dir.config, paging)
    backend = backend_class(name)(model_dir, num_blocks=num_blocks, block_size=WINDOW_BS,
                                  options=backend_options(name, FLOAT32[name]), kv_layout=layout)
    return Engine(backend, model_dir.tokenizer, context_length=model_dir.config.context_length,
                  max_num_batched_tokens=budget, model_id="tiny")


def generate_tracking(engine: Engine, prompt, params) -> tuple[list[int], list[int], list[dict]]:
    """Tokens, the local group's live blocks after each decode step, and the stats."""
    engine.add_request(prompt, params)
    tokens, live, stats = [], [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
        engine.kv.check_invariants()
        running = engine.scheduler.running
        if running and running[0].num_output > 1 and engine.kv.num_groups > 1:
            live.append(engine.kv.num_live_blocks(running[0].seq_id, 1))
            stats.append(engine.stats())
    assert all(p.num_free_blocks == p.num_blocks for p in engine.kv.pools)
    return tokens, live, stats


@pytest.mark.parametrize("name", BACKENDS)
def test_window_blocks_bounded_far_past_the_window_same_tokens(name, gemma_window_dir):
    """A 23-token prompt and 110 greedy tokens (13 windows) in chunks of 8: the local group
    holds at most ceil(10 / 4) + 1 = 4 blocks during decode, in a local pool of 6 blocks that
    could never hold the 34 blocks of the sequence; the tokens equal a run on the same
    backend (and NumPy's) that keeps every block in one group; KV bytes per group in stats."""
    md = gemma_window_dir
    prompt = np.random.default_rng(3).integers(3, md.config.vocab_size, 23).tolist()
    params = SamplingParams(max_tokens=110, temperature=0, ignore_eos=True)
    paged = window_engine(name, md, paging=True, num_blocks=(64, 6))
    assert paged.kv.windows == (0, WINDOW) and paged.context_limit == 64 * WINDOW_BS
    tokens, live, stats = generate_tracking(paged, prompt, params)
    bound = math.ceil(WINDOW / WINDOW_BS) + 1
    assert len(live) >= 100 and max(live) == bound  # the bound holds, and is reached
    kept, _, _ = generate_tracking(window_engine(name, md, paging=False, num_blocks=64),
                                   prompt, params)
    reference, _, _ = generate_tracking(window_engine("numpy", md, paging=False, num_blocks=64),
                                        prompt, params)
    assert len(tokens) == 110 and tokens == kept == reference
    # Stats: bytes per group; a block of one layer holds K and V of 4 float32 tokens.
    c = md.config
    layer_block = 2 * c.num_key_value_heads * c.head_dim * 4 * WINDOW_BS
    last = stats[-1]
    assert (last["kv_group0_window"], last["kv_group1_window"]) == (0, WINDOW)
    assert last["kv_group0_bytes_total"] == 64 * 1 * layer_block  # one global layer
    assert last["kv_group1_bytes_total"] == 6 * 2 * layer_block  # two local layers
    assert last["kv_bytes_total"] == last["kv_group0_bytes_total"] + last["kv_group1_bytes_total"]
    assert max(s["kv_group1_bytes_used"] for s in stats) <= bound * 2 * layer_block
    assert last["kv_group0_bytes_used"] >= (23 + 100) // WINDOW_BS * layer_block  # all kept
