"""Housekeeping shared by the workers: the reaper runs in one process at a time (a Redis lock),
uploads of jobs that will never run are swept by age, and the retention-token cache is bounded."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus

from tests.redis_server import db_url, tiny_store
from tests.workers.test_runtime import edit_once
from workers import housekeeping as H
from workers.client import REAPER_LOCK, JobClient, JobState, reap_dead_jobs
from workers.payloads import EditPayload, JobImage
from workers.runtime import Runtime
from workers.settings import WorkerSettings

pytestmark = pytest.mark.redis


def payload(upload: str) -> EditPayload:
    return EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=f"uploads/{upload}/edit-000", target=1)],
        method="ft",
    )


def started_without_heartbeat(jobs: JobClient, upload: str = "u0") -> str:
    """A job that a worker took a minute ago and then died with (no heartbeat key)."""
    job = jobs.edits.enqueue_call(
        "workers.jobs.edit", args=(payload(upload).model_dump(mode="json"),), timeout=60
    )
    jobs.edits.remove(job)
    job.set_status(JobStatus.STARTED)
    job.started_at = datetime.now(UTC) - timedelta(seconds=60)
    job.save()
    registry = jobs.edits.started_job_registry
    jobs.redis.zadd(registry.key, {f"{job.id}:x1": time.time() + 600})
    return job.id


def test_reaper_waits_while_another_process_holds_its_lock(redis_url: str) -> None:
    redis = Redis.from_url(db_url(redis_url, 5))
    jobs = JobClient(redis)
    job = started_without_heartbeat(jobs)
    lock = redis.lock(REAPER_LOCK, timeout=60)
    assert lock.acquire(blocking=False)
    assert reap_dead_jobs(redis) == []  # another process is reaping: leave it alone
    assert jobs.view(job).state == JobState.RUNNING
    lock.release()
    assert reap_dead_jobs(redis) == [job]
    assert jobs.view(job).state == JobState.FAILED


def old(path: Path, seconds: float = 3600) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_housekeeping_sweeps_uploads_no_live_job_names(redis_url: str, tmp_path: Path) -> None:
    redis = Redis.from_url(db_url(redis_url, 6))
    store = tiny_store(tmp_path)
    rt = Runtime(WorkerSettings(store=store.root, device="cpu", upload_grace_s=600), redis)
    jobs = JobClient(redis)
    queued, running, canceled, orphan, fresh = (store.new_upload()[0] for _ in range(5))
    jobs.submit_edit(payload(queued))
    started_without_heartbeat(jobs, running)
    jobs.cancel(jobs.submit_edit(payload(canceled)).id)
    for upload in (queued, running, canceled, orphan):
        old(store.root / "uploads" / upload)
    assert H.housekeeping(rt)
    left = {p.name for p in (store.root / "uploads").iterdir()}
    assert left == {queued, running, fresh}  # fresh: its job may be being enqueued right now


def test_housekeeping_runs_in_one_process_at_a_time(redis_url: str, tmp_path: Path) -> None:
    redis = Redis.from_url(db_url(redis_url, 7))
    store = tiny_store(tmp_path)
    rt = Runtime(WorkerSettings(store=store.root, device="cpu", upload_grace_s=600), redis)
    orphan, _ = store.new_upload()
    old(store.root / "uploads" / orphan)
    lock = redis.lock(H.HOUSEKEEPING_LOCK, timeout=60)
    assert lock.acquire(blocking=False)
    assert not H.housekeeping(rt)
    assert (store.root / "uploads" / orphan).exists()
    lock.release()


def test_retention_token_cache_is_bounded(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cpu", retention_cache_size=2)
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))  # never contacted here
    parent = None
    for seed in (61, 62, 63, 64):  # the 4th edit checks the retention of the first three
        parent = edit_once(rt, seed, parent=parent)
    assert len(rt.retention_tokens) == 2
