"""A local OpenAI-compatible server on the continuous-batching engine.

``ondevice serve`` on the command line; from Python, :func:`serve` (blocking), or
:func:`create_app` for the ASGI app and :class:`ServerThread` to run it in-process::

    import ondevice, openai
    from ondevice.server import ServerThread, create_app

    model = ondevice.load()
    with ServerThread(create_app(model)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from .app import DEFAULT_MAX_QUEUE, OpenAIServer, create_app
from .protocol import APIError
from .runner import DEFAULT_HOST, DEFAULT_PORT, ServerThread, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_QUEUE", "DEFAULT_PORT", "APIError", "OpenAIServer",
           "ServerThread", "create_app", "serve"]
