"""Checks that run before a request's body is read: the API key, its rate, the body size.

FastAPI parses a multipart body before it runs a route's dependencies, so an API-key dependency
would answer 401 only after a 60 MB upload had been read (and spooled to disk). This plain ASGI
middleware answers 401 (no valid key on a ``/v1`` route), 429 (the key's request rate, with
Retry-After) and 413 (``Content-Length`` above the limit) from the headers alone, and stops a body
sent without a length once it passes the limit. It records the caller (tenant, key, limits) in the
request scope for the routes (:func:`caller_of`); ``/readyz`` and the docs stay open, and see the
caller only if a valid key is sent.
"""

from __future__ import annotations

import math

from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.ratelimit import RateLimiter
from service.settings import ApiSettings
from service.tenants import ANONYMOUS, Caller, Keyring

PROTECTED_PREFIX = "/v1/"  # /healthz, /readyz and the docs stay open
CALLER = "vitedit.caller"
"""The scope entry the guard writes: the request's :class:`Caller`, or None (no valid key)."""


def caller_of(scope: Scope) -> Caller | None:
    """Who sent the request (set by the guard); None on an open route without a valid key."""
    return scope.get(CALLER)


class RequestGuard:
    """API key, rate and body size, checked before the app reads the body."""

    def __init__(
        self, app: ASGIApp, settings: ApiSettings, keyring: Keyring, limiter: RateLimiter
    ) -> None:
        self.app, self.limit = app, settings.max_body_bytes
        self.model_limit = settings.max_model_bytes  # POST /v1/models: a model's files
        self.keyring, self.limiter = keyring, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        caller = (
            self.keyring.authenticate(headers.get("authorization"))
            if self.keyring.on
            else ANONYMOUS
        )
        scope[CALLER] = caller
        protected = scope["path"].startswith(PROTECTED_PREFIX)
        if protected and caller is None:
            response = error_response(
                401,
                "this server needs an API key: send 'Authorization: Bearer <key>'",
                "Unauthorized",
            )
            await response(scope, receive, send)
            return
        if protected and caller is not None and caller.key_id is not None:
            refused = await self._rate(caller)
            if refused is not None:
                await refused(scope, receive, send)
                return
        limit = self.limit
        if scope["path"].rstrip("/") == "/v1/models" and scope["method"] == "POST":
            limit = self.model_limit
        length = headers.get("content-length", "")
        # a length of more digits than any limit has is too large (int() of thousands raises)
        if length.isdigit() and (len(length) > 19 or int(length) > limit):
            declared = length if len(length) <= 19 else f"a {len(length)}-digit number of"
            await self._too_large(declared, limit)(scope, receive, send)
            return
        await self.app(scope, receive if length else self._counted(receive, limit), send)

    async def _rate(self, caller: Caller) -> JSONResponse | None:
        """None if the key may send this request; else its 429 (or 503: Redis is down)."""
        assert caller.key_id is not None
        limits = caller.limits
        try:
            wait = await self.limiter.take(caller.key_id, limits.rate_per_s, limits.rate_burst)
        except RedisError as exc:
            return error_response(
                503,
                f"the rate limiter's Redis is unavailable ({type(exc).__name__}); retry later",
                "QueueUnavailable",
            )
        if wait <= 0:
            return None
        return error_response(
            429,
            f"this API key sent more than {limits.rate_burst} requests at once or "
            f"{limits.rate_per_s:g} per second on average; retry after the Retry-After seconds",
            "RateLimited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _too_large(self, size: int | str, limit: int) -> JSONResponse:
        return error_response(
            413,
            f"the request body has {size} bytes, more than the {limit} this server "
            "accepts; send fewer or smaller files",
            "TooLarge",
        )

    def _counted(self, receive: Receive, limit: int) -> Receive:
        """``receive`` for a body of unknown length: 413 once it passes the limit."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(
                    413,
                    f"the request body is larger than the {limit} bytes this "
                    "server accepts; send fewer or smaller files",
                )
            return message

        return counted
