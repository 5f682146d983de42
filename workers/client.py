"""The queue side the API uses: enqueue jobs, read their state, cancel them. Torch-free.

Jobs are RQ jobs with the JSON serializer, referenced by dotted path (``workers.jobs.edit``), so
this module never imports the worker code. Progress lives in the job meta, written by the worker
(:mod:`workers.runtime`); the heartbeat and cancel keys live next to it in Redis.

A job belongs to a tenant (``tenant`` in its meta); a client :meth:`JobClient.scoped` to a tenant
sees, cancels and replays (Idempotency-Key) only that tenant's jobs: another's read as unknown.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from models.errors import (
    Conflict,
    NotFound,
    Timeout,
    Unavailable,
    VitEditError,
    by_name,
    quoted,
)
from models.store.manifest import DEFAULT_TENANT
from workers import metrics
from workers import settings as S
from workers.payloads import JOB_FUNCS, EditPayload, Payload

log = logging.getLogger(__name__)


class JobNotFound(NotFound):
    """No job of that id (never submitted, or its record expired)."""


class IdempotencyConflict(Conflict):
    """The Idempotency-Key was used before with another request body."""


class JobNotCancelable(Conflict):
    """The job already ended."""


class JobTimeout(Timeout):
    """A short job (predict, materialise) did not finish in time."""


class JobFailed(VitEditError):
    """A short job failed; the message is the worker's reason."""


class QueueUnavailable(Unavailable):
    """Redis cannot be reached."""


class WorkersBusy(Unavailable):
    """No live worker is free for a short job: each one is running an edit (or none is alive)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"  # the edit ran; its version missed the acceptance gate (stored, no alias)
    CANCELED = "canceled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.CANCELED})


JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What a job id may be: RQ's own id rule, bounded."""


def cancel_key(job_id: str) -> str:
    """One key per job, set once (NX) by whichever comes first: a cancel (``CANCEL_REQUESTED``)
    or the worker about to publish the job's version (``PUBLISHING``). So a cancel either stops
    the job before anything is stored, or is refused (409) because the version is being stored."""
    return f"{S.KEY_PREFIX}:cancel:{job_id}"


CANCEL_REQUESTED, PUBLISHING = "1", "publishing"


def heartbeat_key(job_id: str) -> str:
    return f"{S.KEY_PREFIX}:heartbeat:job:{job_id}"


def worker_key(name: str) -> str:
    return f"{S.KEY_PREFIX}:heartbeat:worker:{name}"


def unavailable_key(model: str) -> str:
    """A model that failed to load on a worker: its reason, refreshed by that worker's heartbeat."""
    return f"{S.KEY_PREFIX}:unavailable:model:{model}"


def edits_index_key(tenant: str) -> str:
    """A tenant's edit jobs, scored by submit time (``GET /v1/edits``, :meth:`JobClient.list_edits`)."""
    return f"{S.KEY_PREFIX}:edits@{tenant}"


# an index entry lives as long as the longest-kept job record it may point to
EDITS_INDEX_TTL_S = max(S.QUEUED_TTL_S, S.RESULT_TTL_S, S.FAILURE_TTL_S)


def _idempotency_key(key: str, tenant: str | None) -> str:
    """Per tenant: two tenants may send the same key. The default tenant's keep their old name."""
    if tenant is None or tenant == DEFAULT_TENANT:
        return f"{S.KEY_PREFIX}:idempotency:{key}"
    return f"{S.KEY_PREFIX}:idempotency@{tenant}:{key}"  # tenant names hold no ':'


def _iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=value.tzinfo or UTC).isoformat() if value else None


