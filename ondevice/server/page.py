"""The chat page at ``/``: three static files shipped in the package (no build step, no CDN).

The page is same-origin with the API it calls, so it needs no CORS. Its Content-Security-
Policy allows only this server's own scripts, styles and connections: text a model writes
is put into the page as text, and even markup slipped in some other way could not load or
send anything elsewhere.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FILES = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=SECURITY_HEADERS)


async def index(request: Request) -> Response:
    return _file("index.html")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in FILES:  # a fixed list: no path from the URL ever reaches the file system
        return Response("not found", status_code=404, media_type="text/plain")
    return _file(name)


def page_routes() -> list[Route]:
    """``GET /`` (the chat page) and ``GET /static/{name}`` (its script and style)."""
    return [Route("/", index, methods=["GET", "HEAD"]),
            Route("/static/{name}", static, methods=["GET", "HEAD"])]
