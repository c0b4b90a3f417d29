"""The routed model end to end, with OUR OpenAI-compatible server on 127.0.0.1 as the cloud.

A counting TCP proxy sits in front of the server: it counts every connection accepted, so
"zero connections" is asserted on the server's side of the wire, reachability probes included.
The tiny random model plays both sides (the cloud serves it, the device runs it locally).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from click.testing import CliRunner

import ondevice
from ondevice.chat import ChatSession
from ondevice.errors import CloudError, PolicyError
from ondevice.policy import CloudClient, CloudConfig, DeviceProfile, Policy, Secret
from ondevice.sampling import SamplingParams
from ondevice.server import ServerThread, create_app

SENTINEL = "sk-test-SENTINEL-9d0e8c1f55"
MSGS = [{"role": "user", "content": "Hello world! The capital of France"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


class CountingProxy:
    """A TCP forwarder on 127.0.0.1 that counts accepted connections and can cut them all."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        # shutdown() first: close() alone would leave a thread blocked in accept() listening.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for s in self._open:
                s.close()


def _counting_app(app, counter: dict):
    """The server app, counting the HTTP requests it receives (the server-side count)."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            counter["requests"] = counter.get("requests", 0) + 1
        await app(scope, receive, send)

    wrapped.state = app.state  # ServerThread drains through the app's state
    return wrapped


@pytest.fixture(scope="module")
def profile():
    # This machine, without the bandwidth benchmark (speed figures play no part here).
    return DeviceProfile.detect(measure_bandwidth=False)


@pytest.fixture(scope="module")
def cloud_model(tiny_model_dir):
    """The cloud's model. Each engine step takes 20 ms longer, so a long reply is still
    streaming when a test kills the server."""
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    forward = m.runtime.backend.forward

    def slow_forward(batch):
        time.sleep(0.02)
        return forward(batch)

    m.runtime.backend.forward = slow_forward
    yield m
    m.close()


@pytest.fixture
def cloud(cloud_model):
    """Server (requiring the sentinel API key) + counting proxy; yields (proxy, counter)."""
    counter: dict = {}
    app = _counting_app(create_app(cloud_model, model_name="tiny", api_key=SENTINEL), counter)
    srv = ServerThread(app, drain_timeout=0.2).start()
    proxy = CountingProxy(srv.port)
    yield proxy, counter, srv
    proxy.close()
    srv.stop()


def _routed(tiny_model_dir, profile, url, mode="prefer_local", **kw):
    config = CloudConfig(url, model="tiny", api_key=Secret(SENTINEL), timeout=10,
                         connect_timeout=2)
    return ondevice.load(tiny_model_dir, "numpy", kv_memory="1MiB", quiet=True,
                         policy=Policy(mode=mode, cloud=config, profile=profile, **kw))


def test_routed_request_streams_from_the_cloud(tiny_model_dir, profile, cloud):
    proxy, counter, _ = cloud
    m = _routed(tiny_model_dir, profile, proxy.url, mode="prefer_cloud")
    try:
        chunks = list(m.stream(MSGS, GREEDY))
        assert m.last_route.where == f"cloud:{proxy.url}/v1" and m.last_route.fallback_from is None
        assert len([c for c in chunks if c.text]) > 1  # streamed, not one block
        assert counter["requests"] >= 1 and proxy.connections >= 1
        cloud_text = "".join(c.text for c in chunks)
        # The same greedy reply, computed on the device: the stream carried it intact.
        local = m.generate(MSGS, GREEDY, mode="only_local")
        assert m.last_route.where == "local:numpy"
        assert cloud_text == local
        assert m.stats()["replies_by_place"] == {f"cloud:{proxy.url}/v1": 1, "local:numpy": 1}
    finally:
        m.close()


def test_killing_the_cloud_mid_reply_continues_locally(tiny_model_dir, profile, cloud):
    proxy, counter, srv = cloud
    m = _routed(tiny_model_dir, profile, proxy.url, mode="prefer_cloud")
    params = SamplingParams(max_tokens=300, temperature=0.0)
    try:
        texts, killer = [], None
        for chunk in m.stream(MSGS, params):
            texts.append(chunk.text)
            if len(texts) == 5 and killer is None:  # mid-reply: stop the server, cut the wire
                killer = threading.Thread(target=lambda: (srv.stop(), proxy.close()))
                killer.start()
        killer.join()
        route = m.last_route
        assert route.fallback_from == f"cloud:{proxy.url}/v1", route
        assert route.where == "local:numpy" and "mid-reply" in route.error
        assert m.stats()["replies_by_place"] == {"local:numpy (fallback)": 1}
        # The local engine continued the reply: more tokens than the cloud had sent.
        assert m.timings.generated_tokens > 0
        assert sum(bool(t) for t in texts) > 5
    finally:
        m.close()


def test_private_request_makes_zero_connections_even_when_local_fails(tiny_model_dir, profile,
                                                                      cloud):
    proxy, counter, _ = cloud
    m = _routed(tiny_model_dir, profile, proxy.url, fallback=True)
    try:
        local = m.load_local()

        def out_of_memory(batch):
            raise MemoryError("simulated: the device ran out of memory")

        local.runtime.backend.forward = out_of_memory
        before = (proxy.connections, counter.get("requests", 0))
        # Private, the local backend fails: a clear error, and nothing reaches the cloud.
        with pytest.raises(PolicyError, match="private or only_local"):
            m.generate(MSGS, GREEDY, private=True)
        # Private and too long for the local KV pool (1 MiB: 2048 tokens): refused up front.
        long_prompt = [5] * 3000
        with pytest.raises(PolicyError, match="private"):
            m.generate(long_prompt, GREEDY, private=True)
        # Private in prefer_cloud and only_cloud modes: never the cloud either.
        with pytest.raises(PolicyError):
            m.generate(MSGS, GREEDY, private=True, mode="prefer_cloud")
        with pytest.raises(PolicyError, match="private"):
            m.generate(MSGS, GREEDY, private=True, mode="only_cloud")
        assert (proxy.connections, counter.get("requests", 0)) == before == (0, 0)
        # Control: the same failing request, not private, falls back to the cloud.
        reply = m.generate(MSGS, GREEDY)
        assert reply and m.last_route.fallback_from == "local:numpy"
        assert m.last_route.where.startswith("cloud:") and "MemoryError" in m.last_route.error
        assert proxy.connections > 0 and counter["requests"] == 1
    finally:
        m.close()


def test_too_long_for_the_device_goes_to_the_cloud(tiny_model_dir, profile, cloud):
    proxy, counter, _ = cloud
    m = _routed(tiny_model_dir, profile, proxy.url)
    try:
        m.load_local()  # the local KV pool holds 1 MiB / 512 B per token = 2048 tokens...
        # ...but the model's context is 1024: a 1100-token prompt cannot run locally. The
        # server's context is 1024 too, so it answers 400: a CloudError, not a local failure.
        with pytest.raises(CloudError, match="400"):
            m.generate([5] * 1100, GREEDY)
        assert counter["requests"] == 1
        assert "context of 1024" in " ".join(m.last_route.decision.reasons)
    finally:
        m.close()


@pytest.fixture
def offline(monkeypatch):
    """No socket may connect anywhere, loopback included."""
    def refuse(self, *args, **kwargs):
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: 101)


def test_offline_everything_local_still_works(tiny_model_dir, profile, offline):
    m = _routed(tiny_model_dir, profile, "http://127.0.0.1:9", mode="prefer_cloud")
    try:
        reply = m.generate(MSGS, GREEDY)
        assert reply and m.last_route.where == "local:numpy"
        assert any("offline" in r for r in m.last_route.decision.reasons)
        assert m.generate(MSGS, GREEDY, mode="prefer_local") == reply
        with pytest.raises(PolicyError, match="offline"):
            m.generate(MSGS, GREEDY, mode="only_cloud")
        # A chat session through the routed model, and /stats naming where it ran.
        session = ChatSession(m, GREEDY)
        assert "".join(c.text for c in session.send("Hello world!"))
        assert session.stats()["last_reply_ran_on"] == "local:numpy"
    finally:
        m.close()
    # The plain local API needs no network either.
    plain = ondevice.load(tiny_model_dir, "numpy", kv_memory="1MiB", quiet=True)
    try:
        assert plain.generate(MSGS, GREEDY) == reply
    finally:
        plain.close()


def test_chat_stats_say_where_each_reply_ran(tiny_model_dir, profile, cloud):
    proxy, _, _ = cloud
    m = _routed(tiny_model_dir, profile, proxy.url, mode="prefer_cloud")
    try:
        session = ChatSession(m, GREEDY, system="Be brief.")
        "".join(c.text for c in session.send("Hello world!"))
        stats = session.stats()
        assert stats["last_reply_ran_on"] == f"cloud:{proxy.url}/v1"
        assert stats["last_generated_tokens"] > 0
        "".join(c.text for c in session.send("Once upon a time"))
        assert session.messages[-1]["role"] == "assistant" and len(session.messages) == 4
    finally:
        m.close()


def test_api_key_never_in_logs_errors_or_reprs(tiny_model_dir, profile, cloud, caplog, capfd,
                                               monkeypatch):
    proxy, counter, _ = cloud
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at DEBUG
    m = _routed(tiny_model_dir, profile, proxy.url, mode="only_cloud")
    seen: list[str] = []
    try:
        assert m.generate(MSGS, GREEDY)  # the server requires the key: it was sent
        seen += [repr(m), str(m.stats()), repr(m.last_route), repr(m.policy), m.backend]
    finally:
        m.close()
    # A wrong key: the 401 error names the endpoint and the status, never the key.
    wrong = CloudConfig(proxy.url, model="tiny", api_key=Secret(SENTINEL + "-wrong"))
    client = CloudClient(wrong)
    with pytest.raises(CloudError, match="401") as err:
        list(client.stream_chat(MSGS, max_tokens=4))
    seen += [str(err.value), repr(err.value), repr(client), repr(wrong)]
    # An endpoint that is down: connection refused, retried once, then a clear error.
    down = CloudClient(CloudConfig("http://127.0.0.1:9", api_key=Secret(SENTINEL),
                                   connect_timeout=1))
    with pytest.raises(CloudError, match="127.0.0.1:9") as err:
        list(down.stream_chat(MSGS, max_tokens=4))
    seen += [str(err.value)]
    # The CLI's JSON with the key in the environment.
    monkeypatch.setenv("ONDEVICE_CLOUD_API_KEY", SENTINEL)
    from ondevice.apps.cli import cli

    r = CliRunner().invoke(cli, ["policy", "explain", "--model", "135m-q4", "--profile", "m1",
                                 "--cloud-url", proxy.url, "--json", "--probe"])
    assert r.exit_code == 0 and '"api_key": "set"' in r.output
    seen.append(r.output)
    out, errout = capfd.readouterr()
    seen += [caplog.text, out, errout]
    assert caplog.records  # the check below looked at real log output
    for text in seen:
        assert SENTINEL not in text


def _sse_app(plan: list[int], counter: dict):
    """A minimal OpenAI-style endpoint answering each request with the next status in
    ``plan`` (200: a two-chunk stream)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        n = counter["requests"] = counter.get("requests", 0) + 1
        status = plan[min(n, len(plan)) - 1]
        headers = [(b"content-type", b"text/event-stream" if status == 200 else
                    b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if status != 200:
            body = b'{"error": {"message": "try again later"}}'
        else:
            body = (b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'
                    b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}, '
                    b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("plan,retries,expect,requests", [
    ([503, 200], 1, "Hello", 2),  # one retry after a 503
    ([503, 200], 0, "503", 1),  # no retries configured: the error
    ([503, 503, 200], 1, "503", 2),  # only one retry
    ([401, 200], 1, "401", 1),  # a client error is not retried
])
def test_cloud_client_retries_once(plan, retries, expect, requests):
    counter: dict = {}
    with ServerThread(_sse_app(plan, counter)) as srv:
        client = CloudClient(CloudConfig(srv.url, retries=retries))
        if expect == "Hello":
            chunks = list(client.stream_chat(MSGS, max_tokens=4))
            assert "".join(c.text for c in chunks) == "Hello"
            assert chunks[-1].finish_reason == "stop"
        else:
            with pytest.raises(CloudError, match=expect):
                list(client.stream_chat(MSGS, max_tokens=4))
        client.close()
    assert counter["requests"] == requests


def test_cli_chat_with_a_cloud_policy(tiny_model_dir, cloud, monkeypatch):
    proxy, counter, _ = cloud
    monkeypatch.setenv("ONDEVICE_CLOUD_API_KEY", SENTINEL)
    from ondevice.apps.cli import cli

    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_model_dir), "-b", "numpy",
                                 "--kv-memory", "1MiB", "--policy", "cloud", "--cloud-url",
                                 proxy.url, "--temperature", "0", "-n", "8"],
                           input="Hello world!\n")
    assert r.exit_code == 0, r.output
    assert r.output.strip() and counter["requests"] == 1
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_model_dir), "-b", "numpy",
                                 "--kv-memory", "1MiB", "--policy", "local", "--cloud-url",
                                 proxy.url, "--temperature", "0", "-n", "8"],
                           input="Hello world!\n")
    assert r.exit_code == 0, r.output
    assert counter["requests"] == 1  # local: the cloud saw nothing new