@dataclass
class JobView:
    """What a user sees of a job."""

    id: str
    kind: str
    state: JobState
    model: str | None = None
    parent: str | None = None
    method: str | None = None
    position: int | None = None  # jobs ahead of this one in its queue (0 = next)
    phase: str | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    version: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class JobClient:
    """Submit and follow jobs on the vitedit queues of one Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.edits = Queue(S.QUEUE_EDITS, connection=redis, serializer=JSONSerializer)
        self.high = Queue(S.QUEUE_HIGH, connection=redis, serializer=JSONSerializer)
        self.tenant: str | None = None  # None: every tenant's jobs (tests, the reaper)

    def scoped(self, tenant: str) -> JobClient:
        """This client as ``tenant`` uses it: its own jobs and Idempotency-Keys only."""
        view = copy.copy(self)
        view.tenant = tenant
        return view

    # ------------------------------------------------------------------ submit

    def submit_edit(self, payload: EditPayload, job_id: str | None = None) -> JobView:
        meta = {
            "kind": "edit",
            "model": payload.model,
            "parent": payload.parent,
            "method": payload.method,
            "max_steps": payload.max_steps,
            "phase": None,
            "tenant": payload.owner,
        }
        # One MULTI/EXEC: RQ's own enqueue takes two, and LPOS (a scan of the queue) a third
        # round trip for the position; LLEN in the same transaction gives it. The tenant's index
        # of edits gets the job in the same transaction, its expired entries trimmed.
        job_id = job_id or new_job_id()
        index, now = edits_index_key(payload.owner), time.time()
        with self.redis.pipeline() as pipe:
            job = self.edits.enqueue_call(
                JOB_FUNCS["edit"],
                args=(payload.model_dump(mode="json"),),
                job_id=job_id,
                meta=meta,
                timeout=S.EDIT_JOB_TIMEOUT_S,
                ttl=S.QUEUED_TTL_S,
                result_ttl=S.RESULT_TTL_S,
                failure_ttl=S.FAILURE_TTL_S,
                pipeline=pipe,
            )
            pipe.zadd(index, {job_id: now})  # after RQ's commands: it may WATCH first
            pipe.zremrangebyscore(index, "-inf", now - EDITS_INDEX_TTL_S)
            pipe.expire(index, EDITS_INDEX_TTL_S)
            pipe.llen(self.edits.key)
            queued = pipe.execute()[-1]
        log.info(
            "queued edit %s of %s@%s (%s)", job.id, payload.model, payload.parent, payload.method
        )
        return JobView(
            id=job.id,
            kind="edit",
            state=JobState.QUEUED,
            model=payload.model,
            parent=payload.parent,
            method=payload.method,
            max_steps=payload.max_steps,
            position=queued - 1,  # jobs ahead of this one, pushed last
            created_at=_iso(job.enqueued_at or job.created_at),
        )

    def claim_idempotency_key(self, key: str, body_sha256: str) -> tuple[str, bool]:
        """(job id, new?) for an Idempotency-Key: the first request with a key claims a job id.

        The same key with the same body gets the same job id back; another body raises
        :class:`IdempotencyConflict`. Claiming is atomic (SET NX), so two racing requests agree.
        """
        name = _idempotency_key(key, self.tenant)
        record = json.dumps({"job": new_job_id(), "body": body_sha256})
        if self.redis.set(name, record, nx=True, ex=S.IDEMPOTENCY_TTL_S):
            return json.loads(record)["job"], True
        stored = json.loads(self.redis.get(name) or "{}")
        if stored.get("body") != body_sha256:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used with a different request body; "
                "use a new key for a new request"
            )
        return stored["job"], False

    def release_idempotency_key(self, key: str) -> None:
        """Forget a claim whose job could not be enqueued (so a retry can enqueue it)."""
        self.redis.delete(_idempotency_key(key, self.tenant))

    def run_short(self, payload: Payload, timeout_s: float) -> Any:
        """Run a predict/materialise job ahead of the edits and wait for its result.

        Refused at once (:class:`WorkersBusy`, 503 + Retry-After) when every live worker is
        running an edit: it would wait behind minutes of optimisation and hold an API thread.
        """
        states = self.worker_states()
        if not any(state.get("kind") != "edit" for state in states.values()):
            raise WorkersBusy(
                f"no worker is free for a {payload.kind} job: "
                + (
                    f"all {len(states)} are running edits, which take minutes"
                    if states
                    else "none is alive (see GET /readyz)"
                )
                + "; retry after the Retry-After seconds, or start more workers"
            )
        job = self.high.enqueue_call(
            JOB_FUNCS[payload.kind],
            args=(payload.model_dump(mode="json"),),
            job_id=new_job_id(),
            meta={"kind": payload.kind, "tenant": self.tenant or DEFAULT_TENANT},
            timeout=S.SHORT_JOB_TIMEOUT_S,
            ttl=max(1, int(timeout_s)),
            result_ttl=S.SHORT_RESULT_TTL_S,
            failure_ttl=S.SHORT_RESULT_TTL_S,
            at_front=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = job.get_status(refresh=True)
            if status == JobStatus.FINISHED:
                return job.return_value()
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                meta = job.get_meta(refresh=True)
                error = by_name(meta.get("error_kind")) or JobFailed
                raise error(meta.get("error") or _last_line(job))
            time.sleep(0.02)
        if job.get_status(refresh=True) == JobStatus.QUEUED:
            job.cancel()
            metrics.count_job(self.redis, payload.kind, "canceled")
        raise JobTimeout(
            f"no worker finished the {payload.kind} job within {timeout_s:.0f} s; "
            "the workers are busy or down (see GET /readyz); retry later"
        )

    # ------------------------------------------------------------------ follow

    def fetch(self, job_id: str) -> Job:
        if not JOB_ID.fullmatch(job_id):  # RQ raises ValueError on these: never a 500
            raise JobNotFound(
                f"no job {quoted(job_id)}: job ids are 1-128 letters, digits, '_' or '-' (like "
                f"{new_job_id()[:9]}...), as POST /v1/edits returned them"
            )
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            job = None
        if job is None or (self.tenant and job.meta.get("tenant", DEFAULT_TENANT) != self.tenant):
            # another tenant's job reads as unknown: its existence is not revealed
            raise JobNotFound(f"no job {quoted(job_id)} (unknown id, or its record expired)")
        return job

    def view(self, job_id: str) -> JobView:
        job = self.fetch(job_id)  # one HGETALL: status, meta, timestamps
        meta = job.meta
        status = job.get_status(refresh=False)
        result = (job.return_value() or {}) if status == JobStatus.FINISHED else {}
        state = _state(status, meta, result)
        view = JobView(
            id=job.id,
            kind=meta.get("kind", "edit"),
            state=state,
            model=meta.get("model"),
            parent=meta.get("parent"),
            method=meta.get("method"),
            phase=meta.get("phase"),
            step=meta.get("step"),
            max_steps=meta.get("max_steps"),
            loss=meta.get("loss"),
            cancel_requested=self.redis.get(cancel_key(job.id)) == CANCEL_REQUESTED.encode(),
            created_at=_iso(job.enqueued_at or job.created_at),
            started_at=_iso(job.started_at),
            ended_at=_iso(job.ended_at),
            version=result.get("version"),
        )
        if state == JobState.QUEUED:  # None: a worker is taking it right now
            view.position = self.edits.get_job_position(job.id) or 0
        elif state == JobState.FAILED:
            view.error = meta.get("error") or _last_line(job)
        elif state == JobState.REJECTED:
            view.error = result["rejected"]
        return view

    def list_edits(self, limit: int, before: str | None = None) -> tuple[list[JobView], str | None]:
        """This tenant's edit jobs, newest first: ``limit`` of them after the job ``before`` (the
        previous page's last). Returns (views, the next page's ``before``, or None at the end).
        Jobs whose records expired are left out and dropped from the index."""
        index = edits_index_key(self.tenant or DEFAULT_TENANT)
        start = 0
        if before is not None:
            rank = self.redis.zrevrank(index, before) if JOB_ID.fullmatch(before) else None
            if rank is None:
                raise JobNotFound(
                    f"before={quoted(before)} is not one of your edit jobs: pass the next_before "
                    "of the previous page"
                )
            start = rank + 1
        views: list[JobView] = []
        expired: list[str] = []
        while len(views) < limit:
            ids = [m.decode() for m in self.redis.zrevrange(index, start, start + limit - 1)]
            if not ids:
                break
            for job_id in ids:
                start += 1
                try:
                    views.append(self.view(job_id))
                except JobNotFound:
                    expired.append(job_id)
                if len(views) == limit:
                    break
        more = len(views) == limit and self.redis.zcard(index) > start
        if expired:
            self.redis.zrem(index, *expired)
        return views, (views[-1].id if more else None)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.1) -> JobView:
        """Block until the job ends or ``timeout_s`` passes; returns its latest view."""
        deadline = time.monotonic() + timeout_s
        view = self.view(job_id)
        while view.state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll_s)
            view = self.view(job_id)
        return view

    def cancel(self, job_id: str, drop_upload: Callable[[str], None] | None = None) -> JobView:
        """Cancel a queued job at once (``drop_upload`` then deletes its images); ask a running
        one to stop at its next optimiser step or phase. A job already storing its version is
        past stopping: :class:`JobNotCancelable` (409), and it ends as it would have."""
        view = self.view(job_id)
        if view.state in TERMINAL:
            raise JobNotCancelable(f"job {job_id} already {view.state.value}; nothing to cancel")
        key = cancel_key(job_id)
        requested = self.redis.set(key, CANCEL_REQUESTED, nx=True, ex=S.CANCEL_FLAG_TTL_S)
        if not requested and self.redis.get(key) == PUBLISHING.encode():
            raise JobNotCancelable(
                f"job {job_id} is storing its version and can no longer be canceled; "
                "wait for it to end, then move aliases as you need"
            )
        job = self.fetch(job_id)
        if job.get_status() == JobStatus.QUEUED:
            job.cancel()
            metrics.count_job(self.redis, view.kind, "canceled")  # no worker will count it
            payload = job.args[0] if job.args else None
            if drop_upload is not None and isinstance(payload, dict) and payload.get("upload"):
                drop_upload(str(payload["upload"]))  # no worker will run it: its images go now
        return self.view(job_id)

    # ------------------------------------------------------------------ health

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def unavailable_models(self) -> dict[str, str]:
        """Models that a live worker failed to load, with the reason (see :mod:`workers.runtime`)."""
        prefix = unavailable_key("")
        keys = sorted(self.redis.scan_iter(f"{prefix}*"))
        values = self.redis.mget(keys) if keys else []
        return {
            k.decode()[len(prefix) :]: v.decode() for k, v in zip(keys, values, strict=True) if v
        }

    def worker_states(self) -> dict[str, dict[str, Any]]:
        """Live workers and what each announced it runs: ``{"kind": "edit" | ... | None}``."""
        prefix = worker_key("")
        keys = sorted(self.redis.scan_iter(f"{prefix}*"))
        states = {}
        for key, value in zip(keys, self.redis.mget(keys) if keys else [], strict=True):
            if value is None:  # expired between the scan and the read
                continue
            try:
                state = json.loads(value)
            except ValueError:
                state = None
            states[key.decode()[len(prefix) :]] = state if isinstance(state, dict) else {}
        return states

    def live_workers(self) -> list[str]:
        """Workers whose heartbeat key is fresh (written by :mod:`workers.main`)."""
        prefix = worker_key("")
        return sorted(k.decode()[len(prefix) :] for k in self.redis.scan_iter(f"{prefix}*"))


def _state(status: JobStatus, meta: dict[str, Any], result: dict[str, Any]) -> JobState:
    """RQ's status (+ our meta and result) -> the six states users see."""
    if status == JobStatus.STARTED:
        return JobState.RUNNING
    if status == JobStatus.FINISHED:
        if result.get("canceled"):
            return JobState.CANCELED
        return JobState.REJECTED if result.get("rejected") else JobState.SUCCEEDED
    if status in (JobStatus.FAILED, JobStatus.STOPPED):
        return JobState.CANCELED if meta.get("canceled") else JobState.FAILED
    if status == JobStatus.CANCELED:
        return JobState.CANCELED
    return JobState.QUEUED


def new_job_id() -> str:
    return f"j{uuid.uuid4().hex}"


def _last_line(job: Job) -> str:
    lines = (job.exc_info or "the job failed without a reason").strip().splitlines()
    return lines[-1] if lines else "the job failed"


REAPER_LOCK = f"{S.KEY_PREFIX}:lock:reaper"


def reap_dead_jobs(redis: Redis, grace_s: float = S.HEARTBEAT_TTL_S) -> list[str]:
    """Fail every running job whose heartbeat expired (its worker died); returns their ids.

    RQ would notice only after the job timeout; we mark the job (meta ``error``) and then let
    RQ's own abandoned-job cleanup move it to the failed registry. Every worker and the API call
    this, but one at a time (a Redis lock with a TTL): a caller that finds it taken returns [].
    """
    lock = redis.lock(REAPER_LOCK, timeout=S.HOUSEKEEPING_LOCK_TTL_S, blocking=False)
    if not lock.acquire():
        return []
    try:
        return _reap(redis, grace_s)
    finally:
        # expired after a very slow round, or Redis went away: the TTL frees it
        with contextlib.suppress(RedisError):
            lock.release()


def _reap(redis: Redis, grace_s: float) -> list[str]:
    reaped = []
    for name in (S.QUEUE_EDITS, S.QUEUE_HIGH):
        registry = StartedJobRegistry(name, connection=redis, serializer=JSONSerializer)
        members = [m.decode() for m in redis.zrange(registry.key, 0, -1)]
        for member in members:
            job_id = member.split(":", 1)[0]
            if _heartbeat_alive(redis, job_id, grace_s):
                continue
            _mark_dead(redis, job_id)
            redis.zadd(registry.key, {member: 1}, xx=True)  # expired: RQ's cleanup takes it
            reaped.append(job_id)
        if reaped:
            registry.cleanup()
    for job_id in reaped:
        log.warning(
            "job %s lost its worker (no heartbeat for %d s): marked failed",
            job_id,
            S.HEARTBEAT_TTL_S,
        )
    return reaped


def _heartbeat_alive(redis: Redis, job_id: str, grace_s: float) -> bool:
    if redis.exists(heartbeat_key(job_id)):
        return True
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        return False
    started = job.started_at
    if started is None:
        return True  # not started yet as far as RQ knows
    age = (datetime.now(UTC) - started.replace(tzinfo=started.tzinfo or UTC)).total_seconds()
    return age < grace_s


def _mark_dead(redis: Redis, job_id: str) -> None:
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        return
    job.meta.setdefault(  # a worker that lost Redis under the job has said why already
        "error",
        "the worker running this job stopped (killed or crashed) before it "
        "finished; nothing was stored. Submit the edit again.",
    )
    job.save_meta()
    metrics.count_job(redis, str(job.meta.get("kind", "edit")), "failed")  # its worker could not
