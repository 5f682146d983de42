"""``/healthz`` (the process answers) and ``/readyz`` (Redis reachable, the store's S3 bucket
reachable when it has one, a worker alive; the models a worker failed to load are listed, but do
not make the service unready).

When the server has API keys, ``/readyz`` answers everyone (a probe sends no key) but names workers,
models and the Redis error only to a caller with a valid key; others get the status alone."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from models.errors import StoreUnavailable
from models.store.store import Store
from service.guard import caller_of
from service.schemas import HealthPublic
from workers.client import JobClient

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(request: Request) -> HealthPublic | JSONResponse:
    jobs: JobClient = request.app.state.jobs
    body = _readiness(jobs, request.app.state.store)
    if caller_of(request.scope) is None:  # keys configured, none valid sent: the status only
        body = HealthPublic(
            status=body.status,
            redis=body.redis,
            store=body.store,
            detail="send 'Authorization: Bearer <key>' to see the workers and models",
        )
    if body.status != "ok":
        return JSONResponse(body.model_dump(), status_code=503)
    return body


def _readiness(jobs: JobClient, store: Store) -> HealthPublic:
    try:
        jobs.ping()
        workers = jobs.live_workers()
        broken = jobs.unavailable_models()
    except RedisError as exc:
        return HealthPublic(status="unavailable", redis=False, detail=f"Redis unreachable: {exc}")
    if store.remote is not None:
        try:
            store.remote.check()
        except StoreUnavailable as exc:
            return HealthPublic(status="unavailable", redis=True, store=False, detail=str(exc))
    if not workers:
        return HealthPublic(
            status="unavailable",
            redis=True,
            workers=[],
            detail="no worker alive: start one with `python -m workers.main`",
        )
    detail = (
        "models that failed to load: " + "; ".join(f"{m}: {why}" for m, why in broken.items())
        if broken
        else None
    )
    return HealthPublic(
        status="ok", redis=True, workers=workers, unavailable_models=broken, detail=detail
    )
