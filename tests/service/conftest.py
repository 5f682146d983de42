"""Fixtures of the API tests: a real redis-server, the tiny model in a store, a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from models.store.store import Store
from service.main import create_app
from service.settings import ApiSettings
from tests.redis_server import db_url, redis_url, tiny_store, worker_process  # noqa: F401
from workers.client import JobClient


@dataclass
class Served:
    client: TestClient
    store: Store
    jobs: JobClient
    redis_url: str


def api(url: str, store_root: Path, **settings: object) -> TestClient:
    return TestClient(create_app(ApiSettings(redis_url=url, store=store_root, **settings)))


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:  # noqa: F811
    """API + one real worker on the tiny model (redis db 1)."""
    url = db_url(redis_url, 1)
    store = tiny_store(tmp_path_factory.mktemp("served"))
    with worker_process(url, store.root), api(url, store.root, max_steps_limit=10_000) as client:
        yield Served(client, store, JobClient(Redis.from_url(url)), url)


@pytest.fixture(scope="module")
def idle(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:  # noqa: F811
    """API without any worker (redis db 2): what is enqueued stays visible in the queue."""
    url = db_url(redis_url, 2)
    store = tiny_store(tmp_path_factory.mktemp("idle"))
    with api(url, store.root, max_image_bytes=4096, max_images=4) as client:
        yield Served(client, store, JobClient(Redis.from_url(url)), url)
