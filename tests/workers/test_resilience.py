"""A worker outlives its Redis: when redis-server is killed under a running edit and comes back on
the same port, the worker reconnects (with backoff), reports the edit it lost and runs the next
job; it does not exit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis import Redis

from cli import launcher
from models.store.store import Store
from tests.redis_server import (
    kill_redis,
    own_redis,
    png,
    supervise_until,
    tiny_store,
    wait_for,
    worker_process,
)
from workers.client import JobClient, WorkersBusy
from workers.main import LOST_REDIS
from workers.payloads import EditPayload, JobImage, PredictPayload

pytestmark = pytest.mark.redis


def predict(jobs: JobClient, store: Store, seed: int, timeout_s: float = 60) -> dict:
    """A predict, retried while the API would answer 503 (the worker not back yet)."""
    upload, _ = store.new_upload()
    path = store.write_upload(upload, "p-000", png(seed))
    payload = PredictPayload(model="tiny", upload=upload, images=[path])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return jobs.run_short(payload, timeout_s=timeout_s)
        except WorkersBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def edit_payload(store: Store, seed: int, steps: int = 10_000) -> EditPayload:
    upload, _ = store.new_upload()
    path = store.write_upload(upload, "edit-000", png(seed))
    return EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=path, target=1)],
        method="ft",
        options={"lr": 1e-9, "max_steps": steps, "stop_loss": 0},
    )


def test_worker_survives_redis_dying_under_a_running_edit(tmp_path: Path) -> None:
    """The edit cut off by the outage is reported; the same worker process runs the next job."""
    store = tiny_store(tmp_path)
    with own_redis(tmp_path / "redis") as (group, url), worker_process(url, store.root) as worker:
        jobs = JobClient(Redis.from_url(url))
        job = jobs.submit_edit(edit_payload(store, 1)).id
        assert wait_for(lambda: (jobs.view(job).step or 0) > 0, 60)
        kill_redis(group)
        time.sleep(2)  # down while the edit writes its progress
        supervise_until(group, lambda: launcher.redis_ready(url), 20)
        back = time.monotonic()
        assert predict(jobs, store, 2)["predictions"]
        took = time.monotonic() - back
        assert worker.poll() is None
        assert wait_for(lambda: jobs.fetch(job).meta.get("error") == LOST_REDIS, 10)
    print(f"first job after the Redis restart answered in {took:.1f} s")
