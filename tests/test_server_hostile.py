"""Hostile and careless clients against the real server on 127.0.0.1 (issue 16): bodies past
the byte limit whatever the transfer encoding, text that cannot fit the context, requests
asking for more sequences than the queue holds, browser-origin requests (text/plain POSTs,
foreign Host headers), slow and vanishing clients, and a model closed under running requests.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest

import ondevice
from ondevice.errors import RequestError
from ondevice.server import ServerThread, create_app
from ondevice.server.app import MAX_BODY_BYTES

MODEL = "tiny"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, model_name=MODEL, max_queue=8, body_timeout=1.0,
                     allowed_hosts=["box.example"])
    with ServerThread(app, keep_alive_timeout=0.5, header_timeout=1.0) as srv:
        yield srv


def _raw(port: int, data: bytes, *, read_timeout: float = 20.0) -> bytes:
    """Send ``data`` on a fresh connection and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _error(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


# --------------------------------------------------------------------------------------------
# Bodies and prompts bounded by bytes and the context


def test_chunked_40mib_body_is_rejected_early_with_bounded_memory(server):
    """Issue 16 (3): Content-Length is not the only way to send a big body."""
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    piece = b"x" * (1 << 20)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'c\r\n{"prompt": "\r\n')
    sent = 0
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # Read while sending: the answer comes before the body is over.
        reader = threading.Thread(target=lambda: received.append(_read_all(sock)))
        reader.start()
        try:
            sock.sendall(head)
            for _ in range(40):
                sock.sendall(chunk)
                sent += len(piece)
                if received:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed: what we want
        reader.join(30)
    response = received[0]
    assert _status(response) == 413, response[:200]
    assert _error(response)["code"] == "request_too_large"
    assert sent < 40 << 20  # refused before the whole body was sent
    # The server kept at most the limit (plus buffers), not 40 MiB and its tokens.
    assert proc.memory_info().rss - rss_before < 3 * MAX_BODY_BYTES
    assert httpx.get(server.url + "/health").status_code == 200


def test_declared_oversize_body_is_413_before_reading(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
    response = _raw(server.port, head + b"{")
    assert _status(response) == 413


def test_text_that_cannot_fit_is_refused_without_tokenizing(model, server, monkeypatch):
    """Issue 16 (3): tokenizing is bounded by the context, not by the body."""
    calls = []
    encode = model.encode_prompt
    monkeypatch.setattr(model, "encode_prompt", lambda p: calls.append(1) or encode(p))
    big = "hello world " * (1 << 20)  # 12 MiB: far past what 1024 tokens can hold
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           timeout=60)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}])
    assert exc.value.body["code"] == "context_length_exceeded"
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=["Hi", big], max_tokens=2)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert exc.value.body["param"] == "prompt"
    assert calls == []  # refused before the tokenizer saw it
    assert time.monotonic() - start < 20


# --------------------------------------------------------------------------------------------
# Admission: one request may not take more than the queue


def test_prompts_times_n_past_the_queue_is_refused(server):
    """Issue 16 (8): 64 prompts x n = 16 is 1,024 sequences against max_queue 8."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=[f"p{i}" for i in range(64)], n=16,
                                  max_tokens=2)
    err = exc.value.body
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == "too_many_sequences"
    assert "1024" in err["message"] and "max_queue 8" in err["message"]
    state = server.app.state.ondevice
    assert state.seqs_in_flight == 0
    # Within the limit it is served.
    r = client.completions.create(model=MODEL, prompt=["a", "b"], n=3, max_tokens=2)
    assert len(r.choices) == 6


# --------------------------------------------------------------------------------------------
# Browsers: content types, Host, CORS


def test_text_plain_cross_origin_post_is_refused(server):
    """Issue 16 (10): a CORS "simple request" a web page can send without a preflight."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 2})
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = {"Origin": "http://evil.example"}
        if content_type:
            headers["Content-Type"] = content_type
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert not any(k.lower().startswith("access-control-") for k in r.headers)
    ok = httpx.post(server.url + "/v1/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8",
                             "Origin": "http://evil.example"})
    assert ok.status_code == 200
    assert not any(k.lower().startswith("access-control-") for k in ok.headers)
    preflight = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert not any(k.lower().startswith("access-control-") for k in preflight.headers)


