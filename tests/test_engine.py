"""The continuous-batching engine on a tiny model: batched = alone, preemption, prefix caching,
aborts, n > 1, limits, and the synchronous and asyncio fronts."""

import asyncio
import threading

import numpy as np
import pytest

from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.engine import AsyncEngine, Engine, EngineLoop, SyncEngine
from ondevice.errors import RequestError
from ondevice.modeldir import ModelDir
from ondevice.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return ModelDir(tiny_model_dir)


def make_engine(model_dir, num_blocks=512, block_size=8, caching=True, **kw) -> Engine:
    backend = NumpyBackend(model_dir, num_blocks=num_blocks, block_size=block_size)
    return Engine(backend, model_dir.tokenizer, context_length=model_dir.config.context_length,
                  enable_prefix_caching=caching, model_id="tiny", **kw)


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    """Submit everything at once, step until done; tokens per (request, sample index)."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    out: dict = {rid: {} for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].setdefault(o.index, []).extend(o.token_ids)
        engine.kv.check_invariants()
    assert all(p.num_free_blocks == p.num_blocks for p in engine.kv.pools)  # nothing leaked
    return [out[rid] for rid in ids]


def run_alone(model_dir, requests, **kw):
    results = []
    for p, sp in requests:
        results.extend(run_all(make_engine(model_dir, **kw), [(p, sp)]))
    return results


def mixed_prompts(vocab: int, count=16, seed=0, lengths=(5, 600)):
    rng = np.random.default_rng(seed)
    lens = np.linspace(lengths[0], lengths[1], count).astype(int)
    rng.shuffle(lens)
    return [rng.integers(3, vocab, n).tolist() for n in lens]


def test_batched_equals_alone_mixed_lengths(model_dir):
    prompts = mixed_prompts(model_dir.config.vocab_size)
    reqs = [(p, GREEDY) for p in prompts]
    engine = make_engine(model_dir)
    batched = run_all(engine, reqs)
    assert batched == run_alone(model_dir, reqs)
    assert engine.stats()["steps"] < 16 * 12  # requests really shared steps


def test_preemption_gives_identical_results(model_dir):
    prompts = mixed_prompts(model_dir.config.vocab_size, lengths=(5, 200), seed=1)
    reqs = [(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts]
    # 40 blocks of 8 tokens: far less than the ~1,800 tokens the 16 requests hold together.
    engine = make_engine(model_dir, num_blocks=40)
    batched = run_all(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert batched == run_alone(model_dir, reqs)


def test_prefix_caching_hits_and_same_tokens(model_dir):
    rng = np.random.default_rng(2)
    shared = rng.integers(3, model_dir.config.vocab_size, 100).tolist()
    prompts = [shared + rng.integers(3, model_dir.config.vocab_size, k).tolist()
               for k in (3, 9, 17, 30)]
    reqs = [(p, GREEDY) for p in prompts]
    engine = make_engine(model_dir, caching=True)
    first = run_all(engine, reqs[:1])
    rest = run_all(engine, reqs[1:])
    st = engine.stats()
    assert st["prefix_cache_hits"] >= 3 * 96  # 12 full blocks of the shared prefix, 3 requests
    assert first + rest == run_alone(model_dir, reqs, caching=False)


def test_seeded_sampling_same_batched_or_alone(model_dir):
    prompts = mixed_prompts(model_dir.config.vocab_size, count=6, lengths=(4, 60), seed=3)
    reqs = [(p, SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=i))
            for i, p in enumerate(prompts)]
    assert run_all(make_engine(model_dir), reqs) == run_alone(model_dir, reqs)


def test_n_parallel_samples_share_prompt_blocks(model_dir):
    prompt = mixed_prompts(model_dir.config.vocab_size, count=1, lengths=(21, 21))[0]
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    engine = make_engine(model_dir, block_size=8)
    rid = engine.add_request(prompt, sp)
    outs: dict = {}
    forked_blocks = None
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.index, []).extend(o.token_ids)
        if forked_blocks is None and len(outs) == 3:
            tables = [engine.kv.block_ids(f"{rid}#{i}" if i else rid) for i in range(3)]
            forked_blocks = tables
        engine.kv.check_invariants()
    assert sorted(outs) == [0, 1, 2] and all(len(v) == 8 for v in outs.values())
    assert len({tuple(v) for v in outs.values()}) > 1  # the samples differ
    # The two full prompt blocks are shared by all three; the partial third was copied.
    assert forked_blocks[0][:2] == forked_blocks[1][:2] == forked_blocks[2][:2]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    # Same seed: the same three samples again.
    again = run_all(make_engine(model_dir, block_size=8), [(prompt, sp)])[0]
    assert again == outs


def test_abort_returns_every_block(model_dir):
    engine = make_engine(model_dir)
    total = engine.kv.num_free_blocks
    a = engine.add_request(list(range(3, 200)), GREEDY)
    b = engine.add_request(list(range(3, 50)), SamplingParams(max_tokens=5, n=2, seed=1))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < total
    outs = engine.abort(a) + engine.abort(b)
    assert {o.finish_reason for o in outs} == {"abort"}
    assert engine.kv.num_free_blocks == total and not engine.has_unfinished()
    engine.kv.check_invariants()


@pytest.mark.parametrize("length, match", [(1024, "prompt has 1024 tokens"),
                                           (200, "prompt has 200 tokens")])
def test_oversize_prompt_rejected_before_allocation(model_dir, length, match):
    # The second case: a pool of 20 blocks x 8 = 160 tokens, smaller than the context.
    engine = make_engine(model_dir, num_blocks=20 if length == 200 else 512)
    free = engine.kv.num_free_blocks
    with pytest.raises(RequestError, match=match):
        engine.add_request([5] * length, GREEDY)
    assert engine.kv.num_free_blocks == free and not engine.has_unfinished()


def test_generation_stops_at_the_pool_limit(model_dir):
    engine = make_engine(model_dir, num_blocks=4, block_size=8)  # 32 tokens in all
    [res] = run_all(engine, [([5] * 20, SamplingParams(max_tokens=100, ignore_eos=True))])
    assert len(res[0]) == 12  # 20 + 12 = 32: finished with "length" at the pool's end


def test_stats_and_utilization(model_dir):
    engine = make_engine(model_dir, block_size=8)
    engine.add_request(list(range(3, 23)), GREEDY)  # 20 tokens -> 3 blocks, 20 of 24 slots
    engine.step()
    st = engine.stats()
    assert st["running"] == 1 and st["kv_blocks_used"] == 3
    assert st["kv_utilization"] == round(20 / 24, 4)  # slots of computed tokens / allocated
    # One KV group (a Llama): every layer's K and V, float32, per block.
    c = model_dir.config
    block_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4 * 8
    assert st["kv_group0_window"] == 0 and "kv_group1_window" not in st
    assert st["kv_group0_bytes_used"] == st["kv_bytes_used"] == 3 * block_bytes
    assert st["kv_group0_bytes_total"] == st["kv_bytes_total"] == 512 * block_bytes
    while engine.has_unfinished():
        engine.step()
    st = engine.stats()
    assert st["generated_tokens"] == 12 and st["prompt_tokens"] == 20 and st["running"] == 0


def test_sync_front_many_threads_and_dropped_stream(model_dir):
    engine = make_engine(model_dir)
    loop = EngineLoop(engine)
    sync = SyncEngine(loop)
    prompts = mixed_prompts(model_dir.config.vocab_size, count=8, lengths=(5, 80), seed=4)
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = [t for o in sync.generate(prompts[i], GREEDY) for t in o.token_ids]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = run_alone(model_dir, [(p, GREEDY) for p in prompts])
    assert [results[i] for i in range(8)] == [e[0] for e in expected]
    # A stream dropped after one output: aborted, blocks back.
    stream = sync.generate(prompts[0], SamplingParams(max_tokens=500, ignore_eos=True))
    next(stream)
    stream.close()
    assert loop.wait_idle(10)
    assert loop.call(lambda: engine.kv.num_free_blocks) == engine.kv.num_blocks
    loop.shutdown()


def test_async_front_and_cancellation(model_dir):
    engine = make_engine(model_dir)
    loop = EngineLoop(engine)
    front = AsyncEngine(loop)
    prompts = mixed_prompts(model_dir.config.vocab_size, count=4, lengths=(5, 40), seed=6)

    async def collect(p):
        return [t async for o in front.generate(p, GREEDY) for t in o.token_ids]

    async def cancelled(p):
        agen = front.generate(p, SamplingParams(max_tokens=500, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()

    async def main():
        got = await asyncio.gather(*(collect(p) for p in prompts))
        await cancelled(prompts[0])
        return got

    got = asyncio.run(main())
    assert got == [e[0] for e in run_alone(model_dir, [(p, GREEDY) for p in prompts])]
    assert loop.wait_idle(10)
    assert loop.call(lambda: engine.kv.num_free_blocks) == engine.kv.num_blocks
    loop.shutdown()


def test_prompt_cache_save_and_load(model_dir, tmp_path):
    from ondevice.engine.prompt_cache import load_prompt_cache, save_prompt_cache
    from ondevice.errors import ModelFormatError

    rng = np.random.default_rng(7)
    system = rng.integers(3, model_dir.config.vocab_size, 70).tolist()
    question = system + rng.integers(3, model_dir.config.vocab_size, 9).tolist()
    path = tmp_path / "system.safetensors"
    a = make_engine(model_dir, block_size=8)
    assert save_prompt_cache(a, system, path) == 64  # full blocks only
    assert a.kv.num_free_blocks == a.kv.num_blocks

    b = make_engine(model_dir, block_size=8)  # a fresh pool, as in a later process
    assert load_prompt_cache(b, path) == 64
    [with_cache] = run_all(b, [(question, GREEDY)])
    assert b.stats()["prefix_cache_hits"] == 64
    [without] = run_alone(model_dir, [(question, GREEDY)], caching=False, block_size=8)
    assert with_cache == without

    other_bs = make_engine(model_dir, block_size=16)
    with pytest.raises(RequestError, match="blocks of 8 tokens"):
        load_prompt_cache(other_bs, path)
    other_model = make_engine(model_dir, block_size=8)
    other_model.model_id = "another"
    with pytest.raises(RequestError, match="another model"):
        load_prompt_cache(other_model, path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelFormatError):
        load_prompt_cache(b, tmp_path / "junk.safetensors")
    assert b.kv.num_free_blocks == b.kv.num_blocks
