"""Running the app with uvicorn: in the foreground (``ondevice serve``) or on a background
thread of an app that embeds the server in-process."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_QUEUE, OpenAIServer, create_app

log = logging.getLogger("ondevice.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
"""Seconds an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``)."""
DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send a complete request head (slowloris)."""


class _H11WithHeadTimeout(H11Protocol):
    """uvicorn's h11 protocol plus a request-head timeout. uvicorn times out idle
    keep-alive connections, but a client that sends a request head one byte at a time (or
    connects and sends nothing) would hold its connection forever."""

    head_timeout = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self.loop.call_later(self.head_timeout, self._head_timed_out, self.cycle)

    def _head_timed_out(self, cycle) -> None:
        # Still the cycle the timer was armed on, and it is not running a request: no
        # complete request head has arrived since.
        idle = cycle is None or cycle.response_complete
        if self.cycle is cycle and idle and not self.transport.is_closing():
            self.transport.close()


def _protocol(head_timeout: float) -> type[H11Protocol]:
    return type("H11Protocol", (_H11WithHeadTimeout,), {"head_timeout": head_timeout})


class _Uvicorn(uvicorn.Server):
    """uvicorn with a drain first: on shutdown (Ctrl-C, SIGTERM, ``should_exit``) new requests
    get 503, running ones get ``drain_timeout`` seconds to finish, the rest are aborted (a
    stream then ends with an error event, a plain request with a 503), and only then are the
    connections closed."""

    def __init__(self, config: uvicorn.Config, state: OpenAIServer | None, drain_timeout: float):
        super().__init__(config)
        self._state = state
        self._drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        if self._state is not None:
            await self._state.drain(self._drain_timeout, lambda: self.force_exit)
        await super().shutdown(sockets)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model=None, *, backend: str = "auto", host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, kv_memory: int | str | None = None,
          engine=None, options=None, max_queue: int = DEFAULT_MAX_QUEUE, api_key: str | None = None,
          model_name: str | None = None, drain_timeout: float = 30.0,
          log_level: str = "info", allowed_hosts: Sequence[str] = (),
          body_timeout: float = DEFAULT_BODY_TIMEOUT,
          keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
          header_timeout: float = DEFAULT_HEADER_TIMEOUT,
          cors_origins: Sequence[str] = ()) -> None:
    """Serve a model over the OpenAI API until Ctrl-C or SIGTERM (blocking).

    Args:
        model: an :class:`ondevice.Model` (used as it is, not closed), a model directory or
            ``.gguf`` file, or None for the embedded default model.
        backend, kv_memory, engine, options: as for :func:`ondevice.load` (ignored for a
            loaded model).
        host, port: where to listen; loopback only by default.
        max_queue: sequences that may wait beyond the running batch before 429.
        api_key: require ``Authorization: Bearer KEY`` (all routes but ``/health``).
        model_name: the id clients pass as ``"model"`` (default: the model's store name;
            the names of its store entry are accepted too).
        drain_timeout: seconds in-flight requests get to finish at shutdown.
        allowed_hosts: ``Host`` names accepted besides ``host``, localhost, 127.0.0.1 and
            ::1 (``"*"``: any); see :func:`create_app`.
        body_timeout: seconds a client has to send a request body (then 408).
        keep_alive_timeout: seconds an idle connection is kept open.
        header_timeout: seconds a connection has to send a complete request head.
        cors_origins: web origins whose pages may call the API (see :func:`create_app`);
            none by default.

    The address it serves at is logged (INFO) on the ``ondevice.server`` logger.
    """
    from ..api import Model, load
    from ..store import Store

    own = not isinstance(model, Model)
    m = load(model, backend, kv_memory=kv_memory, engine=engine, options=options) if own \
        else model
    try:
        # The bound name is accepted as a Host too (e.g. --host myhost.local).
        app = create_app(m, model_name=model_name, api_key=api_key, max_queue=max_queue,
                         allowed_hosts=(host, *allowed_hosts), body_timeout=body_timeout,
                         cors_origins=cors_origins)
        if not _is_loopback(host) and not api_key:
            log.warning("listening on %s without an API key: anyone who can reach this "
                        "address can use the model", host)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                lifespan="on", timeout_graceful_shutdown=5,
                                timeout_keep_alive=keep_alive_timeout,
                                http=_protocol(header_timeout))
        shown = f"[{host}]" if ":" in host else host
        log.info("serving %r (%s) at http://%s:%d/v1 (chat page: http://%s:%d/)",
                 app.state.ondevice.model_name, m.backend, shown, port, shown, port)
        if cors_origins:
            log.info("CORS: pages from %s may call the API", ", ".join(cors_origins))
        with Store().hold(m.path):  # `ondevice rm` refuses a model being served
            _Uvicorn(config, app.state.ondevice, drain_timeout).run()
    finally:
        if own:
            m.close()


class ServerThread:
    """Runs an ASGI app (usually from :func:`create_app`) with uvicorn on a daemon thread with
    its own event loop, for apps that embed the server in-process (and for tests)::

        with ServerThread(create_app(model)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

    ``port=0`` picks a free port; :attr:`url` tells which. :meth:`stop` drains like
    :func:`serve` does.
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, *,
                 drain_timeout: float = 10.0, log_level: str = "warning",
                 keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT):
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
        self.header_timeout = header_timeout
        self.host = host
        self.port = port
        self.drain_timeout = drain_timeout
        self.log_level = log_level
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Bind, start serving, and return once requests are accepted."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        # log_config=None: leave the host application's logging configuration alone.
        config = uvicorn.Config(self.app, log_level=self.log_level, log_config=None,
                                lifespan="on", timeout_graceful_shutdown=5,
                                timeout_keep_alive=self.keep_alive_timeout,
                                http=_protocol(self.header_timeout))
        state = getattr(getattr(self.app, "state", None), "ondevice", None)
        self._server = server = _Uvicorn(config, state, self.drain_timeout)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="ondevice-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float | None = None) -> None:
        """Shut down (drain, then close connections) and wait for the thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout if timeout is not None else self.drain_timeout + 30)
        self._server = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ServerThread", "serve"]