def test_repl_stats_say_where_each_reply_ran(tiny_model_dir, cloud, monkeypatch, tmp_path):
    from test_repl import _chat, _quit, _send

    def ran_on(term) -> str:
        term.write(b"/stats\r")
        out = term.expect(rb"ran on +\S+")
        term.expect(rb"\r?\n>>>")
        return out.split()[-1].decode()

    proxy, counter, srv = cloud
    monkeypatch.setenv("ONDEVICE_CLOUD_API_KEY", SENTINEL)  # the child inherits it
    args = ("--kv-memory", "1MiB", "--policy", "cloud", "--cloud-url", proxy.url)
    with _chat(tiny_model_dir, tmp_path / "home", *args) as (pid, term):
        _send(term, b"Hello\r")
        assert ran_on(term) == f"cloud:{proxy.url}/v1"
        assert counter["requests"] == 1
        srv.stop()
        proxy.close()  # offline now: the next reply runs on the device
        out = _send(term, b"Hello again\r")
        assert ran_on(term) == "local:numpy"
        assert SENTINEL.encode() not in term.buffer + out
        _quit(pid, term)


def test_a_local_engine_that_cannot_start_falls_back_to_the_cloud(tiny_model_dir, profile,
                                                                  cloud):
    proxy, counter, _ = cloud
    config = CloudConfig(proxy.url, model="tiny", api_key=Secret(SENTINEL))
    # 100 bytes of KV memory is less than one block: the local engine fails to start.
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory=100, quiet=True,
                      policy=Policy(cloud=config, profile=profile))
    try:
        assert m.generate(MSGS, GREEDY)
        assert m.last_route.fallback_from == "local:numpy" and "KV memory" in m.last_route.error
        # Later decisions know the backend cannot run: a private request is refused without
        # touching the network...
        seen = proxy.connections
        with pytest.raises(PolicyError, match="private"):
            m.generate(MSGS, GREEDY, private=True)
        assert proxy.connections == seen
        # ...and the others go straight to the cloud, with no fallback to try.
        assert m.generate(MSGS, GREEDY)
        assert m.last_route.fallback_from is None and m.last_route.where.startswith("cloud:")
        assert "no local backend" in m.last_route.decision.reasons[0]
        assert counter["requests"] == 2
    finally:
        m.close()
