"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official ``openai``
client (and raw httpx/sockets where a client must misbehave): chat and completions, streaming
and not, n, stop strings, seeds, usage, logprobs, 32 concurrent streams, disconnects, errors,
queue limits and graceful shutdown, all on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest
from click.testing import CliRunner
from tiny import SPECIALS

import ondevice
from ondevice.sampling import SamplingParams
from ondevice.server import ServerThread, create_app

MODEL = "tiny"
LONG = 1000  # max_tokens of requests meant to be cut short (the context is 1024)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; a bound on waiting, never a measured result."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def pool_restored(model) -> bool:
    engine = model.runtime.engine
    return model.runtime.loop.call(
        lambda: not engine.has_unfinished() and engine.kv.num_free_blocks == engine.kv.num_blocks)


def wait_pool_restored(model) -> None:
    wait_until(lambda: pool_restored(model), what="every KV block to be free again")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(create_app(model, model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def slow_model(tiny_model_dir):
    """Two running sequences at most, and every engine step takes 10 ms longer: a request for
    LONG tokens runs for 10 s or more, so tests can act on it while it runs."""
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", max_num_seqs=2, quiet=True)
    backend = m.runtime.backend
    forward = backend.forward

    def slow_forward(batch):
        time.sleep(0.01)
        return forward(batch)

    backend.forward = slow_forward
    yield m
    m.close()


@pytest.fixture(scope="module")
def slow_server(slow_model):
    app = create_app(slow_model, model_name=MODEL, max_queue=0)
    with ServerThread(app) as srv:
        yield srv


CHAT = [{"role": "system", "content": "You are a tiny model."},
        {"role": "user", "content": "What is the capital of France?"}]


def expected(model, prompt, **sampling):
    """(text, token count, finish reason) of the same request run on the engine directly."""
    chunks = list(model.stream(prompt, SamplingParams(**sampling)))
    return ("".join(c.text for c in chunks), sum(c.token_id is not None for c in chunks),
            next(c.finish_reason for c in chunks if c.finish_reason))


def greedy_text(client, max_tokens=24, **extra) -> str:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens,
                                       temperature=0, extra_body={"ignore_eos": True}, **extra)
    return r.choices[0].message.content


# --------------------------------------------------------------------------------------------
# Basic endpoints


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").json()
    for key in ("running", "waiting", "kv_utilization", "kv_blocks_free", "prefix_cache_hits",
                "tokens_per_second"):
        assert key in metrics
    assert metrics["server"]["requests_in_flight"] == 0
    prom = httpx.get(server.url + "/metrics", params={"format": "prometheus"})
    assert prom.headers["content-type"].startswith("text/plain")
    assert re.search(r"^ondevice_kv_blocks_free \d+$", prom.text, re.M)


# --------------------------------------------------------------------------------------------
# Chat and completions


def test_chat_matches_the_engine_and_counts_usage(model, client):
    text, ntok, finish = expected(model, CHAT, max_tokens=12, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text and choice.finish_reason == finish
    assert choice.logprobs is None
    assert r.usage.prompt_tokens == len(model.encode_prompt(CHAT))
    assert r.usage.completion_tokens == ntok
    assert r.usage.total_tokens == r.usage.prompt_tokens + ntok


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(model, client):
    prompt = "Once upon a time"
    text, ntok, finish = expected(model, prompt, max_tokens=10, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(model.encode_prompt(prompt))
    assert r.usage.completion_tokens == ntok
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_completions_default_max_tokens_token_ids_and_batches(model, client):
    ids = model.encode_prompt("Hello world")
    one = client.completions.create(model=MODEL, prompt=ids, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert one.usage.completion_tokens == 16  # OpenAI's default for completions
    two = client.completions.create(model=MODEL, prompt=["The capital of", "Hello world"],
                                    max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == one.choices[0].text
    assert two.usage.prompt_tokens == len(model.encode_prompt("The capital of")) + len(ids)
    assert two.usage.completion_tokens == 32


def test_n2_and_reproducible_seeds(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, n=2,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs, seed=7)
    b = client.chat.completions.create(**kwargs, seed=7)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]  # two samples, not one twice
    assert a.usage.completion_tokens == 24
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # the prompt counts once

    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, seed=7, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == texts

    single = client.chat.completions.create(**{**kwargs, "n": 1}, seed=7)
    assert single.choices[0].message.content == texts[0]
    others = {client.chat.completions.create(**kwargs, seed=s).choices[0].message.content
              for s in (8, 9)}
    assert others != {texts[0]}


def test_seeded_n3_over_http_equals_the_python_api(model, client):
    """n > 1 has one meaning: one request forked into n samples, sample i seeded with
    SeedSequence(seed, spawn_key=(i,)), over HTTP exactly as through Model.generate."""
    sampling = dict(max_tokens=12, temperature=1.0, n=3, seed=1234)
    local = model.generate(CHAT, ignore_eos=True, **sampling)
    assert isinstance(local, list) and len(set(local)) == 3
    r = client.chat.completions.create(model=MODEL, messages=CHAT,
                                       extra_body={"ignore_eos": True}, **sampling)
    assert [c.message.content for c in r.choices] == local
    assert [c.index for c in r.choices] == [0, 1, 2]

    prompt = "Once upon a time"
    local = model.generate(prompt, ignore_eos=True, **sampling)
    r = client.completions.create(model=MODEL, prompt=prompt, extra_body={"ignore_eos": True},
                                  **sampling)
    assert [c.text for c in r.choices] == local
    streamed = ["", "", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                           extra_body={"ignore_eos": True}, **sampling):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == local


def test_seeded_n2_is_the_same_alone_and_batched(model, server, client):
    """Issue 16 (9): sample 0 (and 1) of a seeded n = 2 request at temperature 1 do not
    depend on which other requests share the engine's steps."""
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, n=2, seed=99,
                  extra_body={"ignore_eos": True})
    alone = [c.message.content for c in client.chat.completions.create(**kwargs).choices]

    async def batched() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                     max_retries=0, timeout=60)
        others = [aclient.chat.completions.create(
            model=MODEL, max_tokens=24, temperature=1.0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Question {i}: {i} plus {i * 3}?"}])
            for i in range(15)]
        try:
            *_, mine = await asyncio.wait_for(
                asyncio.gather(*others, aclient.chat.completions.create(**kwargs)), 120)
        finally:
            await aclient.close()
        return [c.message.content for c in mine.choices]

    for _ in range(3):
        assert asyncio.run(batched()) == alone
    assert alone[0] != alone[1]
    wait_pool_restored(model)


def _stop_for(text: str) -> tuple[str, str]:
    m = re.search(r"[A-Za-z]{2}", text[3:])
    assert m, f"no usable stop string in {text!r}"
    stop = m.group(0)
    return stop, text[: text.index(stop)]


def test_stop_strings(client):
    full = greedy_text(client)
    stop, before = _stop_for(full)
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].message.content == before and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == before
    assert chunks[-1].choices[0].finish_reason == "stop"

    prompt = "Once upon a time"
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    stop, before = _stop_for(comp)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  stop=stop, extra_body={"ignore_eos": True})
    assert r.choices[0].text == before and r.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and entry.bytes
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
    # The tokens' bytes spell the reply (special tokens are not part of the text).
    raw = b"".join(bytes(e.bytes) for e in content if e.token not in SPECIALS)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content

    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                           temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
        stream=True, extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6,
                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6,
                                            temperature=0, logprobs=2, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] \
        == lp.tokens


