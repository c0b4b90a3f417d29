"""The embedding API on a tiny model: generation, streaming, limits, and no leaked KV blocks."""

import pytest

import ondevice
from ondevice.errors import BackendUnavailableError, RequestError, SamplingError


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ondevice.load(tiny_model_dir, backend="numpy", kv_memory="4MiB")


def _free(model):
    model.runtime.loop.wait_idle()
    return model.stats()["kv_blocks_free"]


def test_greedy_is_deterministic_and_stream_matches_generate(model):
    before = _free(model)
    a = model.generate("The capital of France", max_tokens=12, temperature=0)
    chunks = list(model.stream("The capital of France", max_tokens=12, temperature=0))
    assert "".join(c.text for c in chunks) == a
    assert chunks[-1].finish_reason == "length" and len(chunks) == 12
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert _free(model) == before


def test_seeded_sampling_reproducible(model):
    kw = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = [c.token_id for c in model.stream("Hello", seed=7, **kw)]
    b = [c.token_id for c in model.stream("Hello", seed=7, **kw)]
    c = [c.token_id for c in model.stream("Hello", seed=8, **kw)]
    assert a == b and a != c


def test_chat_messages_use_template(model):
    ids = model.encode_prompt([{"role": "user", "content": "hi"}])
    text = model.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("assistant\n")


def test_stop_token_and_eos(model):
    first = next(iter(model.stream("Once upon", max_tokens=5, temperature=0))).token_id
    chunks = list(model.stream("Once upon", max_tokens=5, temperature=0, stop_token_ids=[first]))
    assert len(chunks) == 1 and chunks[0].finish_reason == "stop"


def test_stop_string_not_emitted(model):
    full = model.generate("The capital", max_tokens=20, temperature=0, ignore_eos=True)
    visible = full.strip()
    if len(visible) < 4:
        pytest.skip(f"random tiny model produced too little visible text: {full!r}")
    stop = visible[2:4]
    cut = full[: full.index(stop)]
    chunks = list(model.stream("The capital", max_tokens=20, temperature=0, ignore_eos=True,
                               stop=[stop]))
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].finish_reason == "stop"


def test_logprobs(model):
    chunks = list(model.stream("Hello", max_tokens=3, temperature=0, logprobs=3))
    for c in chunks:
        assert c.logprob is not None and len(c.top_logprobs) == 3
        assert c.top_logprobs[0][0] == c.token_id  # greedy picks the most likely token


def test_early_close_frees_blocks(model):
    before = _free(model)
    stream = model.stream("Hello world", max_tokens=500, temperature=0, ignore_eos=True)
    next(stream)
    stream.close()  # aborts the request if it is still running
    assert _free(model) == before


def test_prompt_longer_than_pool_rejected_before_allocation(model):
    before = _free(model)
    with pytest.raises(RequestError, match="prompt has"):
        model.generate([5] * (model.runtime.context_limit + 10), max_tokens=2)
    assert _free(model) == before


def test_out_of_vocab_ids_rejected(model):
    with pytest.raises(RequestError, match="token ids"):
        model.generate([model.config.vocab_size + 5], max_tokens=2)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0},
                                 {"top_k": -3}, {"min_p": 2}])
def test_bad_sampling_params(model, bad):
    with pytest.raises(SamplingError):
        model.generate("hi", **bad)


def test_unknown_backend(tiny_model_dir):
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        ondevice.load(tiny_model_dir, backend="tpu")


def test_missing_tokenizer_is_clear(tmp_path):
    from tiny import write_model

    write_model(tmp_path, tokenizer=False)
    with pytest.raises(ondevice.TokenizerError, match="tokenizer.json"):
        ondevice.load(tmp_path)


def test_missing_model_path():
    with pytest.raises(ondevice.OndeviceError, match="not found"):
        ondevice.load("/nonexistent/model")


