"""Request dependencies as ``Annotated`` aliases: settings, store, job client.

The API key is checked before the body is read, by :mod:`service.guard`, which records the
caller; the store and the job client a route gets are scoped to the caller's tenant (its own
versions, aliases, jobs and Idempotency-Keys: another tenant's read as unknown, 404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.errors import Unauthorized
from models.store.store import Store
from service.guard import caller_of
from service.settings import ApiSettings
from service.tenants import Caller
from workers.client import JobClient


# async: FastAPI runs a plain ``def`` dependency in the threadpool, one thread hop each (three
# per request here); these only read app state, so they run on the event loop.
async def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def caller(request: Request) -> Caller:
    """The caller the guard recorded (401 if none: an open route must not ask for it)."""
    found = caller_of(request.scope)
    if found is None:  # the guard refused it on /v1
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    return found


async def get_caller(request: Request) -> Caller:
    return caller(request)


async def get_store(request: Request) -> Store:
    return request.app.state.store.scoped(caller(request).tenant)


async def get_jobs(request: Request) -> JobClient:
    return request.app.state.jobs.scoped(caller(request).tenant)


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
CallerDep = Annotated[Caller, Depends(get_caller)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobClient, Depends(get_jobs)]
