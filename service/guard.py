"""Checks that run before a request's body is read: the API key and the body size.

FastAPI parses a multipart body before it runs a route's dependencies, so an API-key dependency
would answer 401 only after a 60 MB upload had been read (and spooled to disk). This plain ASGI
middleware answers 401 (no valid key on a ``/v1`` route) and 413 (``Content-Length`` above the
limit) from the headers alone, and stops a body sent without a length once it passes the limit.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.settings import ApiSettings

PROTECTED_PREFIX = "/v1/"  # /healthz, /readyz and the docs stay open


def authorized(keys: frozenset[str], authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries one of ``keys`` (compared in constant time,
    as bytes: a header may hold any character)."""
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode("utf-8", "surrogatepass")
    return scheme.lower() == "bearer" and any(
        hmac.compare_digest(given, k.encode("utf-8")) for k in keys
    )


class RequestGuard:
    """API key and body size, checked before the app reads the body."""

    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        self.app, self.keys, self.limit = app, settings.keys, settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        protected = self.keys and scope["path"].startswith(PROTECTED_PREFIX)
        if protected and not authorized(self.keys, headers.get("authorization")):
            response = error_response(
                401,
                "this server needs an API key: send 'Authorization: Bearer <key>'",
                "Unauthorized",
            )
            await response(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(int(length))(scope, receive, send)
            return
        await self.app(scope, receive if length else self._counted(receive), send)

    def _too_large(self, size: int) -> JSONResponse:
        return error_response(
            413,
            f"the request body has {size} bytes, more than the {self.limit} this server "
            "accepts; send fewer or smaller images",
            "TooLarge",
        )

    def _counted(self, receive: Receive) -> Receive:
        """``receive`` for a body of unknown length: 413 once it passes the limit."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(
                    413,
                    f"the request body is larger than the {self.limit} bytes this "
                    "server accepts; send fewer or smaller images",
                )
            return message

        return counted