def test_foreign_host_is_refused(server):
    """Issue 16 (10): DNS rebinding sends the attacker's name in Host."""
    body = {"prompt": "Hi", "max_tokens": 2}
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
        r = httpx.post(server.url + "/v1/completions", json=body, headers={"Host": host})
        assert r.status_code == 403, (host, r.text)
        assert r.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 403
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 "box.example", f"BOX.example:{port}"):
        r = httpx.post(server.url + "/v1/completions", json=body, headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


# --------------------------------------------------------------------------------------------
# Slow and vanishing clients


def test_slow_body_times_out(server):
    """Issue 16 (11): a client that never finishes its body is cut off (body_timeout 1 s)."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    start = time.monotonic()
    response = _raw(server.port, head)
    assert _status(response) == 408 and _error(response)["code"] == "request_timeout"
    assert time.monotonic() - start < 10


def test_idle_keep_alive_connection_is_closed(server):
    """uvicorn's keep-alive timeout (0.5 s here) closes an idle connection."""
    request = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        start = time.monotonic()
        data = _read_all(sock)  # returns once the server has closed the connection
        waited = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 200")
    assert waited < 5  # closed by the server, long before our 10 s socket timeout


def test_slow_request_head_is_cut_off(server):
    """Slowloris: a request head that never completes (header_timeout 1 s here), and a
    connection that sends nothing at all."""
    for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: 127", b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            if partial:
                sock.sendall(partial)
            start = time.monotonic()
            data = _read_all(sock)
            waited = time.monotonic() - start
        assert data == b"" and waited < 5, (partial, waited)


def test_long_request_outlives_the_head_timeout(model, server, monkeypatch):
    """The head timeout does not touch a request whose head has arrived."""
    forward = model.runtime.backend.forward

    def slow_forward(batch):
        time.sleep(0.004)  # 400 steps: well past header_timeout (1 s)
        return forward(batch)

    monkeypatch.setattr(model.runtime.backend, "forward", slow_forward)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    start = time.monotonic()
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=400, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert time.monotonic() - start > 1.5
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 400


def test_client_hanging_up_mid_body_logs_one_line(server, caplog):
    """Issue 16 (11): ClientDisconnect is a log line, not a traceback."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="ondevice")
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"Hi")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while "client disconnected" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [r for r in caplog.records if "client disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text


# --------------------------------------------------------------------------------------------
# Model.close() under running requests


def test_close_while_requests_run_ends_them_with_an_error(tiny_model_dir):
    """Issue 16 (11): no silently truncated replies when the model is closed."""
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    errors: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        try:
            for _ in m.stream("Once upon a time", max_tokens=1000, temperature=0,
                              ignore_eos=True):
                started.set()
        except RequestError as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(30)
    m.close()
    for t in threads:
        t.join(30)
    assert len(errors) == 3
    assert all(e.code == "model_closed" and "closed" in str(e) for e in errors)
    with pytest.raises(RequestError, match="closed"):
        m.generate("Hi", max_tokens=2)


def test_close_under_the_server_ends_streams_with_an_error_event(tiny_model_dir):
    """A model closed while the server streams from it: the stream ends with an error event
    (503, server_shutting_down), not a cut reply that looks finished; new requests get 503."""
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    forward = m.runtime.backend.forward

    def slow_forward(batch):
        time.sleep(0.01)  # a long reply takes seconds: time to close under it
        return forward(batch)

    m.runtime.backend.forward = slow_forward
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with ServerThread(create_app(m, model_name=MODEL)) as srv, httpx.Client(timeout=30) as http:
        with http.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            m.close()
            data = [line for line in lines if line.startswith("data: ")]
        err = json.loads(data[-1][6:])["error"]
        assert err["code"] == "server_shutting_down"
        assert "data: [DONE]" not in data
        late = http.post(srv.url + "/v1/completions", json={**body, "stream": False})
        assert late.status_code == 503
