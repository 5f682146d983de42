"""A worker killed mid-job (SIGKILL) leaves its job failed within about a minute, with a reason,
and no version of it is ever visible."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from service.main import create_app
from service.settings import ApiSettings
from tests.redis_server import db_url, png, tiny_store, wait_for, worker_process
from workers import settings as S

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_killed_worker_leaves_its_job_failed_and_no_version(redis_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    url = db_url(redis_url, 3)
    store = tiny_store(tmp_path)
    app = create_app(ApiSettings(redis_url=url, store=store.root, max_steps_limit=10_000))
    with TestClient(app) as client, worker_process(url, store.root) as worker:
        form = {
            "label": "1",
            "model": "tiny",
            "lr": "1e-9",
            "max_steps": "10000",
            "options": '{"stop_loss": 0}',
        }
        job = client.post(
            "/v1/edits", data=form, files=[("images", ("a.png", png(1), "image/png"))]
        ).json()["id"]

        def optimizing() -> bool:
            body = client.get(f"/v1/edits/{job}").json()
            return body["status"] == "running" and (body["step"] or 0) > 0

        assert wait_for(optimizing, 60)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed_at = time.monotonic()
        limit = S.HEARTBEAT_TTL_S + 2 * S.WATCHDOG_INTERVAL_S + 10
        assert wait_for(
            lambda: client.get(f"/v1/edits/{job}").json()["status"] == "failed", limit, poll_s=1.0
        )
        elapsed = time.monotonic() - killed_at
        body = client.get(f"/v1/edits/{job}").json()
        assert "worker running this job stopped" in body["error"]
        assert body["version"] is None
        assert client.get("/v1/models/tiny/versions").json()["versions"] == []
        assert elapsed <= 60 + 15, elapsed
