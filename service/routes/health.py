"""``/healthz`` (the process answers) and ``/readyz`` (Redis reachable, a worker alive; the
models a worker failed to load are listed, but do not make the service unready)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from service.deps import JobsDep
from service.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(jobs: JobsDep) -> HealthPublic | JSONResponse:
    try:
        jobs.ping()
        workers = jobs.live_workers()
        broken = jobs.unavailable_models()
    except RedisError as exc:
        body = HealthPublic(status="unavailable", redis=False, detail=f"Redis unreachable: {exc}")
        return JSONResponse(body.model_dump(), status_code=503)
    if not workers:
        body = HealthPublic(
            status="unavailable",
            redis=True,
            workers=[],
            detail="no worker alive: start one with `python -m workers.main`",
        )
        return JSONResponse(body.model_dump(), status_code=503)
    detail = (
        "models that failed to load: " + "; ".join(f"{m}: {why}" for m, why in broken.items())
        if broken
        else None
    )
    return HealthPublic(
        status="ok", redis=True, workers=workers, unavailable_models=broken, detail=detail
    )
