"""Map the named errors of the store, the queue and the request checks to HTTP statuses.

Every error answer is ``{"detail": <actionable message>, "error": <error class name>}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from models.errors import (
    DataError,
    EditConfigError,
    IntegrityError,
    ManifestError,
    StoreError,
    UnknownMethodError,
    UnknownModelError,
    UnknownVersionError,
    VitEditError,
)
from workers.client import (
    IdempotencyConflict,
    JobError,
    JobFailed,
    JobNotCancelable,
    JobNotFound,
    JobTimeout,
)

log = logging.getLogger(__name__)


class PayloadTooLarge(VitEditError):
    """An uploaded file, or the number of files, exceeds the configured limit."""


class Unauthorized(VitEditError):
    """API keys are configured and the request has no valid ``Authorization: Bearer`` header."""


STATUS: dict[type[Exception], int] = {
    UnknownModelError: 404,
    UnknownVersionError: 404,
    JobNotFound: 404,
    DataError: 422,
    EditConfigError: 422,
    UnknownMethodError: 422,
    StoreError: 422,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    IdempotencyConflict: 409,
    JobNotCancelable: 409,
    JobTimeout: 504,
    JobFailed: 500,
    IntegrityError: 500,
    ManifestError: 500,
}


def status_of(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def _named_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status >= 500:
        log.error("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"detail": str(exc), "error": type(exc).__name__}, status_code=status, headers=headers
    )


async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
    log.error("Redis unavailable: %s", exc)
    return JSONResponse(
        {
            "detail": f"the job queue (Redis) is unavailable: {exc}; retry later",
            "error": "QueueUnavailable",
        },
        status_code=503,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(VitEditError, _named_error)
    app.add_exception_handler(JobError, _named_error)
    app.add_exception_handler(RedisError, _redis_down)