# --------------------------------------------------------------------------------------------
# Concurrency


def test_32_concurrent_streams_equal_alone_and_pool_restored(model, server, client):
    questions = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(32)]
    messages = [[CHAT[0], {"role": "user", "content": q}] for q in questions]
    kwargs = dict(model=MODEL, max_tokens=16, temperature=0)

    def alone(msgs):
        chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kwargs))
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                [c.choices[0].finish_reason for c in chunks if c.choices and
                 c.choices[0].finish_reason])

    solo = [alone(m) for m in messages]
    before = model.stats()

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                     max_retries=0, timeout=60)

        async def one(msgs):
            text, finishes = "", []
            stream = await aclient.chat.completions.create(messages=msgs, stream=True, **kwargs)
            async for c in stream:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    if c.choices[0].finish_reason:
                        finishes.append(c.choices[0].finish_reason)
            return text, finishes

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(m) for m in messages)), 120)
        finally:
            await aclient.close()

    batched = asyncio.run(together())
    assert batched == solo
    after = model.stats()
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert after["steps"] - before["steps"] < generated  # requests shared engine steps
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]  # the system prompt
    wait_pool_restored(model)
    assert httpx.get(server.url + "/metrics").json()["server"]["requests_in_flight"] == 0


# --------------------------------------------------------------------------------------------
# Disconnects, queue limit, shutdown


