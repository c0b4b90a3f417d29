"""Thread-safe synchronous and asyncio fronts over one :class:`Engine`.

One background thread owns the engine and steps it while there is work; callers submit
requests from any thread and read their outputs from a queue. Closing a stream early (or a
dropped client) aborts its request, and its KV blocks are freed before the next step.

A request is validated once, when the engine thread adds it (``Engine.add_request``); the
error is handed back to whoever submitted it. Shutting the loop down while requests run ends
each of them with a :class:`RequestError` (code ``"model_closed"``), never with silently
truncated output.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from ..errors import RequestError
from ..sampling import SamplingParams
from .engine import Engine
from .request import RequestOutput

_DONE = object()

Sink = Callable[[Any], None]
"""Receives a request's RequestOutputs, then ``_DONE`` or an exception (on the engine thread)."""


def _closed_error() -> RequestError:
    return RequestError("the model was closed before the request finished", code="model_closed")


class EngineLoop:
    """Runs ``engine.step()`` on a daemon thread. Every engine access goes through it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._todo: list[Callable[[], None]] = []  # calls to run on the engine thread
        self._sinks: dict[str, Sink] = {}
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="ondevice-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------
    def enqueue(self, prompts: Sequence[list[int]], params: SamplingParams,
                sinks: Sequence[Sink], on_added: Callable[[list[str] | BaseException], None],
                ) -> None:
        """Add one request per prompt (all sharing ``params``) at the next step boundary,
        without blocking. Either all are added or none: ``on_added`` gets their request ids,
        or the first error (validation happens here, once). ``sinks[i]`` receives prompt
        ``i``'s outputs. Runs ``on_added`` on the engine thread."""
        if len(sinks) != len(prompts):
            raise ValueError("one sink per prompt")

        def add() -> None:
            rids: list[str] = []
            try:
                for ids, sink in zip(prompts, sinks, strict=True):
                    rid = self.engine.add_request(ids, params)
                    rids.append(rid)
                    self._sinks[rid] = sink
            except Exception as err:  # noqa: BLE001  (handed back to the submitter)
                for rid in rids:  # nothing stepped in between: undo the partial submission
                    self.engine.abort(rid)
                    self._sinks.pop(rid, None)
                on_added(err)
                return
            on_added(rids)

        self.call(add, wait=False)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> str:
        """Queue a request and wait until the engine thread has taken it; ``sink`` receives
        each RequestOutput, then ``_DONE`` or an exception. Invalid requests raise here, in
        the caller's thread."""
        box: list[Any] = []
        ready = threading.Event()

        def added(result: list[str] | BaseException) -> None:
            box.append(result)
            ready.set()

        self.enqueue([prompt_ids], params, [sink], added)
        ready.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0][0]

    def abort(self, request_id: str, wait: bool = True) -> None:
        """Abort a request; with ``wait`` its blocks are free when this returns."""

        def do() -> None:
            self.engine.abort(request_id)
            self._sinks.pop(request_id, None)

        try:
            self.call(do, wait=wait)
        except RequestError:
            pass  # shut down: every request has been aborted already

    def call(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        """Run ``fn`` on the engine thread between steps (and wait for its result)."""
        if threading.current_thread() is self._thread:
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()

        def wrapped() -> None:
            try:
                box["value"] = fn()
            except BaseException as err:  # noqa: BLE001
                box["err"] = err
            done.set()

        with self._cv:
            if self._closed:
                raise RequestError("the model is closed", code="model_closed")
            self._todo.append(wrapped)
            self._idle.clear()
            self._cv.notify()
        if not wait:
            return None
        done.wait()
        if "err" in box:
            raise box["err"]
        return box.get("value")

    def stats(self) -> dict:
        return self.call(self.engine.stats)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is queued or running (for tests and shutdown)."""
        return self._idle.wait(timeout)

    def shutdown(self) -> None:
        """Stop the engine thread. Requests still queued or running end with a
        ``RequestError`` (code ``"model_closed"``) delivered to their readers."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._todo and not engine.has_unfinished() and not self._closed:
                    self._idle.set()
                    self._cv.wait()
                todo, self._todo = self._todo, []
                closed = self._closed
            for fn in todo:  # at shutdown too: nobody may be left waiting on a call
                fn()
            if closed:
                self._close_all()
                return
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as err:  # noqa: BLE001  (a backend failure ends every request)
                for rid in list(engine.requests):
                    engine.abort(rid)
                for sink in self._sinks.values():
                    sink(err)
                self._sinks.clear()
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
            # Only after the whole step: with n > 1, several samples may finish in one step.
            for rid in {out.request_id for out in outputs}:
                if rid not in engine.requests and rid in self._sinks:  # every sample finished
                    self._sinks.pop(rid)(_DONE)

    def _close_all(self) -> None:
        """Abort what is left and tell every reader why (a clear error, not a short reply)."""
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(_closed_error())
        self._idle.set()


def _unwrap(item: Any) -> RequestOutput | None:
    """An item a sink received: an output, None at the end, or the engine's error raised."""
    if item is _DONE:
        return None
    if isinstance(item, BaseException):
        raise item
    return item


class SyncEngine:
    """Blocking iterator front, safe to use from many threads at once."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.loop.submit(prompt_ids, params, q.put)
        finished = False
        try:
            while True:
                item = q.get()
                finished = True  # until the item turns out to be an output
                out = _unwrap(item)
                if out is None:
                    return
                finished = False
                yield out
        finally:
            if not finished:  # closed early, Ctrl-C, or the consumer raised
                self.loop.abort(rid)


class AsyncGeneration:
    """The engine requests of one submission (one per prompt, each with ``params.n``
    samples), read as ``async for prompt_index, output in generation``.

    Outputs of all prompts arrive as the engine produces them. Closing the iterator (or
    :meth:`abort`) before the end aborts what still runs, without blocking the event loop;
    :meth:`fail` ends it from outside with an error raised to the reader.
    """

    def __init__(self, loop: EngineLoop, num_prompts: int):
        self._loop = loop
        self._aloop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int | None, Any]] = asyncio.Queue()
        self.num_prompts = num_prompts
        self.request_ids: list[str] = []
        self._done: set[int] = set()
        self._aborted = False

    def _sink(self, i: int) -> Sink:
        def put(item: Any) -> None:  # runs on the engine thread
            try:
                self._aloop.call_soon_threadsafe(self._queue.put_nowait, (i, item))
            except RuntimeError:
                pass  # the event loop is closed: nobody is listening any more

        return put

    @property
    def finished(self) -> bool:
        return len(self._done) == self.num_prompts

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while not self.finished:
                i, item = await self._queue.get()
                if i is None or isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    self._done.add(i)
                else:
                    yield i, item
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort the requests still running (their KV blocks are freed before the next
        step); does not wait."""
        if self._aborted:
            return
        self._aborted = True
        for i, rid in enumerate(self.request_ids):
            if i not in self._done:
                self._loop.abort(rid, wait=False)

    def fail(self, err: BaseException) -> None:
        """End the generation with ``err`` (raised to the reader) and abort its requests."""
        self._queue.put_nowait((None, err))
        self.abort()


class AsyncEngine:
    """The asyncio front: ``await submit(...)`` then ``async for`` over the outputs, or
    ``async for out in engine.generate(...)`` for one prompt."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    async def submit(self, prompts: Sequence[list[int]],
                     params: SamplingParams) -> AsyncGeneration:
        """Submit one request per prompt (together: all are added at the same step boundary,
        or none). Returns once the engine has them; a request the engine refuses raises here
        (``RequestError``), before any output. ``params.n > 1`` forks each prompt into n
        samples (``SeedSequence(seed, spawn_key=(i,))`` for sample i), exactly as the
        synchronous API does."""
        aloop = asyncio.get_running_loop()
        gen = AsyncGeneration(self.loop, len(prompts))
        added: asyncio.Future = aloop.create_future()

        def resolve(result: list[str] | BaseException) -> None:  # on the event loop
            if added.done():
                return
            if isinstance(result, BaseException):
                added.set_exception(result)
            else:
                added.set_result(result)

        def on_added(result: list[str] | BaseException) -> None:  # on the engine thread
            try:
                aloop.call_soon_threadsafe(resolve, result)
            except RuntimeError:  # the event loop is gone: nobody will read these requests
                if not isinstance(result, BaseException):
                    for rid in result:
                        self.loop.abort(rid, wait=False)

        self.loop.enqueue(list(prompts), params, [gen._sink(i) for i in range(len(prompts))],
                          on_added)
        try:
            gen.request_ids = await asyncio.shield(added)
        except asyncio.CancelledError:
            # Cancelled while the engine thread had not taken the requests yet: abort them
            # as soon as they exist instead of leaving them to run unobserved.
            def late(fut: asyncio.Future) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    gen.request_ids = fut.result()
                    gen.abort()

            added.add_done_callback(late)
            raise
        return gen

    async def generate(self, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Every output of one prompt's request (all its samples), as they come."""
        gen = await self.submit([prompt_ids], params)
        try:
            async for _, out in gen:
                yield out
        finally:
            gen.abort()  # closed early or cancelled: an inner async for is not closed for us
