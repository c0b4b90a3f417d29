"""The OpenAI-compatible HTTP app (Starlette) over a model's shared continuous-batching engine.

Every request goes through the model's one :class:`~ondevice.engine.AsyncEngine`, so
concurrent clients are decoded together in one batch and share KV blocks of common prompt
prefixes, and ``n > 1`` means what it means in the Python API: one engine request per prompt,
forked into n samples with ``SeedSequence(seed, spawn_key=(i,))``. A seeded HTTP request
therefore returns exactly the samples ``ondevice.load(...).generate()`` returns.

A request is checked once: its body and parameters when parsed, its prompt by the engine when
it is submitted (before the response starts, so a bad prompt is a 400, never a broken stream).

Hostile clients: bodies are read with a hard byte limit whatever the transfer encoding, and
within a time limit; text that certainly cannot fit the context is refused before it is
tokenized; one request may not ask for more sequences than the server queues; JSON endpoints
take only JSON content types (a browser's "simple" cross-origin POST is refused), and the
``Host`` header must name this server (DNS rebinding); no CORS headers are sent unless the
server was given origins to allow (``cors_origins``).

Disconnects: while a request runs, a task waits on the ASGI ``receive`` channel; the
``http.disconnect`` it gets when the client goes away cancels the request's work, which aborts
its engine requests (their KV blocks are free before the next engine step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..constraints import ConstraintError
from ..engine import AsyncEngine
from ..engine.frontends import AsyncGeneration
from ..engine.request import RequestOutput
from ..errors import RequestError, SamplingError, TokenizerError
from ..sampling import SamplingParams
from . import protocol as P
from . import tools as T
from .cors import CORSGuard, normalize_origin
from .names import served_names
from .page import page_routes

log = logging.getLogger("ondevice.server")

DEFAULT_MAX_QUEUE = 256
"""Sequences that may wait for a place in the running batch before requests get 429."""

MAX_BODY_BYTES = 16 << 20
"""Largest request body read, chunked or not; past it the request gets 413."""

DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to send its whole request body (slow clients get 408)."""

TOKEN_BYTES_MARGIN = 2
"""Text is refused before tokenizing when it is longer than the context times the longest
token's bytes times this margin (room for normalizers that shrink text)."""

DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
"""``Host`` names always accepted, besides the address the connection came in on."""

_COUNTERS = ("requests_total", "requests_rejected_queue_full", "requests_disconnected",
             "requests_failed")


def _shutting_down() -> P.APIError:
    return P.APIError(503, "the server is shutting down; the request was not completed",
                      type="server_error", code="server_shutting_down")


# --------------------------------------------------------------------------------------------
# Host and content checks


def _host_name(value: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


class HostGuard:
    """ASGI middleware refusing requests whose ``Host`` header names another server.

    A web page can make a browser send requests to 127.0.0.1 under its own domain name (DNS
    rebinding) and then read the replies; such requests carry the attacker's name in ``Host``.
    Accepted: the address the connection came in on, ``localhost``, ``127.0.0.1``, ``::1``
    and the names in ``allowed_hosts`` (``"*"`` accepts any)."""

    def __init__(self, app, allowed_hosts: Iterable[str] = ()):
        self.app = app
        allowed = {_host_name(h) for h in allowed_hosts}
        self.any_host = "*" in allowed
        self.allowed = frozenset(allowed | set(DEFAULT_ALLOWED_HOSTS))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.any_host:
            host = None
            for key, value in scope.get("headers", ()):
                if key == b"host":
                    host = _host_name(value.decode("latin-1"))
                    break
            bound = scope.get("server") or (None, None)
            bound_host = str(bound[0]).lower() if bound[0] else None
            # No Host at all (HTTP/1.0) is not a browser: browsers always send one.
            if host is not None and host not in self.allowed and host != bound_host:
                shown = host if len(host) <= 60 else host[:57] + "..."
                response = _json(P.error_body(
                    f"the Host header {shown!r} does not name this server; start it with "
                    f"--allowed-host {shown} to accept it", "invalid_request_error", None,
                    "host_not_allowed"), 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _check_json_content_type(request: Request) -> None:
    """JSON endpoints take JSON only. Browsers send ``text/plain``, form encodings (and no
    type at all, for a bare Blob) cross-origin without asking first (CORS "simple
    requests"); refusing them keeps any web page from driving the model."""
    value = request.headers.get("content-type", "")
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/")
                                            and media.endswith("+json")):
        shown = media or "none"
        raise P.APIError(415, f"the request body must be JSON (Content-Type: "
                              f"application/json), got {shown[:60]!r}",
                         code="unsupported_media_type")


# --------------------------------------------------------------------------------------------
# The requests of one HTTP request


@dataclass(eq=False)
class _Admitted:
    """One HTTP request's place in the queue: its sequences (prompts x n) and, once the
    engine has them, its generation."""

    seqs: int
    gen: AsyncGeneration | None = None


def _too_large() -> P.APIError:
    # Connection: close, since the rest of the body is left unread on the socket.
    return P.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                      code="request_too_large", headers={"Connection": "close"})