def test_n_samples_all_complete_through_the_stream(model):
    chunks = list(model.stream("Hello", max_tokens=5, n=3, temperature=0.8, seed=1,
                               ignore_eos=True))
    per = {i: [c for c in chunks if c.index == i] for i in range(3)}
    assert all(len(v) == 5 and v[-1].finish_reason == "length" for v in per.values())
    replies = model.generate("Hello", max_tokens=5, n=3, temperature=0.8, seed=1, ignore_eos=True)
    assert isinstance(replies, list) and len(replies) == 3


def test_seeded_n2_same_alone_and_batched_with_preemption(tiny_model_dir):
    """Issue 16 (9): a seeded n = 2 request gives the same samples alone and among 15 other
    requests, even when a small KV pool makes the engine preempt and recompute."""
    import threading

    m = ondevice.load(tiny_model_dir, backend="numpy", kv_memory="256KiB", quiet=True)
    try:
        kw = dict(max_tokens=40, temperature=1.0, seed=3, n=2, ignore_eos=True)
        alone = m.generate("Once upon a time", **kw)
        before = m.stats()["preemptions"]

        def other(i: int) -> None:
            m.generate(f"Question {i}: what is {i} plus {i * 3}?", max_tokens=40,
                       temperature=1.0, ignore_eos=True)

        threads = [threading.Thread(target=other, args=(i,)) for i in range(15)]
        for t in threads:
            t.start()
        batched = m.generate("Once upon a time", **kw)
        for t in threads:
            t.join(60)
        assert batched == alone and alone[0] != alone[1]
        assert m.stats()["preemptions"] > before  # the batch really was tight
    finally:
        m.close()


def test_bad_sampling_params_name_the_field(model):
    with pytest.raises(SamplingError) as info:
        model.generate("hi", top_p=0)
    assert info.value.field == "top_p"


def test_unknown_sampling_keyword_names_it_and_the_accepted_ones(model):
    from ondevice import UnknownSamplingOptionError

    for call in (model.generate, lambda *a, **k: list(model.stream(*a, **k))):
        with pytest.raises(UnknownSamplingOptionError) as info:
            call("hi", max_tokens=2, temprature=0.5)
        err = info.value
        assert isinstance(err, ondevice.OndeviceError) and isinstance(err, SamplingError)
        assert err.field == "temprature"
        msg = str(err)
        assert "'temprature'" in msg and "did you mean 'temperature'" in msg
        assert "max_tokens" in msg and "top_p" in msg  # the accepted keywords are listed
        assert "\n" not in msg


def test_model_is_a_context_manager(tiny_model_dir):
    with ondevice.load(tiny_model_dir, backend="numpy", kv_memory="4MiB") as m:
        assert m.generate("hi", max_tokens=2, temperature=0)
    with pytest.raises(RequestError):  # closed on leaving the block
        m.generate("hi", max_tokens=2, temperature=0)


def test_astream_matches_stream_and_aborts_when_left_early(model):
    import asyncio

    want = "".join(c.text for c in model.stream("Once upon", max_tokens=8, temperature=0))

    async def main():
        got = [c.text async for c in model.astream("Once upon", max_tokens=8, temperature=0)]
        # Two at once share the engine; leaving one early frees its blocks.
        async def first_chunk():
            async for c in model.astream("Tell me", max_tokens=500, temperature=0,
                                         ignore_eos=True):
                return c

        early = await asyncio.gather(first_chunk(), first_chunk())
        return "".join(got), early

    text, early = asyncio.run(main())
    assert text == want
    assert all(c.token_id is not None for c in early)
    assert model.timings.generated_tokens >= 1
    total = model.stats()["kv_blocks_total"]
    assert _free(model) == total


def test_astream_unknown_keyword(model):
    import asyncio

    from ondevice import UnknownSamplingOptionError

    async def main():
        async for _ in model.astream("hi", max_token=3):
            pass

    with pytest.raises(UnknownSamplingOptionError, match="did you mean 'max_tokens'"):
        asyncio.run(main())
