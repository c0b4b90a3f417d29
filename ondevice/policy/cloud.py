"""The cloud side: an endpoint's configuration and a streaming client for any OpenAI-compatible
``/v1/chat/completions`` (and ``/v1/completions`` for raw text).

The API key lives in a :class:`Secret`, whose ``repr``/``str`` are ``***``; it is read from an
environment variable (``CLOUD_API_KEY`` in :mod:`ondevice.settings` unless the config names
another) or the
config file, and it only ever leaves this module as an ``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import CloudError, PolicyConfigError
from ..settings import CLOUD_KEY_VARIABLE, cloud_settings, env_any, home_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_KEY_ENV = CLOUD_KEY_VARIABLE


# Longest error detail from an endpoint kept in a CloudError message (after scrubbing).
MAX_DETAIL = 200
# Most of an error body read for that detail: a hostile endpoint may send gigabytes.
MAX_ERROR_BODY = 64 << 10
# A bearer token in any text the endpoint sends back (its reason phrase, its body).
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
# Keys of every client made in this process; log records of httpx/httpcore are scrubbed of
# them (httpx logs each response's reason phrase at INFO, httpcore response headers at DEBUG).
_KEYS: set[str] = set()
_KEYS_LOCK = threading.Lock()
HTTP_LOGGERS = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11",
                "httpcore.http2", "httpcore.proxy", "httpcore.socks")


def scrub(text: str, keys: tuple[str, ...] = ()) -> str:
    """``text`` without any registered API key (or ``keys``) and without bearer tokens.
    Scrub *before* truncating, so that a key cut in half cannot survive."""
    with _KEYS_LOCK:
        secrets = sorted({*keys, *_KEYS}, key=len, reverse=True)  # longest first: no partials
    for key in secrets:
        if key:
            text = text.replace(key, "***")
    return _BEARER.sub(r"\1***", text)


def _truncate(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ScrubLogFilter(logging.Filter):
    """Rewrites an httpx/httpcore log record whose text holds a key (a filter on a logger
    sees only that logger's own records, hence one per logger name in HTTP_LOGGERS)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a record that cannot format is not ours to fix)
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_LOG_FILTER = _ScrubLogFilter()


def _register_key(key: str) -> None:
    with _KEYS_LOCK:
        _KEYS.add(key)
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


class Secret:
    """A string that does not print itself. ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self):  # no pickling into logs or caches
        raise TypeError("a Secret cannot be pickled")

    # Immutable: copies (dataclasses.asdict, copy.deepcopy of a config) share it.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self


@dataclass(frozen=True)
class CloudEstimate:
    """The cloud endpoint for one request, from its configuration."""

    endpoint: str
    ttft_s: float
    decode_tps: float
    total_s: float
    cost_usd: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CloudConfig:
    """One OpenAI-compatible endpoint: where it is, which model, what it costs, how fast.

    ``url`` is the API base (``https://api.example.com/v1``; a base without ``/v1`` gets it).
    ``ttft_seconds`` and ``tokens_per_second`` are the provider's typical figures (for the
    estimates); prices are US dollars per million tokens.
    """

    url: str
    model: str | None = None  # None: the request names no model (our server then serves its own)
    api_key: Secret | None = field(default=None, repr=False)
    api_key_env: str = DEFAULT_KEY_ENV
    timeout: float = 60.0  # seconds without data before a stream counts as dead
    connect_timeout: float = 3.0
    retries: int = 1
    ttft_seconds: float = 0.6
    tokens_per_second: float = 60.0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def has_key(self) -> bool:
        return self.api_key is not None

    def estimate(self, prompt_tokens: int, max_new_tokens: int) -> CloudEstimate:
        """Latency and price of one request from the configured figures."""
        total = self.ttft_seconds + max(max_new_tokens - 1, 0) / self.tokens_per_second
        cost = (prompt_tokens * self.price_input_per_mtok
                + max_new_tokens * self.price_output_per_mtok) / 1e6
        return CloudEstimate(self.base_url, self.ttft_seconds, self.tokens_per_second, total, cost)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view; the key shows only as whether one is set."""
        return {"url": self.base_url, "model": self.model, "api_key": "set" if self.has_key
                else "not set", "api_key_env": self.api_key_env, "timeout": self.timeout,
                "connect_timeout": self.connect_timeout, "retries": self.retries,
                "ttft_seconds": self.ttft_seconds, "tokens_per_second": self.tokens_per_second,
                "price_input_per_mtok": self.price_input_per_mtok,
                "price_output_per_mtok": self.price_output_per_mtok}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "cloud config") -> CloudConfig:
        if not data.get("url"):
            raise PolicyConfigError(f"{source}: 'url' is missing")
        known = {f for f in cls.__dataclass_fields__ if f != "api_key"}
        unknown = sorted(set(data) - known - {"api_key"})
        if unknown:
            raise PolicyConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        key_env = str(data.get("api_key_env", DEFAULT_KEY_ENV))
        key = env_any(key_env) or data.get("api_key")
        return cls(**kwargs, api_key=Secret(str(key)) if key else None)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, url: str | None = None
             ) -> CloudConfig | None:
        """The cloud configuration: ``path``, else the environment's (``cloud_settings()``),
        else ``cloud.toml`` in the ondevice home; ``url`` (or the environment's) overrides
        the file's URL. None when no cloud is configured."""
        from_env = cloud_settings()
        data: dict[str, Any] = {}
        p = Path(path) if path else Path(from_env["config"]) if from_env["config"] \
            else home_dir() / "cloud.toml"
        if path and not p.is_file():
            raise PolicyConfigError(f"cloud config {p} not found")
        if p.is_file():
            try:
                text = p.read_text()
                data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
            except (ValueError, tomllib.TOMLDecodeError, RecursionError) as err:
                # The parser's message may quote the offending line, which may hold the key.
                raise PolicyConfigError(f"cloud config {p}: cannot parse it "
                                        f"({type(err).__name__})") from None
            except OSError as err:
                raise PolicyConfigError(f"cloud config {p}: cannot read it "
                                        f"({err.strerror})") from None
            if not isinstance(data, dict):
                raise PolicyConfigError(f"cloud config {p}: not a table of settings")
            data = data.get("cloud", data)
            if not isinstance(data, dict):
                raise PolicyConfigError(f"cloud config {p}: [cloud] is not a table")
        url = url or from_env["url"]
        if url:
            data = dict(data, url=url)
        if from_env["model"] and data:
            data = dict(data, model=from_env["model"])
        if not data:
            return None
        return cls.from_dict(data, source=f"cloud config {p}")

    def with_url(self, url: str) -> CloudConfig:
        return replace(self, url=url)