@dataclass(eq=False)
class _Run:
    """The engine side of one admitted HTTP request: its prompts and parameters, and its
    outputs keyed by choice index (prompt-major: prompt i's sample j is choice i * n + j)."""

    entry: _Admitted
    prompts: list[list[int]]
    params: SamplingParams
    tools: T.ToolRequest | None = None  # chat with tools: replies may become tool_calls

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        gen = self.entry.gen
        assert gen is not None
        try:
            async for i, out in gen:
                yield i * self.params.n + out.index, out
        except RequestError as err:
            if err.code == "model_closed":  # the model was closed under the server
                raise _shutting_down() from None
            raise
        finally:
            gen.abort()  # closed early (disconnect): free the blocks now


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    completion_logprobs: P.CompletionLogprobs = field(default_factory=P.CompletionLogprobs)


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


_GONE = object()


async def _unless_disconnected(receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and return ``_GONE``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watch.cancel()
        # Wait for the cancellations, so the engine aborts are queued before we return.
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return _GONE
    return task.result()


class _EventStream:
    """An ASGI response streaming server-sent events. It watches for the client's
    disconnect itself (independently of the ASGI spec version the server speaks) and then
    cancels the stream, which aborts the request's engine work."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close
        self.client_gone = False

    async def _send_all(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
        ]})
        async with contextlib.aclosing(self.events) as events:
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            result = await _unless_disconnected(receive, self._send_all(send))
            self.client_gone = result is _GONE
        except OSError:  # servers on ASGI 2.4 report a gone client by failing the send
            self.client_gone = True
        finally:
            self.on_close()


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


def _json(data: dict[str, Any], status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _error_response(err: P.APIError) -> Response:
    return _json(err.body(), err.status, err.headers)


def _endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    async def wrapped(request: Request) -> Any:
        try:
            return await fn(request)
        except P.APIError as err:
            if err.status >= 500:
                log.warning("%s %s: %s", request.method, request.url.path, err.message)
            return _error_response(err)
        except ClientDisconnect:
            # A client that hangs up mid-body is routine, not a server failure: one line.
            log.info("%s %s: client disconnected before sending the whole body",
                     request.method, request.url.path)
            return Response(status_code=499)  # nobody will read it
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return _json(P.error_body("internal server error", "server_error"), 500)

    return wrapped


# --------------------------------------------------------------------------------------------
# The server state behind the routes


class OpenAIServer:
    """One model served over the OpenAI API: the routes' shared state, limits and counters.

    Build it through :func:`create_app`; the app keeps it as ``app.state.ondevice``. All its
    mutable state is touched from the event loop only.
    """

    def __init__(self, model, *, model_name: str | None, api_key: str | None, max_queue: int,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if not body_timeout > 0:
            raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout!r}")
        self.model = model
        self.runtime = model.runtime
        self.front = AsyncEngine(self.runtime.loop)
        self.model_name, self.model_names, self.model_meta = served_names(model, model_name)
        self._api_key = api_key.encode() if api_key else None
        self.max_queue = max_queue
        self.body_timeout = body_timeout
        self.max_running = self.runtime.engine.scheduler.max_num_seqs
        self.tokens = P.TokenStrings(model.tokenizer)
        # Each token stands for at most this many bytes of text (UTF-8 of its piece, which
        # over-counts byte-level pieces): text longer than context x this cannot fit.
        vocab = model.tokenizer.backend.get_vocab(with_added_tokens=True)
        self.max_token_bytes = max((len(p.encode()) for p in vocab), default=1) or 1
        self.fingerprint = f"ondevice-{model.backend}"
        self.created = int(time.time())
        self.closing = False
        self.aborted_all = False
        self.admitted: set[_Admitted] = set()
        self.seqs_in_flight = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)

    # -- checks -----------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._api_key):
            raise P.APIError(401, "invalid or missing API key (send 'Authorization: Bearer "
                                  "<key>')", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise P.APIError(404, f"the model {shown!r} does not exist; this server serves "
                                  f"{self.model_name!r}", param="model", code="model_not_found")

    @property
    def max_request_seqs(self) -> int:
        """Most sequences (prompts x n) one request may bring: the running batch plus the
        queue. More could never be admitted without starving every other client."""
        return self.max_running + self.max_queue

    def check_size(self, num_prompts: int, n: int) -> None:
        """Refuse (400) a request asking for more sequences than the server ever queues,
        before any of its prompts is tokenized."""
        seqs = num_prompts * max(n, 1)
        if seqs > self.max_request_seqs:
            raise P.invalid(
                "n", f"the request asks for {seqs} sequences ({num_prompts} prompt(s) x n={n}); "
                     f"this server takes at most {self.max_request_seqs} per request "
                     f"(max_num_seqs {self.max_running} + max_queue {self.max_queue})",
                "too_many_sequences")

    def check_text(self, texts: Iterable[str], param: str) -> None:
        """Refuse text that certainly exceeds the context before tokenizing it, so that the
        work (time and memory) of tokenizing is bounded by the context, not the body."""
        size = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
        limit = self.runtime.context_limit * self.max_token_bytes * TOKEN_BYTES_MARGIN
        if size > limit:
            raise P.invalid(
                param, f"the prompt is {size} bytes of text, more than a context of "
                       f"{self.runtime.context_limit} tokens can hold (the limit is "
                       f"{self.runtime.context_limit - 1} tokens)",
                "context_length_exceeded")

    def admit(self, seqs: int) -> _Admitted:
        """Take a request of ``seqs`` sequences in, or refuse it with 429 when the queue is
        full. Sequences beyond the engine's running batch (``max_num_seqs``) wait; at most
        ``max_queue`` may."""
        if self.closing:
            raise _shutting_down()
        if seqs > self.max_request_seqs:  # checked earlier too; never admit past it
            self.check_size(seqs, 1)
        waiting = max(0, self.seqs_in_flight + seqs - self.max_running)
        if self.seqs_in_flight and waiting > self.max_queue:
            self.counters["requests_rejected_queue_full"] += 1
            raise P.APIError(
                429, f"the server is busy ({self.seqs_in_flight} sequences in flight, "
                     f"max_queue {self.max_queue}); retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        entry = _Admitted(seqs)
        self.admitted.add(entry)
        self.seqs_in_flight += seqs
        self.counters["requests_total"] += 1
        return entry

    def release(self, entry: _Admitted) -> None:
        if entry in self.admitted:
            self.admitted.remove(entry)
            self.seqs_in_flight -= entry.seqs
        if entry.gen is not None:
            entry.gen.abort()  # no-op when it finished; frees the blocks if not

    def abort_all(self) -> None:
        """End every in-flight request with a 503 error (in-band for streams)."""
        self.aborted_all = True
        for entry in list(self.admitted):
            if entry.gen is not None:
                entry.gen.fail(_shutting_down())

    async def drain(self, timeout: float, should_stop: Callable[[], bool] = lambda: False,
                    ) -> None:
        """Refuse new requests (503), give in-flight ones up to ``timeout`` seconds to
        finish, then abort the rest."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self.admitted and time.monotonic() < deadline and not should_stop():
            await asyncio.sleep(0.05)
        if self.admitted:
            log.warning("aborting %d unfinished request(s) at shutdown", len(self.admitted))
        self.abort_all()

    def server_stats(self) -> dict[str, int]:
        return {
            "requests_in_flight": len(self.admitted),
            "sequences_in_flight": self.seqs_in_flight,
            "sequences_queued": max(0, self.seqs_in_flight - self.max_running),
            "max_queue": self.max_queue,
            "max_num_seqs": self.max_running,
            **self.counters,
        }

    # -- routes -----------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        """The body, read with a hard byte limit whatever the transfer encoding (chunked
        bodies have no Content-Length to check up front) and within ``body_timeout``."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _too_large()

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _too_large()  # stop reading now: nothing more is buffered
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise P.APIError(408, f"the request body did not arrive within "
                                  f"{self.body_timeout:g} seconds", code="request_timeout",
                             headers={"Connection": "close"}) from None

    async def _read_json(self, request: Request) -> Any:
        _check_json_content_type(request)
        raw = await self._read_body(request)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise P.invalid(None, f"the request body is not valid JSON: {err}") from None

    async def chat_completions(self, request: Request) -> Any:
        self.authorize(request)
        body = await self._read_json(request)
        req = P.parse_chat(body)
        tools = T.parse_tools(body)
        options = req.options
        forced = tools.constraint() if tools is not None else None
        if forced is not None:
            if options.constraint is not None:
                raise P.invalid("response_format", "'response_format' cannot be combined with "
                                                   "a forced tool call ('tool_choice')")
            options = dataclasses.replace(options, constraint=forced)
        self.check_model(options.model)
        self.check_size(1, options.n)
        self.check_text((m["content"] for m in req.messages), "messages")
        tokenizer = self.model.tokenizer
        messages, extra = T.render(req.messages, tools,
                                   T.template_takes_tools(tokenizer.chat_template))
        try:
            if extra or messages != req.messages:
                ids = await run_in_threadpool(
                    lambda: tokenizer.encode_chat(messages, add_generation_prompt=True, **extra))
            else:
                ids = await run_in_threadpool(self.model.encode_prompt, req.messages)
        except TokenizerError as err:
            raise P.invalid("messages", str(err)) from None
        default_max = max(1, self.runtime.context_limit - len(ids))  # the rest of the context
        return await self._generate(request, True, [ids], options, default_max,
                                    tools=tools if tools is not None and tools.active else None)

    async def completions(self, request: Request) -> Any:
        self.authorize(request)
        req = P.parse_completion(await self._read_json(request))
        self.check_model(req.options.model)
        self.check_size(len(req.prompts), req.options.n)
        for p in req.prompts:  # each prompt must fit on its own
            if isinstance(p, str):
                self.check_text([p], "prompt")

        def encode() -> list[list[int]]:
            return [self.model.encode_prompt(p) for p in req.prompts]

        try:
            prompts = await run_in_threadpool(encode)
        except TokenizerError as err:
            raise P.invalid("prompt", str(err)) from None
        return await self._generate(request, False, prompts, req.options,
                                    P.COMPLETIONS_DEFAULT_MAX_TOKENS)

    async def _submit(self, prompts: list[list[int]], params: SamplingParams,
                      param: str) -> _Admitted:
        """Admit (429 when full) and hand the prompts to the engine, which validates them
        (400 here, before any response has started)."""
        entry = self.admit(len(prompts) * params.n)
        try:
            entry.gen = await self.front.submit(prompts, params)
        except SamplingError as err:  # checked before; the engine checks again
            self.release(entry)
            raise P.invalid(err.field, str(err)) from None
        except RequestError as err:
            self.release(entry)
            if err.code == "model_closed":
                raise _shutting_down() from None
            too_long = any(len(ids) >= self.runtime.context_limit for ids in prompts)
            raise P.invalid(param, str(err),
                            "context_length_exceeded" if too_long else None) from None
        except BaseException:
            self.release(entry)
            raise
        if self.aborted_all:  # shut down while the engine was taking it
            entry.gen.fail(_shutting_down())
        return entry

    async def _check_constraints(self, params: SamplingParams, tools: T.ToolRequest | None,
                                 ) -> None:
        """400 for a logit bias outside the vocabulary or a constraint the compiler rejects;
        the compile runs here, off the engine thread, and lands in the engine's cache."""
        vocab = self.runtime.engine.vocab_size
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise P.invalid("logit_bias", f"'logit_bias' names token {bad}, outside the "
                                          f"vocabulary (0..{vocab - 1})")
        if params.constraint is None:
            return
        param = "tools" if tools is not None and tools.constraint() is not None \
            else "response_format"
        try:
            await run_in_threadpool(self.runtime.engine.constraints.compile, params.constraint)
        except (ConstraintError, RequestError) as err:
            raise P.invalid(param, str(err)) from None

    async def _generate(self, request: Request, chat: bool, prompts: list[list[int]],
                        options: P.GenerationOptions, default_max: int,
                        tools: T.ToolRequest | None = None) -> Any:
        params = options.sampling_params(default_max)
        await self._check_constraints(params, tools)
        entry = await self._submit(prompts, params, "messages" if chat else "prompt")
        run = _Run(entry, prompts, params, tools)
        head = P.ResponseHeader.new("chatcmpl" if chat else "cmpl", self.model_name,
                                    self.fingerprint)
        if options.stream:
            stream = _EventStream(self._stream(run, head, chat, options),
                                  on_close=lambda: self._finish(entry, stream.client_gone))
            return stream
        try:
            result = await _unless_disconnected(request.receive,
                                                self._collect(run, head, chat))
        except BaseException:
            self.counters["requests_failed"] += 1
            raise
        finally:
            self.release(entry)
        if result is _GONE:
            self.counters["requests_disconnected"] += 1
            log.info("client disconnected; request aborted")
            return Response(status_code=499)  # nobody will read it
        return _json(result)

    def _finish(self, entry: _Admitted, client_gone: bool) -> None:
        self.release(entry)
        if client_gone:
            self.counters["requests_disconnected"] += 1
            log.info("client disconnected; stream aborted")

    def _usage(self, run: _Run, choices: list[_Choice], cached: list[int]) -> P.Usage:
        # A prompt counts once however many choices it has (as OpenAI counts it).
        return P.Usage(sum(len(p) for p in run.prompts), sum(c.tokens for c in choices),
                       sum(cached))

    async def _collect(self, run: _Run, head: P.ResponseHeader, chat: bool) -> dict[str, Any]:
        n = run.params.n
        choices = [_Choice() for _ in range(run.num_choices)]
        cached = [0] * len(run.prompts)
        want_logprobs = run.params.logprobs is not None
        async with contextlib.aclosing(run.outputs()) as outputs:
            async for k, out in outputs:
                c = choices[k]
                cached[k // n] = max(cached[k // n], out.num_cached_tokens)
                c.texts.append(out.text)
                c.tokens += len(out.token_ids)
                if out.finish_reason is not None:
                    c.finish_reason = out.finish_reason
                if want_logprobs and out.token_ids and out.logprob is not None:
                    tid = out.token_ids[0]
                    if chat:
                        c.chat_logprobs.append(P.chat_logprob_entry(
                            self.tokens, tid, out.logprob, out.top_logprobs))
                    else:
                        c.completion_logprobs.add(self.tokens, tid, out.logprob,
                                                  out.top_logprobs)
        if any(c.finish_reason not in ("stop", "length") for c in choices):
            raise _shutting_down()  # the engine loop ended without finishing them
        body = []
        for k, c in enumerate(choices):
            text = "".join(c.texts)
            if chat:
                lp = {"content": c.chat_logprobs, "refusal": None} if want_logprobs else None
                message, reason = {"role": "assistant", "content": text}, c.finish_reason
                if run.tools is not None:
                    message, reason = T.final_message(text, reason, run.tools)
                body.append({"index": k, "message": message, "logprobs": lp,
                             "finish_reason": reason})
            else:
                lp = c.completion_logprobs.to_dict() if want_logprobs else None
                body.append({"index": k, "text": text, "logprobs": lp,
                             "finish_reason": c.finish_reason})
        obj = "chat.completion" if chat else "text_completion"
        return head.fields(obj) | {"choices": body,
                                   "usage": self._usage(run, choices, cached).to_dict()}

    async def _stream(self, run: _Run, head: P.ResponseHeader, chat: bool,
                      options: P.GenerationOptions) -> AsyncIterator[bytes]:
        n = run.params.n
        choices = [_Choice() for _ in range(run.num_choices)]
        cached = [0] * len(run.prompts)
        want_logprobs = run.params.logprobs is not None
        usage_on = options.include_usage
        chunk = P.chat_chunk if chat else P.completion_chunk
        calls = [T.ToolCallStream(run.tools) for _ in choices] if run.tools else None
        try:
            if chat:  # OpenAI opens every choice with the role
                for k in range(len(choices)):
                    yield _sse(chunk(head, [{"index": k, "delta": {"role": "assistant",
                                                                    "content": ""},
                                             "logprobs": None, "finish_reason": None}], usage_on))
            async with contextlib.aclosing(run.outputs()) as outputs:
                async for k, out in outputs:
                    c = choices[k]
                    cached[k // n] = max(cached[k // n], out.num_cached_tokens)
                    c.tokens += len(out.token_ids)
                    if out.finish_reason is not None:
                        c.finish_reason = out.finish_reason
                    lp = None
                    if want_logprobs and out.token_ids and out.logprob is not None:
                        tid = out.token_ids[0]
                        if chat:
                            lp = {"content": [P.chat_logprob_entry(
                                self.tokens, tid, out.logprob, out.top_logprobs)],
                                  "refusal": None}
                        else:
                            c.completion_logprobs.add(self.tokens, tid, out.logprob,
                                                      out.top_logprobs)
                            lp = c.completion_logprobs.last()
                    if chat and calls is not None:  # text may become tool_calls deltas
                        deltas = calls[k].feed(out.text)
                        reason = out.finish_reason
                        if reason in ("stop", "length"):
                            more, reason = calls[k].finish(reason)
                            deltas += more
                        for delta in deltas:
                            yield _sse(chunk(head, [{"index": k, "delta": delta,
                                                     "logprobs": None, "finish_reason": None}],
                                             usage_on))
                        if out.finish_reason in ("stop", "length"):
                            yield _sse(chunk(head, [{"index": k, "delta": {}, "logprobs": None,
                                                     "finish_reason": reason}], usage_on))
                    elif chat:
                        if out.text or lp:
                            yield _sse(chunk(head, [{"index": k, "delta": {"content": out.text},
                                                     "logprobs": lp, "finish_reason": None}],
                                             usage_on))
                        if out.finish_reason in ("stop", "length"):
                            yield _sse(chunk(head, [{"index": k, "delta": {}, "logprobs": None,
                                                     "finish_reason": out.finish_reason}],
                                             usage_on))
                    elif out.text or lp or out.finish_reason in ("stop", "length"):
                        yield _sse(chunk(head, [{"index": k, "text": out.text, "logprobs": lp,
                                                 "finish_reason": out.finish_reason}], usage_on))
            if any(c.finish_reason not in ("stop", "length") for c in choices):
                raise _shutting_down()
            if usage_on:
                last = chunk(head, [], False)
                last["usage"] = self._usage(run, choices, cached).to_dict()
                yield _sse(last)
            yield b"data: [DONE]\n\n"
        except P.APIError as err:
            if err.status >= 500:
                self.counters["requests_failed"] += 1
            yield _sse(err.body())  # the status line is long gone: report in-band
        except Exception:
            self.counters["requests_failed"] += 1
            log.exception("stream failed")
            yield _sse(P.error_body("internal server error", "server_error"))

    async def list_models(self, request: Request) -> Response:
        self.authorize(request)
        return _json({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        self.authorize(request)
        self.check_model(request.path_params["model"])
        return _json(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "ondevice", **self.model_meta}

    async def tokenize(self, request: Request) -> Response:
        """llama-server's ``POST /tokenize``: ``{"content": TEXT, "add_special": false,
        "with_pieces": false}`` -> ``{"tokens": [ids]}``, or with pieces
        ``{"tokens": [{"id": ID, "piece": TEXT}]}`` (a piece that is not whole UTF-8 is a
        list of byte values, as llama-server gives it)."""
        self.authorize(request)
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise P.invalid(None, "the request body must be a JSON object")
        content = body.get("content")
        if not isinstance(content, str):
            raise P.invalid("content", "'content' must be a string")
        add_special = P._bool(body, "add_special")
        with_pieces = P._bool(body, "with_pieces")
        self.check_text([content], "content")
        try:
            ids = await run_in_threadpool(self.model.tokenizer.encode, content, add_special)
        except TokenizerError as err:
            raise P.invalid("content", str(err)) from None
        if not with_pieces:
            return _json({"tokens": ids})
        pieces = []
        for tid in ids:
            raw = bytes(self.tokens.get(tid)[1])
            try:
                piece: str | list[int] = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)
            pieces.append({"id": tid, "piece": piece})
        return _json({"tokens": pieces})

    async def detokenize(self, request: Request) -> Response:
        """llama-server's ``POST /detokenize``: ``{"tokens": [ids]}`` -> ``{"content": TEXT}``.
        Ids outside the vocabulary are a 400 naming the first one."""
        self.authorize(request)
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise P.invalid(None, "the request body must be a JSON object")
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise P.invalid("tokens", "'tokens' must be a list of token ids (integers)")
        vocab = self.model.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.invalid("tokens", f"token id {bad} is outside the vocabulary "
                                      f"(0..{vocab - 1})")
        if len(ids) > self.runtime.context_limit * 16:  # bounded work, like prompts
            raise P.invalid("tokens", f"at most {self.runtime.context_limit * 16} tokens")
        text = await run_in_threadpool(self.model.tokenizer.decode, ids)
        return _json({"content": text})

    async def health(self, request: Request) -> Response:
        if self.closing:
            return _json({"status": "shutting_down", "model": self.model_name}, 503)
        return _json({"status": "ok", "model": self.model_name})

    async def metrics(self, request: Request) -> Response:
        self.authorize(request)
        engine = await run_in_threadpool(self.runtime.stats)  # waits for the end of a step
        data = {"model": self.model_name, "backend": self.model.backend, **engine,
                "server": self.server_stats()}
        if request.query_params.get("format") == "prometheus":
            return PlainTextResponse(_prometheus(engine, self.server_stats()),
                                     media_type="text/plain; version=0.0.4")
        return _json(data)


_PROM_COUNTERS = {"prefix_cache_queries", "prefix_cache_hits", "preemptions",
                  "generated_tokens", "prompt_tokens", "steps", *_COUNTERS}


def _prometheus(engine: dict[str, Any], server: dict[str, Any]) -> str:
    lines = []
    for prefix, stats in (("ondevice_", engine), ("ondevice_server_", server)):
        for key, value in stats.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = prefix + key
            kind = "counter" if key in _PROM_COUNTERS else "gauge"
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The app factory


def create_app(model, *, model_name: str | None = None, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, allowed_hosts: Iterable[str] = (),
               body_timeout: float = DEFAULT_BODY_TIMEOUT, cors_origins: Iterable[str] = (),
               ) -> Starlette:
    """An ASGI app serving ``model`` (an :class:`ondevice.Model`) over the OpenAI API.

    Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with SSE
    or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (JSON engine and server
    stats; ``?format=prometheus`` for Prometheus text), ``POST /tokenize`` and
    ``POST /detokenize`` (llama-server's shapes), and the chat page at ``GET /``.

    Args:
        model: the loaded model. Several apps may share it: their requests batch together.
            The app does not close it; stop serving before closing it.
        model_name: the id clients use in ``"model"`` (default: the model's store name, else
            its directory's name; the other names of its store entry, e.g. the alias it was
            pulled by, are accepted too); requests naming another model get 404, requests
            naming none are served.
        api_key: when set, every route except ``/health`` needs ``Authorization: Bearer KEY``.
        max_queue: sequences that may wait beyond the engine's running batch
            (``max_num_seqs``); requests past that get 429. One request may bring at most
            ``max_num_seqs + max_queue`` sequences (prompts x n); more is a 400.
        allowed_hosts: ``Host`` names accepted besides the address a connection came in on,
            ``localhost``, ``127.0.0.1`` and ``::1`` (``"*"``: any). Others get 403, which
            keeps DNS-rebinding web pages out.
        body_timeout: seconds a client has to send its request body (then 408).
        cors_origins: web origins (``scheme://host[:port]``, ``"*"`` for any) whose pages
            may call the API from a browser: their preflights are answered and their replies
            carry ``Access-Control-Allow-Origin``. Default: none.

    Without ``cors_origins`` no CORS headers are sent, and JSON endpoints take only JSON
    content types, so a web page in a browser can neither post to the server without a
    preflight nor read its replies.

    Serve it with uvicorn (asyncio), e.g. :func:`ondevice.server.serve` or
    :class:`ondevice.server.ServerThread`. On lifespan shutdown the requests still running
    are aborted.
    """
    state = OpenAIServer(model, model_name=model_name, api_key=api_key,
                         max_queue=max_queue, body_timeout=body_timeout)
    # Checked now (ValueError), not when the first request builds the middleware stack.
    cors_origins = tuple(normalize_origin(o) for o in cors_origins)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.closing = True
        state.abort_all()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _json(P.error_body(message, kind), exc.status_code, exc.headers)

    routes = [
        Route("/v1/chat/completions", _endpoint(state.chat_completions), methods=["POST"]),
        Route("/v1/completions", _endpoint(state.completions), methods=["POST"]),
        Route("/v1/models", _endpoint(state.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(state.get_model), methods=["GET"]),
        Route("/health", _endpoint(state.health), methods=["GET"]),
        Route("/metrics", _endpoint(state.metrics), methods=["GET"]),
        Route("/tokenize", _endpoint(state.tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(state.detokenize), methods=["POST"]),
        *page_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error},
                    middleware=[Middleware(HostGuard, allowed_hosts=tuple(allowed_hosts)),
                                Middleware(CORSGuard, origins=tuple(cors_origins))])
    app.state.ondevice = state
    return app
