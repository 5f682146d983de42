"""The API process: ``create_app()`` builds the FastAPI app; never imports torch.

    uvicorn --factory service.main:create_app --host 127.0.0.1 --port 8000

Requests are checked here (images with Pillow, labels and options against the model's registry
entry), images go to the store's upload area, jobs to Redis; workers do the tensor work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from redis import Redis

from models.store.store import Store
from service import errors
from service.guard import RequestGuard
from service.routes import aliases, edits, health, registry, versions
from service.settings import ApiSettings
from workers import settings as S
from workers.client import JobClient, reap_dead_jobs

log = logging.getLogger(__name__)


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
    app.state.store = Store(settings.store)
    app.state.jobs = JobClient(redis)
    watchdog = asyncio.create_task(_watchdog(redis))
    log.info(
        "API ready: store %s, redis %s, auth %s",
        settings.store,
        settings.redis_url,
        "on" if settings.keys else "off",
    )
    try:
        yield
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        redis.close()


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    app = FastAPI(
        title="vitedit",
        version="1",
        lifespan=lifespan,
        description="Repair the mistakes of a pretrained ViT: submit failure images and "
        "their labels, get back a versioned sparse patch and a report.",
    )
    app.state.settings = settings = settings or ApiSettings()
    errors.install(app)
    app.add_middleware(RequestGuard, settings=settings)  # API key and size, before the body
    for module in (edits, registry, versions, aliases):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    app.include_router(health.router)
    return app
