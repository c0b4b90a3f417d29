"""The OpenAI-compatible HTTP app (Starlette) over a model's shared continuous-batching engine.

Every request goes to the one :class:`~ondevice.engine.EngineLoop` of the model, so concurrent
clients are decoded together in one batch and share KV blocks of common prompt prefixes. The
app is asyncio-only: engine outputs are handed from the engine thread to the event loop with
``call_soon_threadsafe``.

Disconnects: while a request runs, a task waits on the ASGI ``receive`` channel; the
``http.disconnect`` it gets when the client goes away cancels the request's work, which aborts
its engine requests (their KV blocks are free before the next engine step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..engine.request import RequestOutput
from ..errors import RequestError, TokenizerError
from ..sampling import SamplingParams
from . import protocol as P

log = logging.getLogger("ondevice.server")

DEFAULT_MAX_QUEUE = 256
"""Sequences that may wait for a place in the running batch before requests get 429."""

MAX_BODY_BYTES = 16 << 20

MAX_SUBMIT_THREADS = 128

_COUNTERS = ("requests_total", "requests_rejected_queue_full", "requests_disconnected",
             "requests_failed")


def _shutting_down() -> P.APIError:
    return P.APIError(503, "the server is shutting down; the request was not completed",
                      type="server_error", code="server_shutting_down")


# --------------------------------------------------------------------------------------------
# Engine requests of one HTTP request


def _split(prompts: list[list[int]],
           params: SamplingParams) -> list[tuple[list[int], SamplingParams]]:
    """One single-sample engine request per choice, in choice order (prompt-major).

    ``n > 1`` is served as ``n`` requests rather than the engine's own ``n``, so that every
    choice is one engine request with its own queue index and abort. Sample ``j > 0`` gets a
    seed derived from the request's (reproducible; sample 0 keeps the seed itself, so it
    matches the same request with ``n=1``). Prefix caching still shares the prompt's full KV
    blocks between them (the engine's ``n`` would also share the last, partial block).
    """
    if params.n == 1:
        return [(ids, params) for ids in prompts]
    samples = []
    for j in range(params.n):
        seed = params.seed
        if seed is not None and j:
            digest = hashlib.sha256(f"ondevice-sample:{seed}:{j}".encode()).digest()
            seed = int.from_bytes(digest[:8], "little") >> 1
        samples.append(dataclasses.replace(params, n=1, seed=seed))
    return [(ids, sample) for ids in prompts for sample in samples]


class _Job:
    """The engine requests of one HTTP request (one per choice), whose outputs arrive on one
    asyncio queue as ``(choice_index, item)``.

    Submission runs in a worker thread of ``executor``: ``EngineLoop.submit`` blocks until
    the engine thread picks the request up between two steps, so the pool must be wide enough
    for every waiting submission to catch the same step boundary. A done-callback records
    each request id, so a job that is closed or cancelled while a submission is still in
    flight aborts that request as soon as it exists instead of leaving it to run unobserved.
    """

    def __init__(self, engine_loop, executor: ThreadPoolExecutor, prompts: list[list[int]],
                 params: SamplingParams):
        self.engine_loop = engine_loop
        self.executor = executor
        self.prompts = prompts
        self.params = params
        self.units = _split(prompts, params)
        self.seqs = len(self.units)
        self._aloop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int | None, Any]] = asyncio.Queue()
        self._rids: dict[int, str] = {}
        self._finished: set[int] = set()
        self._closed = False

    def _sink(self, i: int) -> Callable[[Any], None]:
        def put(item: Any) -> None:  # runs on the engine thread
            try:
                self._aloop.call_soon_threadsafe(self._queue.put_nowait, (i, item))
            except RuntimeError:
                pass  # the event loop is closed: nobody is listening any more

        return put

    def _submitted(self, i: int, fut: asyncio.Future) -> None:
        if fut.cancelled():  # only when the event loop itself is torn down
            return
        err = fut.exception()
        if err is not None:
            self._queue.put_nowait((i, err))
        elif self._closed:
            self.engine_loop.abort(fut.result(), wait=False)
        else:
            self._rids[i] = fut.result()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every choice, as they come. Closing this early aborts what is
        still running."""
        for i, (ids, params) in enumerate(self.units):
            fut = self._aloop.run_in_executor(self.executor, self.engine_loop.submit, ids,
                                              params, self._sink(i))
            fut.add_done_callback(lambda f, i=i: self._submitted(i, f))
        try:
            while len(self._finished) < len(self.units):
                i, item = await self._queue.get()
                if isinstance(item, RequestOutput):
                    yield i, item  # type: ignore[misc]
                elif isinstance(item, BaseException):
                    raise item
                else:  # the engine loop's end-of-request marker
                    self._finished.add(i)  # type: ignore[arg-type]
        finally:
            self._closed = True
            for i, rid in self._rids.items():
                if i not in self._finished:
                    self.engine_loop.abort(rid, wait=False)

    def cancel(self, err: BaseException) -> None:
        """End the job with ``err`` (raised to whoever reads :meth:`outputs`)."""
        self._queue.put_nowait((None, err))


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

    def __init__(self, model, *, model_name: str, api_key: str | None, max_queue: int):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = model
        self.runtime = model.runtime
        self.model_name = model_name
        self._api_key = api_key.encode() if api_key else None
        self.max_queue = max_queue
        self.max_running = self.runtime.engine.scheduler.max_num_seqs
        self.tokens = P.TokenStrings(model.tokenizer)
        self.fingerprint = f"ondevice-{model.backend}"
        self.created = int(time.time())
        self.closing = False
        self.jobs: set[_Job] = set()
        self.seqs_in_flight = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        # Wide enough that every admitted sequence can wait for the next step boundary at
        # once (a narrow pool admits a burst of clients a few per engine step).
        self.submitter = ThreadPoolExecutor(
            max_workers=min(MAX_SUBMIT_THREADS, self.max_running + max_queue),
            thread_name_prefix="ondevice-submit")

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
        if name is not None and name != self.model_name:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise P.APIError(404, f"the model {shown!r} does not exist; this server serves "
                                  f"{self.model_name!r}", param="model", code="model_not_found")

    def validate(self, ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.runtime.engine.validate(ids, params)  # reads immutable limits only
        except RequestError as err:
            too_long = len(ids) >= self.runtime.context_limit
            raise P.invalid(param, str(err),
                            "context_length_exceeded" if too_long else None) from None

    def admit(self, job: _Job) -> None:
        """Take ``job`` in, or refuse it with 429 when the queue is full. Sequences beyond
        the engine's running batch (``max_num_seqs``) wait; at most ``max_queue`` may."""
        if self.closing:
            raise _shutting_down()
        waiting = max(0, self.seqs_in_flight + job.seqs - self.max_running)
        if self.seqs_in_flight and waiting > self.max_queue:
            self.counters["requests_rejected_queue_full"] += 1
            raise P.APIError(
                429, f"the server is busy ({self.seqs_in_flight} sequences in flight, "
                     f"max_queue {self.max_queue}); retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.jobs.add(job)
        self.seqs_in_flight += job.seqs
        self.counters["requests_total"] += 1

    def release(self, job: _Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
            self.seqs_in_flight -= job.seqs

    def abort_all(self) -> None:
        """End every in-flight request with a 503 error (in-band for streams)."""
        for job in list(self.jobs):
            job.cancel(_shutting_down())

    async def drain(self, timeout: float, should_stop: Callable[[], bool] = lambda: False,
                    ) -> None:
        """Refuse new requests (503), give in-flight ones up to ``timeout`` seconds to
        finish, then abort the rest."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline and not should_stop():
            await asyncio.sleep(0.05)
        if self.jobs:
            log.warning("aborting %d unfinished request(s) at shutdown", len(self.jobs))
        self.abort_all()

    def server_stats(self) -> dict[str, int]:
        return {
            "requests_in_flight": len(self.jobs),
            "sequences_in_flight": self.seqs_in_flight,
            "sequences_queued": max(0, self.seqs_in_flight - self.max_running),
            "max_queue": self.max_queue,
            "max_num_seqs": self.max_running,
            **self.counters,
        }

    # -- routes -----------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise P.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise P.invalid(None, f"the request body is not valid JSON: {err}") from None

    async def chat_completions(self, request: Request) -> Any:
        self.authorize(request)
        req = P.parse_chat(await self._read_json(request))
        self.check_model(req.options.model)
        try:
            ids = await run_in_threadpool(self.model.encode_prompt, req.messages)
        except TokenizerError as err:
            raise P.invalid("messages", str(err)) from None
        default_max = max(1, self.runtime.context_limit - len(ids))  # the rest of the context
        return await self._generate(request, True, [ids], req.options, default_max)

    async def completions(self, request: Request) -> Any:
        self.authorize(request)
        req = P.parse_completion(await self._read_json(request))
        self.check_model(req.options.model)

        def encode() -> list[list[int]]:
            return [self.model.encode_prompt(p) for p in req.prompts]

        try:
            prompts = await run_in_threadpool(encode)
        except TokenizerError as err:
            raise P.invalid("prompt", str(err)) from None
        return await self._generate(request, False, prompts, req.options,
                                    P.COMPLETIONS_DEFAULT_MAX_TOKENS)

    async def _generate(self, request: Request, chat: bool, prompts: list[list[int]],
                        options: P.GenerationOptions, default_max: int) -> Any:
        params = options.sampling_params(default_max)
        for ids in prompts:
            self.validate(ids, params, "messages" if chat else "prompt")
        job = _Job(self.runtime.loop, self.submitter, prompts, params)
        self.admit(job)
        head = P.ResponseHeader.new("chatcmpl" if chat else "cmpl", self.model_name,
                                    self.fingerprint)
        if options.stream:
            stream = _EventStream(self._stream(job, head, chat, options),
                                  on_close=lambda: self._finish(job, stream.client_gone))
            return stream
        try:
            result = await _unless_disconnected(request.receive,
                                                self._collect(job, head, chat, options))
        except BaseException:
            self.counters["requests_failed"] += 1
            raise
        finally:
            self.release(job)
        if result is _GONE:
            self.counters["requests_disconnected"] += 1
            log.info("client disconnected; request aborted")
            return Response(status_code=499)  # nobody will read it
        return _json(result)

    def _finish(self, job: _Job, client_gone: bool) -> None:
        self.release(job)
        if client_gone:
            self.counters["requests_disconnected"] += 1
            log.info("client disconnected; stream aborted")

    def _usage(self, job: _Job, choices: list[_Choice], cached: list[int]) -> P.Usage:
        # A prompt counts once however many choices it has (as OpenAI counts it).
        return P.Usage(sum(len(p) for p in job.prompts), sum(c.tokens for c in choices),
                       sum(cached))

    async def _collect(self, job: _Job, head: P.ResponseHeader, chat: bool,
                       options: P.GenerationOptions) -> dict[str, Any]:
        n = job.params.n
        choices = [_Choice() for _ in job.units]
        cached = [0] * len(job.prompts)
        want_logprobs = job.params.logprobs is not None
        async with contextlib.aclosing(job.outputs()) as outputs:
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
                body.append({"index": k, "message": {"role": "assistant", "content": text},
                             "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = c.completion_logprobs.to_dict() if want_logprobs else None
                body.append({"index": k, "text": text, "logprobs": lp,
                             "finish_reason": c.finish_reason})
        obj = "chat.completion" if chat else "text_completion"
        return head.fields(obj) | {"choices": body,
                                   "usage": self._usage(job, choices, cached).to_dict()}

    async def _stream(self, job: _Job, head: P.ResponseHeader, chat: bool,
                      options: P.GenerationOptions) -> AsyncIterator[bytes]:
        n = job.params.n
        choices = [_Choice() for _ in job.units]
        cached = [0] * len(job.prompts)
        want_logprobs = job.params.logprobs is not None
        usage_on = options.include_usage
        chunk = P.chat_chunk if chat else P.completion_chunk
        try:
            if chat:  # OpenAI opens every choice with the role
                for k in range(len(choices)):
                    yield _sse(chunk(head, [{"index": k, "delta": {"role": "assistant",
                                                                    "content": ""},
                                             "logprobs": None, "finish_reason": None}], usage_on))
            async with contextlib.aclosing(job.outputs()) as outputs:
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
                    if chat:
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
                last["usage"] = self._usage(job, choices, cached).to_dict()
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
                "owned_by": "ondevice"}

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
               max_queue: int = DEFAULT_MAX_QUEUE) -> Starlette:
    """An ASGI app serving ``model`` (an :class:`ondevice.Model`) over the OpenAI API.

    Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with SSE
    or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (JSON engine and server
    stats; ``?format=prometheus`` for Prometheus text).

    Args:
        model: the loaded model. Several apps may share it: their requests batch together.
            The app does not close it; stop serving before closing it.
        model_name: the id clients use in ``"model"`` (default: the model directory's
            name); requests naming another model get 404, requests naming none are served.
        api_key: when set, every route except ``/health`` needs ``Authorization: Bearer KEY``.
        max_queue: sequences that may wait beyond the engine's running batch
            (``max_num_seqs``); requests past that get 429.

    Serve it with uvicorn (asyncio), e.g. :func:`ondevice.server.serve` or
    :class:`ondevice.server.ServerThread`. On lifespan shutdown the requests still running
    are aborted.
    """
    state = OpenAIServer(model, model_name=model_name or model.path.name, api_key=api_key,
                         max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.closing = True
        state.abort_all()
        state.submitter.shutdown(wait=False)

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
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    app.state.ondevice = state
    return app
