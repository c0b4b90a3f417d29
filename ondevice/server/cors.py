"""Cross-origin access for web pages the user chose (``ondevice serve --cors-origin``).

By default the server sends no CORS headers at all: a page on another origin can neither read
replies nor pass a preflight, so no web site a user happens to visit can drive the local
model. Naming origins opens the server to exactly those pages (a web app on
``https://app.example`` or a dev server on ``http://localhost:5173``): their preflights get
the headers that let the real request through, and their replies carry
``Access-Control-Allow-Origin``. Any other origin gets no CORS headers, and its preflight a
403, so the browser keeps that page out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

log = logging.getLogger("ondevice.server")

ALLOWED_METHODS = "GET, POST, OPTIONS"
MAX_AGE_SECONDS = 600
"""How long a browser may cache a successful preflight."""


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, as browsers send it in ``Origin``; ``*``
    stays ``*``. Raises ``ValueError`` for anything else (a path, a missing scheme), so a
    typo in ``--cors-origin`` fails at start-up instead of silently matching nothing."""
    origin = origin.strip()
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or \
            parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a CORS origin is scheme://host[:port] (e.g. http://localhost:5173) "
                         f"or '*', got {origin!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


class CORSGuard:
    """ASGI middleware answering CORS preflights and tagging replies for allowed origins.

    ``origins``: allowed origins (``"*"``: any). Empty: the middleware does nothing, which is
    the server's default (no CORS).
    """

    def __init__(self, app, origins: Iterable[str] = ()):
        self.app = app
        allowed = {normalize_origin(o) for o in origins}
        self.any_origin = "*" in allowed
        self.origins = frozenset(allowed - {"*"})

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not (self.any_origin or self.origins):
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers", ())}
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin:  # not a cross-origin browser request
            await self.app(scope, receive, send)
            return
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if preflight:
            await self._preflight(origin, headers, send)
            return
        if not self.allows(origin):
            await self.app(scope, receive, send)  # no CORS headers: the browser hides the reply
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()),
                                      *self._origin_headers(origin)]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _origin_headers(origin: str) -> list[tuple[bytes, bytes]]:
        # The origin itself rather than "*", so that Vary: Origin keeps caches per origin.
        return [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin")]

    async def _preflight(self, origin: str, headers: dict[bytes, bytes], send) -> None:
        method = headers.get(b"access-control-request-method", b"").decode("latin-1").upper()
        if not self.allows(origin) or method not in ("GET", "POST"):
            shown = origin if len(origin) <= 80 else origin[:77] + "..."
            why = (f"the origin {shown!r} is not allowed; start the server with "
                   f"--cors-origin {shown} to allow it") if not self.allows(origin) else \
                f"the method {method!r} is not allowed (GET, POST)"
            log.info("CORS preflight refused: %s", why)
            body = json.dumps({"error": {"message": why, "type": "invalid_request_error",
                                         "param": None, "code": "cors_not_allowed"}}).encode()
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": body})
            return
        out = self._origin_headers(origin) + [
            (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
            (b"access-control-max-age", str(MAX_AGE_SECONDS).encode()),
            (b"content-length", b"0"),
        ]
        requested = headers.get(b"access-control-request-headers")
        if requested:
            # The page's own headers (Authorization, Content-Type, an SDK's X-... headers):
            # an origin the user allowed may send what it likes, the checks behind still run.
            out.append((b"access-control-allow-headers", requested))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})
