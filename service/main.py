"""The API process: ``create_app()`` builds the FastAPI app; never imports torch.

    uvicorn --factory service.main:create_app --host 127.0.0.1 --port 8000

Requests are checked here (images with Pillow, labels and options against the model's registry
entry), images go to the store's upload area, jobs to Redis; workers do the tensor work.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from redis import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from models.store.remote import one_snapshot
from service import errors, metrics
from service.guard import RequestGuard
from service.ratelimit import RateLimiter
from service.routes import aliases, edits, health, registry, review, versions
from service.settings import ApiSettings
from service.tenants import Keyring
from workers import settings as S
from workers.client import JobClient, reap_dead_jobs

log = logging.getLogger(__name__)

DOCS_STATIC = "/docs-static"
"""Swagger UI and ReDoc files, served from the ``fastapi-offline`` package: /docs works offline."""


async def _watchdog(redis: Redis) -> None:
    """Fail the jobs of dead workers (expired heartbeat) every WATCHDOG_INTERVAL_S seconds."""
    while True:
        try:
            await asyncio.to_thread(reap_dead_jobs, redis)
        except Exception:  # keep watching whatever one round hit
            log.exception("watchdog round failed")
        await asyncio.sleep(S.WATCHDOG_INTERVAL_S)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ApiSettings = app.state.settings
    redis = Redis.from_url(settings.redis_url)
    app.state.store = settings.open_store()
    app.state.jobs = JobClient(redis)
    limiter: RateLimiter = app.state.limiter
    await limiter.open()
    watchdog = asyncio.create_task(_watchdog(redis))
    log.info(
        "API ready: store %s, redis %s, auth %s",
        settings.store,
        settings.redis_url,
        f"on (tenants {', '.join(app.state.keyring.tenants)})" if app.state.keyring.on else "off",
    )
    try:
        yield
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await limiter.close()
        redis.close()


class OneSnapshotPerRequest:
    """Each request reads an S3 store's JSON indexes (models.json, alias files) once, however
    often it looks, and sees one snapshot of them (``models/store/remote.py``, one_snapshot)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with one_snapshot():
            await self.app(scope, receive, send)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    app = FastAPI(
        title="vitedit",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load Swagger UI and ReDoc from a CDN
        redoc_url=None,
        description="Repair the mistakes of a pretrained ViT: submit failure images and "
        "their labels, get back a versioned sparse patch and a report.",
    )
    app.state.settings = settings = settings or ApiSettings()
    errors.install(app)
    app.state.keyring = keyring = Keyring.from_settings(settings)  # ValueError: bad keys
    app.state.limiter = limiter = RateLimiter(settings.redis_url)
    app.add_middleware(OneSnapshotPerRequest)  # an S3 store's indexes: read once a request
    # API key, its rate and the body size, before the body is read
    app.add_middleware(RequestGuard, settings=settings, keyring=keyring, limiter=limiter)
    metrics.install(app)  # /metrics; counts every request, the guard's answers too
    for module in (edits, registry, versions, review, aliases):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    app.include_router(health.router)
    _install_docs(app)
    # Build the OpenAPI schema here, in the one thread that builds the app. FastAPI builds each
    # route's parameter fields lazily (for the schema or the route's first request) and silences
    # a pydantic warning there with warnings.catch_warnings(), whose save and restore of the
    # process-wide filters is not thread-safe: first requests on two threads at once let
    # "UnsupportedFieldAttributeWarning: The 'alias' attribute ..." through (two test apps did).
    # The schema build builds every route's fields once; it also fails here, not on a request.
    app.openapi()
    return app


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from files this package serves itself, no outside host."""
    static = importlib.resources.files("fastapi_offline") / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=str(static)), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title="vitedit API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title="vitedit API",
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )
