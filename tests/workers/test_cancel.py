"""A cancel and the worker's publish meet on one Redis key (workers/client.py, ``cancel_key``):
whichever sets it first wins. A cancel that wins stops the edit before anything is stored, however
few optimiser steps it ran; one that comes once the version is being stored is refused (409).
A queued job that is canceled loses its uploaded images at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis import Redis
from rq.job import JobStatus

from models.errors import EditCanceled
from tests.redis_server import db_url, png, tiny_store
from workers import tasks
from workers.client import JobClient, JobNotCancelable, JobState
from workers.payloads import EditPayload, JobImage
from workers.runtime import Progress, Runtime
from workers.settings import WorkerSettings

pytestmark = pytest.mark.redis


def queued_edit(jobs: JobClient, runtime: Runtime, options: dict[str, object]) -> tuple[str, str]:
    """An edit job in the queue (no worker listens): (job id, upload id)."""
    upload, _ = runtime.store.new_upload()
    path = runtime.store.write_upload(upload, "edit-000", png(81))
    payload = EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=path, target=3)],
        method="ft",
        options=options,
    )
    job = jobs.edits.enqueue_call("workers.jobs.edit", args=(payload.model_dump(mode="json"),))
    return job.id, upload


@pytest.fixture
def setup(redis_url: str, tmp_path: Path) -> tuple[JobClient, Runtime]:
    redis = Redis.from_url(db_url(redis_url, 9))
    redis.flushdb()
    settings = WorkerSettings(store=tiny_store(tmp_path).root, device="cpu")
    return JobClient(redis), Runtime(settings, redis)


def test_a_cancel_after_the_publish_claim_is_refused_and_one_before_it_wins(setup) -> None:
    jobs, runtime = setup
    late, _ = queued_edit(jobs, runtime, {})
    Progress(jobs.redis, jobs.fetch(late)).claim_publish()  # the worker is storing the version
    with pytest.raises(JobNotCancelable, match="storing its version"):
        jobs.cancel(late)
    assert not jobs.view(late).cancel_requested

    early, upload = queued_edit(jobs, runtime, {})
    view = jobs.cancel(early, drop_upload=runtime.store.remove_upload)
    assert view.state == JobState.CANCELED and view.cancel_requested
    assert not (runtime.store.root / "uploads" / upload).exists()  # its images went with it
    with pytest.raises(EditCanceled):
        Progress(jobs.redis, jobs.fetch(early)).claim_publish()


def test_an_edit_canceled_while_it_is_evaluated_stores_nothing(setup, monkeypatch) -> None:
    """The optimiser's steps are over in milliseconds; the cancel arrives while the new weights
    are evaluated on the report's sets, where no optimiser step looks at the flag any more."""
    jobs, runtime = setup
    job_id, upload = queued_edit(jobs, runtime, {"lr": 0.01, "max_steps": 5})
    job = jobs.fetch(job_id)
    jobs.edits.remove(job)  # as a worker takes it
    job.set_status(JobStatus.STARTED)
    evaluate = tasks._evaluate_new

    def cancel_meanwhile(*args, **kwargs):
        jobs.cancel(job_id)  # the API's own call, while the worker evaluates
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(tasks, "_evaluate_new", cancel_meanwhile)
    payload = EditPayload.model_validate(job.args[0])
    assert tasks.edit(runtime, payload, job) == {"canceled": True}
    assert runtime.store.versions("tiny") == []
    assert jobs.view(job_id).cancel_requested
    assert not (runtime.store.root / "uploads" / upload).exists()
