"""Fixtures of the API tests: a real redis-server, the tiny model in a store, a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from safetensors.numpy import save_file

from models.store.manifest import VersionManifest, utc_now
from models.store.store import PATCH_FILE, Store
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


def commit_version(
    store: Store,
    review: dict[str, Any] | None = None,
    parent: str | None = None,
    rejected: str | None = None,
) -> str:
    """A version of ``tiny`` committed straight to the store, without an edit: a one-entry patch
    and a small report, and no ``review`` (as stored before review figures existed). With
    ``rejected`` (a reason): stored as its acceptance gate stores a rejected version."""
    with store.begin_version("tiny") as draft:
        save_file({"x": np.zeros(1, np.float32)}, str(draft.dir / PATCH_FILE))
        report: dict[str, Any] = {
            "metrics": {"SR": 1.0},
            "before": {"SR": 0.0},
            "retention": {"per_version": {}, "min": None},
            "edit_predictions": {"before": [1], "after": [3], "targets": [3]},
            "edit": {"steps": 4},
        }
        manifest = VersionManifest(
            version=draft.version,
            model="tiny",
            parent=parent,
            backbone={},
            method="ft",
            config={},
            hypernetwork=None,
            sites={},
            patch=[],
            files={},
            images=[],
            report=report,
            created_at=utc_now(),
            code_version="test",
            review=review or {},
            **({"status": "rejected", "reason": rejected} if rejected else {}),
        )
        return draft.commit(manifest).version