def _long_body(stream: bool, **extra) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG,
            "temperature": 0, "ignore_eos": True, "stream": stream, **extra}


def test_streaming_disconnect_aborts_and_frees_blocks(slow_model, slow_server):
    state = slow_server.app.state.ondevice
    gone = state.counters["requests_disconnected"]
    before = slow_model.stats()["generated_tokens"]
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", slow_server.url + "/v1/completions",
                        json=_long_body(True)) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # tokens are flowing: drop the connection now
    wait_pool_restored(slow_model)
    wait_until(lambda: state.counters["requests_disconnected"] == gone + 1, what="the abort")
    assert slow_model.stats()["generated_tokens"] - before < LONG
    assert state.seqs_in_flight == 0


def test_non_streaming_disconnect_aborts_and_frees_blocks(slow_model, slow_server):
    state = slow_server.app.state.ondevice
    gone = state.counters["requests_disconnected"]
    before = slow_model.stats()["generated_tokens"]
    body = json.dumps(_long_body(False)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=30) as sock:
        sock.sendall(head + body)
        wait_until(lambda: slow_model.stats()["generated_tokens"] > before,
                   what="the request to start decoding")
    wait_pool_restored(slow_model)
    wait_until(lambda: state.counters["requests_disconnected"] == gone + 1, what="the abort")
    assert slow_model.stats()["generated_tokens"] - before < LONG
    assert state.seqs_in_flight == 0


def test_full_queue_returns_429(slow_model, slow_server):
    # max_num_seqs=2 and max_queue=0: two requests run, a third is refused.
    url = slow_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url, json=_long_body(True)) as a, \
                http.stream("POST", url, json=_long_body(True)) as b:
            assert a.status_code == b.status_code == 200
            refused = http.post(url, json=_long_body(False, max_tokens=4))
            assert refused.status_code == 429
            err = refused.json()["error"]
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
            assert "max_queue 0" in err["message"]
            c = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    wait_pool_restored(slow_model)
    # With room again, the same request is served.
    ok = httpx.post(url, json=_long_body(False, max_tokens=4), timeout=30)
    assert ok.status_code == 200


def test_graceful_shutdown_finishes_short_and_aborts_long(slow_model):
    app = create_app(slow_model, model_name=MODEL)
    srv = ServerThread(app, drain_timeout=3.0).start()
    url = srv.url + "/v1/completions"
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=_long_body(True)) as long_resp, \
                http.stream("POST", url, json=_long_body(True, max_tokens=8)) as short_resp:
            assert long_resp.status_code == short_resp.status_code == 200
            lines = long_resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            srv.stop()  # drains: the short stream finishes, the long one is aborted
            short_data = [line for line in short_resp.iter_lines() if line.startswith("data: ")]
            long_data = [line for line in lines if line.startswith("data: ")]
    assert short_data[-1] == "data: [DONE]"
    assert json.loads(short_data[-2][6:])["choices"][0]["finish_reason"] == "length"
    err = json.loads(long_data[-1][6:])["error"]
    assert err["code"] == "server_shutting_down" and err["type"] == "server_error"
    assert app.state.ondevice.closing and app.state.ondevice.seqs_in_flight == 0
    wait_pool_restored(slow_model)


# --------------------------------------------------------------------------------------------
# Errors


def test_oversize_prompt_is_400_with_counts(model, client):
    limit = model.runtime.context_limit
    text = "hello world " * 1200
    n = len(model.encode_prompt([{"role": "user", "content": text}]))
    assert n >= limit
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    err = exc.value.body
    assert exc.value.status_code == 400
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert str(n) in err["message"] and str(limit - 1) in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=[5] * (limit + 10))
    assert exc.value.body["param"] == "prompt" and str(limit + 10) in exc.value.body["message"]
    assert pool_restored(model)


