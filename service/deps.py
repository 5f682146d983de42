"""Request dependencies as ``Annotated`` aliases: settings, store, job client.

The API key is checked before the body is read, by :mod:`service.guard`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

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
