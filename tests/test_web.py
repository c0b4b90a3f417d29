"""The server as web pages use it: the chat page at "/", CORS (none unless configured),
llama-server's /tokenize and /detokenize, OpenAI's parameter ranges; and the page driven in a
real headless Chromium (Selenium) against `ondevice serve` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

import ondevice
from ondevice.server import ServerThread, create_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hello"}]
ALLOWED = "http://app.example:5173"


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
def cors_server(model):
    with ServerThread(create_app(model, model_name=MODEL, cors_origins=[ALLOWED])) as srv:
        yield srv


def _error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "\n" not in err["message"]
    return err


# --------------------------------------------------------------------------------------------
# The page


def test_chat_page_and_its_files_are_served_from_the_package(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        assert f"/static/{name}" in page.text
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        # No CDN, no external resource of any kind.
        assert "http://" not in r.text and "https://" not in r.text
    assert "http://" not in page.text and "https://" not in page.text
    for bad in ("nope.js", "..%2Fapp.py", "%2E%2E%2F__init__.py"):
        assert httpx.get(f"{server.url}/static/{bad}").status_code == 404


# --------------------------------------------------------------------------------------------
# CORS


def _preflight(url: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_no_cors_headers_unless_configured(server):
    r = _preflight(server.url, ALLOWED)
    assert r.status_code == 405
    assert not any(k.startswith("access-control-") for k in r.headers)
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Origin": ALLOWED},
                   json={"messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


def test_cors_preflight_from_an_allowed_origin(cors_server):
    r = _preflight(cors_server.url, ALLOWED)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "Origin" in r.headers["vary"] and int(r.headers["access-control-max-age"]) > 0
    # The real requests then carry the header too, errors included.
    r = httpx.post(cors_server.url + "/v1/chat/completions", headers={"Origin": ALLOWED},
                   json={"messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.post(cors_server.url + "/v1/chat/completions", headers={"Origin": ALLOWED},
                   json={"messages": CHAT, "temperature": 9})
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.get(cors_server.url + "/v1/models", headers={"Origin": ALLOWED.upper()})
    assert r.headers["access-control-allow-origin"] == ALLOWED.upper()


def test_cors_preflight_from_another_origin_gets_no_headers(cors_server):
    for origin in ("http://evil.example", "http://app.example:8080", "null"):
        r = _preflight(cors_server.url, origin)
        err = _error(r, 403, None)
        assert err["code"] == "cors_not_allowed" and "--cors-origin" in err["message"]
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(cors_server.url + "/v1/chat/completions", headers={"Origin": origin},
                       json={"messages": CHAT, "max_tokens": 1})
        assert "access-control-allow-origin" not in r.headers
    r = _preflight(cors_server.url, ALLOWED, method="DELETE")
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # A "simple" cross-origin POST (text/plain) is still refused before any work.
    r = httpx.post(cors_server.url + "/v1/chat/completions", headers={
        "Origin": ALLOWED, "Content-Type": "text/plain"}, content=json.dumps({"messages": CHAT}))
    assert r.status_code == 415


def test_cors_any_origin(model):
    with ServerThread(create_app(model, cors_origins=["*"])) as srv:
        r = _preflight(srv.url, "http://anything.example")
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "http://anything.example"


@pytest.mark.parametrize("origin", ["app.example", "http://app.example/path", "ftp://x.example",
                                    "http://"])
def test_bad_cors_origin_is_refused_at_start(model, origin):
    with pytest.raises(ValueError, match="scheme://host"):
        create_app(model, cors_origins=[origin])
    from ondevice.apps.cli import cli

    r = CliRunner().invoke(cli, ["serve", "--cors-origin", origin])
    assert r.exit_code == 1 and "--cors-origin" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_serve_passes_cors_origins(monkeypatch):
    import ondevice.server
    from ondevice.apps.cli import cli

    seen = {}
    monkeypatch.setattr(ondevice.server, "serve", lambda model, **kw: seen.update(kw))
    r = CliRunner().invoke(cli, ["serve"])
    assert r.exit_code == 0, r.output
    assert tuple(seen["cors_origins"]) == ()  # none by default
    r = CliRunner().invoke(cli, ["serve", "--cors-origin", "http://localhost:5173",
                                 "--cors-origin", "https://app.example"])
    assert r.exit_code == 0, r.output
    assert tuple(seen["cors_origins"]) == ("http://localhost:5173", "https://app.example")


# --------------------------------------------------------------------------------------------
# /tokenize and /detokenize


def test_tokenize_detokenize_round_trip(model, server):
    text = "Hello world, héllo"
    r = httpx.post(server.url + "/tokenize", json={"content": text})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids == model.tokenizer.encode(text)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"content": text}
    pieces = httpx.post(server.url + "/tokenize",
                        json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                      for p in pieces)
    assert joined.decode() == text
    special = httpx.post(server.url + "/tokenize",
                         json={"content": text, "add_special": True}).json()["tokens"]
    assert special == model.tokenizer.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
    ("/tokenize", [1], None),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_tokenize_errors_are_400(server, path, body, param):
    _error(httpx.post(server.url + path, json=body), 400, param)


def test_tokenize_needs_json_and_the_key(model):
    with ServerThread(create_app(model, api_key="k")) as srv:
        assert httpx.post(srv.url + "/tokenize", json={"content": "x"}).status_code == 401
        r = httpx.post(srv.url + "/tokenize", json={"content": "x"},
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        r = httpx.post(srv.url + "/tokenize", content=b'{"content": "x"}',
                       headers={"Authorization": "Bearer k", "Content-Type": "text/plain"})
        assert r.status_code == 415


# --------------------------------------------------------------------------------------------
# OpenAI's ranges


@pytest.mark.parametrize("field,value", [("temperature", 5), ("temperature", 2.01),
                                         ("temperature", -0.5), ("top_p", 1.5),
                                         ("top_p", -0.1), ("presence_penalty", -3),
                                         ("frequency_penalty", 2.5)])
def test_openai_ranges_are_enforced(server, field, value):
    for path, body in (("/v1/chat/completions", {"messages": CHAT}),
                       ("/v1/completions", {"prompt": "Hi"})):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 1, field: value})
        err = _error(r, 400, field)
        assert field in err["message"] and "between" in err["message"]


def test_range_edges_are_accepted(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                       temperature=2, presence_penalty=-2, frequency_penalty=2,
                                       top_p=1)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert exc.value.body["param"] == "temperature"


# --------------------------------------------------------------------------------------------
# The page in a real browser


def _chromium() -> tuple[str, str]:
    """Chromium and its WebDriver: required in CI (a failure), else a skip with the reason."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    why = None
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        why = "selenium is not installed (pip install -e '.[test]')"
    if why is None and not (browser and driver):
        why = ("Chromium or chromedriver is missing (Debian: apt-get install chromium "
               "chromium-driver; `make test` installs them as root)")
    if why:
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(real_model_dir, tmp_path):
    """`ondevice serve` on the real model (numpy: a few tokens per 100 ms on this machine,
    so a long reply is still streaming when Stop is clicked), as a real process."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "ondevice", "serve", "-m", str(real_model_dir),
                             "-b", "numpy", "--port", str(port), "--kv-memory", "64MiB"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("ondevice serve did not start: "
                                     + (tmp_path / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Without these Chromium waits on network connections this machine cannot make.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,800",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.real_model
def test_chat_page_streams_and_stop_aborts_in_chromium(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(served + "/")
    by_id = browser.find_element
    _wait(lambda: by_id(By.ID, "status").text == "ready", 30, "the model list")
    options = [o.text for o in by_id(By.ID, "model").find_elements(By.TAG_NAME, "option")]
    served_ids = [m["id"] for m in httpx.get(served + "/v1/models").json()["data"]]
    assert options == served_ids and options, options  # the picker is /v1/models

    # First message: streamed text appears, the reply finishes, "ran on" is shown.
    by_id(By.ID, "input").send_keys("What is the capital of France? One word.")
    by_id(By.ID, "send").click()
    _wait(lambda: by_id(By.CSS_SELECTOR, ".msg.assistant .text").text.strip(), 60,
          "streamed text")
    meta = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), 120,
                 "the end of the first reply")
    assert "ran on local:numpy" in meta[0].text

    # "New chat" empties the conversation (the page samples, and a first reply that rambles to
    # the context limit would leave no room for a second prompt in this 64 MiB KV pool).
    by_id(By.ID, "clear").click()
    _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg"), 10, "an empty chat")

    # Second message: a long reply, stopped while it streams.
    before = httpx.get(served + "/metrics").json()
    by_id(By.ID, "input").send_keys("Write a very long story about a dragon and a knight, "
                                    "with many chapters.")
    by_id(By.ID, "send").click()
    bubbles = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")  # noqa: E731
    _wait(lambda: len(bubbles()) == 1 and len(bubbles()[0].text.split()) >= 3, 60,
          "the second reply to stream")
    running = httpx.get(served + "/metrics").json()
    assert running["running"] == 1 and running["kv_blocks_used"] > 0
    assert by_id(By.ID, "stop").is_enabled()
    by_id(By.ID, "stop").click()
    _wait(lambda: by_id(By.ID, "status").text == "stopped", 10, "the page to show 'stopped'")
    shown = bubbles()[0].text

    # The server saw the disconnect: the request was aborted and its KV blocks returned.
    def aborted():
        m = httpx.get(served + "/metrics").json()
        return m if (m["running"] == 0 and m["kv_blocks_used"] == 0
                     and m["server"]["requests_in_flight"] == 0) else None

    after = _wait(aborted, 30, "the server to free the aborted request's KV blocks")
    assert after["server"]["requests_disconnected"] == before["server"]["requests_disconnected"] + 1
    assert after["kv_blocks_free"] == after["kv_blocks_total"]
    time.sleep(0.5)
    assert bubbles()[0].text == shown  # nothing streamed after Stop
    assert by_id(By.ID, "send").is_enabled() and not by_id(By.ID, "stop").is_enabled()
    shot = Path(tmp_path) / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    print(f"screenshot: {shot}")