def reachable(config: CloudConfig, timeout: float | None = None) -> bool:
    """Whether the endpoint's host accepts a TCP connection (the policy's "online" fact)."""
    parts = urlsplit(config.base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port),
                                      timeout=timeout or config.connect_timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class CloudChunk:
    """One streamed piece of a cloud reply."""

    text: str
    finish_reason: str | None = None
    index: int = 0


class CloudClient:
    """Streams completions from a :class:`CloudConfig`'s endpoint with httpx.

    Connection failures, timeouts, 429 and 5xx answers are retried ``config.retries`` times
    (once by default) as long as nothing has been streamed yet; then :class:`CloudError`.
    """

    def __init__(self, config: CloudConfig, transport=None):
        import httpx

        self.config = config
        if config.api_key is not None:
            _register_key(config.api_key.reveal())
        timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"CloudClient({self.config.base_url!r}, model={self.config.model!r})"

    def close(self) -> None:
        self._http.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.config.api_key is not None:
            headers["Authorization"] = f"Bearer {self.config.api_key.reveal()}"
        return headers

    def _scrub(self, text: str) -> str:
        key = self.config.api_key.reveal() if self.config.api_key else None
        return scrub(str(text), (key,) if key else ())

    def _detail(self, text: object) -> str:
        """Text from the endpoint made fit for a message: scrubbed, then one line and cut."""
        return _truncate(" ".join(self._scrub(str(text)).split()))

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[CloudChunk]:
        """Stream a chat completion of ``messages``. ``params``: OpenAI request fields
        (max_tokens, temperature, top_p, seed, stop, n)."""
        body = {"messages": messages, "stream": True, **params}
        yield from self._stream("/chat/completions", self._with_model(body), chat=True)

    def stream_completion(self, prompt: str, **params: Any) -> Iterator[CloudChunk]:
        """Stream a plain text completion of ``prompt`` (``/v1/completions``)."""
        body = {"prompt": prompt, "stream": True, **params}
        yield from self._stream("/completions", self._with_model(body), chat=False)

    def _with_model(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.config.model, **body} if self.config.model else body

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[CloudChunk]:
        import httpx

        url = self.config.base_url + path
        attempts = 1 + max(self.config.retries, 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = False
            try:
                with self._http.stream("POST", url, json=body, headers=self._headers()) as resp:
                    if resp.status_code != 200:
                        detail = self._error_detail(resp)
                        if (resp.status_code == 429 or resp.status_code >= 500) and not last:
                            continue
                        if resp.status_code in (401, 403):
                            detail += (" (check the API key: $" + self.config.api_key_env
                                       + " or the cloud config)" if self.config.has_key
                                       else " (no API key set: $" + self.config.api_key_env + ")")
                        raise CloudError(f"cloud endpoint {self.config.base_url} answered "
                                         f"{resp.status_code}: {detail}")
                    for chunk in self._events(resp, chat):
                        started = True
                        yield chunk
                    return
            except httpx.HTTPError as err:
                if started or last:
                    what = "stopped mid-reply" if started else "failed"
                    raise CloudError(f"cloud endpoint {self.config.base_url} {what}: "
                                     f"{self._detail(_describe(err))}") from None
                continue

    def _error_detail(self, resp) -> str:
        msg: object = ""
        try:
            body = b""
            for part in resp.iter_bytes():
                body += part
                if len(body) >= MAX_ERROR_BODY:
                    break
            error = json.loads(body[:MAX_ERROR_BODY]).get("error", {})
            msg = error.get("message", "") if isinstance(error, dict) else error
        except Exception:  # noqa: BLE001  (any body: only a hint for the message)
            msg = ""
        # The reason phrase is the endpoint's text too (`HTTP/1.1 401 Bearer sk-...`).
        return self._detail(msg) or self._detail(resp.reason_phrase)

    def _events(self, resp, chat: bool) -> Iterator[CloudChunk]:
        done = False
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except (ValueError, RecursionError):
                event = None
            if not isinstance(event, dict):
                raise CloudError(f"cloud endpoint {self.config.base_url} sent a malformed "
                                 "event") from None
            if "error" in event:
                error = event["error"]
                msg = error.get("message", "error") if isinstance(error, dict) else error
                raise CloudError(f"cloud endpoint {self.config.base_url} stopped mid-reply: "
                                 f"{self._detail(msg)}")
            try:
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if chat else choice.get("text")
                    if text or choice.get("finish_reason"):
                        yield CloudChunk(str(text or ""), choice.get("finish_reason"),
                                         int(choice.get("index", 0)))
            except (AttributeError, TypeError, ValueError):
                raise CloudError(f"cloud endpoint {self.config.base_url} sent a malformed "
                                 "event") from None
        if not done:
            raise CloudError(f"cloud endpoint {self.config.base_url} stopped mid-reply: the "
                             "stream ended without [DONE]")


def _describe(err: Exception) -> str:
    # httpx messages name the URL, never the headers; keep the class for a timeout's sake.
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text