BAD = [
    ("chat", {"temperature": -1}, "temperature"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("chat", {"top_p": 1.5}, "top_p"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 1000}, "n"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": "ten"}, "max_tokens"),
    ("chat", {"max_completion_tokens": -5}, "max_completion_tokens"),
    ("chat", {"presence_penalty": 5}, "presence_penalty"),
    ("chat", {"frequency_penalty": [1]}, "frequency_penalty"),
    ("chat", {"seed": -1}, "seed"),
    ("chat", {"seed": 1.5}, "seed"),
    ("chat", {"stop": 5}, "stop"),
    ("chat", {"stop": [""]}, "stop"),
    ("chat", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream": True, "stream_options": "usage"}, "stream_options"),
    ("chat", {"messages": None}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat", {"messages": [{"role": "user"}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("chat", {"tools": [{"type": "function"}]}, "tools"),
    ("chat", {"model": 3}, "model"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": ["a"] * 65}, "prompt"),
    ("completions", {"logprobs": 99}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"top_k": -1}, "top_k"),
]


@pytest.mark.parametrize("endpoint,change,param", BAD,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, p) in enumerate(BAD)])
def test_bad_parameters_are_400_naming_the_param(server, endpoint, change, param):
    body = ({"model": MODEL, "messages": CHAT, "max_tokens": 2} if endpoint == "chat"
            else {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    body.update(change)
    r = httpx.post(f"{server.url}/v1/{endpoint.replace('chat', 'chat/completions')}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] or param == "messages" or param == "prompt"


def test_bad_parameter_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=CHAT, top_p=2.0)
    assert exc.value.body["param"] == "top_p" and "top_p" in exc.value.body["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe\xfa",
                                 b'{"messages": [{"role": "user", "content": "hi"}], '
                                 b'"temperature": NaN}', b"[" * 100000])
def test_malformed_bodies_are_400(server, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.url + path, content=raw,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, raw[:20], r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    # A request that names no model gets the served one.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    missing = httpx.get(server.url + "/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(server.url + "/v1/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_api_key(model, caplog):
    key = "sk-local-S3cret-value"
    with ServerThread(create_app(model, model_name=MODEL, api_key=key)) as srv:
        base = srv.url + "/v1"
        wrong = openai.OpenAI(base_url=base, api_key="sk-wrong-guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            wrong.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert exc.value.status_code == 401
        assert exc.value.body["code"] == "invalid_api_key"
        text = exc.value.response.text
        assert key not in text and "sk-wrong-guess" not in text
        for headers in ({}, {"authorization": key}, {"authorization": f"Basic {key}"}):
            r = httpx.post(base + "/completions", json={"prompt": "Hi"}, headers=headers)
            assert r.status_code == 401 and key not in r.text
        assert httpx.get(base + "/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        right = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        r = right.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert r.usage.completion_tokens >= 1
    assert key not in caplog.text


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_serve_calls_the_library(monkeypatch):
    import ondevice.server
    from ondevice.apps.cli import cli

    seen = {}
    monkeypatch.setattr(ondevice.server, "serve",
                        lambda model, **kw: seen.update(model=model, **kw))
    result = CliRunner().invoke(cli, ["serve", "--model", "some/dir", "--port", "9001",
                                      "--max-queue", "3", "--api-key", "k", "--kv-memory",
                                      "64MiB"])
    assert result.exit_code == 0, result.output
    assert seen["model"] == "some/dir" and seen["port"] == 9001 and seen["max_queue"] == 3
    assert seen["api_key"] == "k" and seen["engine"].kv_memory == 64 << 20
    assert seen["host"] == "127.0.0.1" and seen["backend"] == "auto"
    assert tuple(seen["allowed_hosts"]) == ()
    result = CliRunner().invoke(cli, ["serve", "--allowed-host", "box.local",
                                      "--allowed-host", "10.0.0.7"])
    assert result.exit_code == 0, result.output
    assert tuple(seen["allowed_hosts"]) == ("box.local", "10.0.0.7")
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for option in ("--host", "--port", "--max-queue", "--api-key", "--model", "--backend",
                   "--allowed-host"):
        assert option in help_text
