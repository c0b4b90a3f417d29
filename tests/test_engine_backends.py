"""The engine's guarantees (tests/test_engine.py, on NumPy) on every other backend that runs
here, at float32: batched = alone, preemption gives identical results, prefix caching hits with
the same tokens, and n > 1 samples (fork, copy-on-write) equal to NumPy's. A backend that should
run and does not is caught by tests/test_backends.py (ONDEVICE_REQUIRE_BACKENDS).

Each runs on the tiny Llama and on a tiny Gemma 3-shaped model whose local layers have a
window of 2.5 blocks (20 tokens, block size 8), so that prompts and generations run well past
the window; NumPy takes part for the Gemma model (test_engine.py covers it for the Llama)."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import GREEDY, mixed_prompts, run_all
from tiny import tiny_gemma_config, write_model

from ondevice.backends import available_backends, backend_class
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.engine import Engine
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
        return Engine(backend, model_dir.tokenizer,
                      context_length=model_dir.config.context_length,
                      enable_prefix_caching=caching, model_id="tiny")
    return make


def run_alone(make_engine, requests, **kw):
    return [out for req in requests for out in run_all(make_engine(**kw), [req])]


def test_batched_equals_alone(model_dir, make_engine):
    prompts = mixed_prompts(model_dir.config.vocab_size, count=8, lengths=(5, 300))
    reqs = [(p, GREEDY) for p in prompts]
    engine = make_engine()
    assert run_all(engine, reqs) == run_alone(make_engine, reqs)
    assert engine.stats()["steps"] < 8 * 12  # requests really shared steps


def test_preemption_gives_identical_results(model_dir, make_engine):
    prompts = mixed_prompts(model_dir.config.vocab_size, count=8, lengths=(5, 200), seed=1)
    reqs = [(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts]
    engine = make_engine(num_blocks=40)  # far fewer blocks than the requests hold together
    batched = run_all(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert batched == run_alone(make_engine, reqs)


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


def test_n_samples_fork_and_copy_on_write_equal_numpy(model_dir, make_engine):
    prompt = mixed_prompts(model_dir.config.vocab_size, count=1, lengths=(21, 21))[0]
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    [ours] = run_all(make_engine(), [(prompt, sp)])
    numpy = Engine(NumpyBackend(model_dir, num_blocks=512, block_size=8), model_dir.tokenizer,
                   context_length=model_dir.config.context_length, model_id="tiny")
    [theirs] = run_all(numpy, [(prompt, sp)])
    assert ours == theirs
