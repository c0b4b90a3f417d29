"""Thread-safe synchronous and asyncio fronts over one :class:`Engine`.

One background thread owns the engine and steps it while there is work; callers submit
requests from any thread and read their outputs from a queue. Closing a stream early (or a
dropped client) aborts its request, and its KV blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..sampling import SamplingParams
from .engine import Engine
from .request import RequestOutput

_DONE = object()


class EngineLoop:
    """Runs ``engine.step()`` on a daemon thread. Every engine access goes through it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._todo: list[Callable[[], None]] = []  # calls to run on the engine thread
        self._sinks: dict[str, Callable[[Any], None]] = {}
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="ondevice-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Any], None]) -> str:
        """Queue a request; ``sink`` receives each RequestOutput, then ``_DONE`` or an
        exception. Invalid requests raise here, in the caller's thread."""
        self.engine.validate(prompt_ids, params)  # reads only immutable limits
        result: dict[str, Any] = {}
        ready = threading.Event()

        def add() -> None:
            try:
                rid = self.engine.add_request(prompt_ids, params)
                self._sinks[rid] = sink
                result["rid"] = rid
            except Exception as err:  # noqa: BLE001  (handed back to the caller)
                result["err"] = err
            ready.set()

        self.call(add, wait=False)
        ready.wait()
        if "err" in result:
            raise result["err"]
        return result["rid"]

    def abort(self, request_id: str, wait: bool = True) -> None:
        """Abort a request; with ``wait`` its blocks are free when this returns."""

        def do() -> None:
            self.engine.abort(request_id)
            self._sinks.pop(request_id, None)

        self.call(do, wait=wait)

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
                raise RuntimeError("the engine is shut down")
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
                if self._closed:
                    for rid in list(engine.requests):
                        engine.abort(rid)
                    for sink in self._sinks.values():
                        sink(_DONE)
                    self._idle.set()
                    return
                todo, self._todo = self._todo, []
            for fn in todo:
                fn()
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


class AsyncEngine:
    """``async for out in engine.generate(...)`` front for asyncio servers."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    async def generate(self, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = await aloop.run_in_executor(
            None, self.loop.submit, prompt_ids, params,
            lambda item: aloop.call_soon_threadsafe(q.put_nowait, item))
        finished = False
        try:
            while True:
                item = await q.get()
                finished = True  # until the item turns out to be an output
                out = _unwrap(item)
                if out is None:
                    return
                finished = False
                yield out
        finally:
            if not finished:  # cancelled or dropped client: do not block the event loop
                self.loop.abort(rid, wait=False)
