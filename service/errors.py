"""Every error answer of the API: one status table (``models.errors.STATUS``), one JSON shape.

The body is always ``{"detail": <what went wrong and what to do>, "error": <its name>}`` (plus
``errors``, the per-field list, for a request FastAPI could not parse): for our named errors, for
FastAPI's own 404/405/422, for an unreachable Redis, and for anything unexpected (500).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from models.errors import VitEditError, quoted, status_of
from service.schemas import ErrorPublic
from workers.client import QueueUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 or 429 answer suggests to wait

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
"""The methods a 405 answer's ``Allow`` header may list."""

HTTP_NAMES = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "TooLarge",
    401: "Unauthorized",
}
"""The ``error`` of FastAPI's and Starlette's own HTTP errors (else ``HTTPError``)."""


def error_response(
    status: int, detail: str, error: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"detail": detail, "error": error, **extra}
    return JSONResponse(body, status_code=status, headers=_headers(status, headers))


def _headers(status: int, headers: dict[str, str] | None) -> dict[str, str] | None:
    out = dict(headers or {})
    if status == 401:
        out.setdefault("WWW-Authenticate", "Bearer")
    if status in (429, 503):
        out.setdefault("Retry-After", str(RETRY_AFTER_S))
    return out or None


# an absolute path of this host in a message: a '/' that starts a word (not a URL's, an API
# route's, a relative path's), with one more '/' after it
_PATH = re.compile(r"(?<![\w.:/~-])/(?!v1/|docs|redoc)[^\s'\"()\[\],;/]+/[^\s'\"()\[\],;]+")


def store_keys(text: str, roots: tuple[str, ...]) -> str:
    """Paths under a store root as store keys (``models/m/versions/v/manifest.json``: the same
    on every host, and no folder of this one)."""
    for root in roots:
        text = text.replace(f"{root.rstrip('/')}/", "")
    return text


def without_paths(text: str, roots: tuple[str, ...] = ()) -> str:
    """An error message with this host's filesystem paths taken out: those under a store root
    become store keys, any other absolute path ``<server path>``. The log keeps it whole."""
    return _PATH.sub("<server path>", store_keys(text, roots))


def _roots(request: Request) -> tuple[str, ...]:
    root = getattr(getattr(request.app.state, "store", None), "root", None)
    if root is None:
        return ()
    return tuple(dict.fromkeys((str(Path(root).resolve()), str(root))))


async def _named_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(type(exc))
    if status >= 500:
        log.error("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    retry = getattr(exc, "retry_after_s", None)  # e.g. a tenant's job limit (workers/quotas.py)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    # no folder of this host in a body: a 4xx quotes what was sent (left whole, but store
    # paths), a 5xx our own message, which may name any file
    scrub = without_paths if status >= 500 else store_keys
    detail = scrub(str(exc), _roots(request))
    return error_response(status, detail, type(exc).__name__, headers=headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("Redis unavailable: %s", exc)
    error = QueueUnavailable(f"the job queue (Redis) is unavailable ({exc}); retry later")
    return await _named_error(request, error)


def describe(errors: list[dict[str, Any]]) -> str:
    """FastAPI's per-field errors as one sentence: ``field 'label': Field required; ...``
    (a body field: a form field or a JSON key, by the route)."""
    where = {"body": "field", "query": "query parameter", "path": "path parameter"}
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        place = where.get(loc[0], loc[0]) if loc else "request"
        name = ".".join(loc[1:])
        shown = quoted(name)  # a field name is the client's text (an unknown form field's too)
        parts.append(f"{place} {shown}: {e.get('msg', 'invalid')}" if name else e.get("msg", ""))
    return "; ".join(parts) or "the request is malformed"


def _cut(text: str, limit: int = 100) -> str:
    """A field name as the answer's ``errors`` lists it: the client's text, cut to ``limit``."""
    return text if len(text) <= limit else f"{text[:limit]}..."


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = [
        {
            "loc": [_cut(str(x)) for x in e.get("loc", ())],
            "msg": str(e.get("msg")),
            "type": e.get("type"),
        }
        for e in exc.errors()
    ]
    detail = f"{describe(list(exc.errors()))}; see the endpoint in /docs"
    return error_response(422, detail, "Invalid", errors=fields)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = str(exc.detail)
    if exc.status_code == 400:  # FastAPI: a JSON or multipart body it cannot parse
        detail = f"{detail}: send the body /docs describes for {quoted(request.url.path, 200)}"
    elif exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {quoted(request.url.path, 200)}; the API is described at /docs"
    headers = exc.headers
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        path = quoted(request.url.path, 200)
        detail = f"{request.method} is not allowed on {path} (allowed: {allowed})"
        headers = {**(headers or {}), "Allow": allowed}
    name = HTTP_NAMES.get(exc.status_code, "HTTPError")
    return error_response(exc.status_code, detail, name, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first
    matching route's (``Allow: PUT`` where DELETE is served too)."""
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s -> 500", request.method, request.url.path)
    return error_response(
        500,
        f"internal error ({type(exc).__name__}); nothing was changed by it. "
        "Retry, and report it if it persists",
        "InternalError",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(VitEditError, _named_error)
    app.add_exception_handler(RedisError, _redis_down)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorPublic, "description": text}
    for status, text in {
        400: "the body cannot be parsed (not UTF-8 JSON, or broken multipart)",
        401: "no valid API key (when the server has keys)",
        413: "too many bytes, pixels or images",
        429: "this API key's request rate, or its tenant's queued + running jobs, is at its "
        "limit; retry after `Retry-After` seconds",
        422: "a field, an option or a file is invalid; `detail` says which and how to fix it",
        500: "an internal fault",
        503: "the queue or the workers are unavailable; retry after `Retry-After` seconds",
    }.items()
}
"""Responses every ``/v1`` route may give (routes add their own 403, 404, 409, 504)."""


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's own error statuses, with their meaning."""
    text = {
        403: "this API key's tenant may not do this (registering models: VITEDIT_ADMIN_TENANTS)",
        404: "no such model, version, alias or job",
        409: "the request clashes with the current state (reused key, job already ended)",
        504: "no worker finished the short job in time; retry later",
    }
    return {s: {"model": ErrorPublic, "description": text[s]} for s in statuses}
