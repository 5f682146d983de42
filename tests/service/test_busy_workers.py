"""A predict never waits behind a long edit: when every worker is running an edit, the API answers
503 with Retry-After at once (instead of holding a thread until its timeout); once a worker is
free, predict runs again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.redis_server import db_url, png, tiny_store, wait_for, worker_process

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from tests.service.conftest import api

    url = db_url(redis_url, 9)
    store = tiny_store(tmp_path_factory.mktemp("busy"))
    settings = {"max_steps_limit": 10_000, "predict_timeout_s": 20}
    with worker_process(url, store.root), api(url, store.root, **settings) as test_client:
        yield test_client


def predict(client: TestClient) -> tuple[int, dict, float]:
    start = time.monotonic()
    files = [("images", ("x.png", png(4), "image/png"))]
    r = client.post("/v1/models/tiny/versions/base/predict", files=files)
    return r.status_code, r.headers, time.monotonic() - start


def test_predict_is_refused_at_once_while_every_worker_runs_an_edit(
    client: TestClient, tmp_path: Path
) -> None:
    assert predict(client)[0] == 200
    form = {"label": "1", "model": "tiny", "lr": "1e-9", "max_steps": "10000"}
    form["options"] = '{"stop_loss": 0}'
    files = [("images", ("a.png", png(1), "image/png"))]
    job = client.post("/v1/edits", data=form, files=files).json()["id"]
    assert wait_for(lambda: (client.get(f"/v1/edits/{job}").json()["step"] or 0) > 0, 60)
    status, headers, took = predict(client)
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert took < 2, took
    client.post(f"/v1/edits/{job}/cancel")
    assert wait_for(lambda: client.get(f"/v1/edits/{job}").json()["status"] == "canceled", 30)
    assert predict(client)[0] == 200
