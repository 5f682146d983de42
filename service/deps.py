"""Request dependencies as ``Annotated`` aliases: settings, store, job client, API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from models.errors import Unauthorized
from models.store.store import Store
from service.settings import ApiSettings
from workers.client import JobClient


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_jobs(request: Request) -> JobClient:
    return request.app.state.jobs


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobClient, Depends(get_jobs)]


def require_api_key(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Enforce ``Authorization: Bearer <key>`` when ``VITEDIT_API_KEYS`` is set."""
    keys = settings.keys
    if not keys:
        return
    if not authorized(keys, authorization):
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")


def authorized(keys: frozenset[str], authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries one of ``keys`` (compared in constant time,
    as bytes: a header may hold any character)."""
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode("utf-8", "surrogatepass")
    return scheme.lower() == "bearer" and any(
        hmac.compare_digest(given, k.encode("utf-8")) for k in keys
    )
