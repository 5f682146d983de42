"""How many edit jobs a tenant has queued or running, bounded per tenant. Torch-free.

Each tenant has a Redis sorted set of its job ids (scored by the time they were reserved). A new
job reserves its slot before it is enqueued: add the id, count, and take it back out if the count
is above the limit, so two racing requests can both be refused but never both pass. Jobs that
ended (or whose record expired) are dropped from the set lazily, at the next reservation; no worker
has to report back.
"""

from __future__ import annotations

import time

from redis import Redis
from rq.job import Job

from models.errors import RateLimited
from workers import settings as S

ACTIVE = frozenset({"queued", "started", "deferred", "scheduled"})
"""RQ statuses of a job that still holds its tenant's slot."""

RESERVE_GRACE_S = 60.0
"""A reserved id whose job record is missing is kept this long: it may still be being enqueued."""

RETRY_AFTER_S = 30
"""What a refusal suggests to wait: an edit takes tens of seconds to minutes."""


class TooManyJobs(RateLimited):
    """A tenant already has its most queued + running edit jobs (429)."""

    retry_after_s = RETRY_AFTER_S


def active_key(tenant: str) -> str:
    return f"{S.KEY_PREFIX}:active:{tenant}"


class ActiveJobs:
    """Queued + running edit jobs per tenant, on one Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def count(self, tenant: str) -> int:
        """The tenant's jobs still queued or running (ended ones are dropped first)."""
        self._prune(tenant)
        return int(self.redis.zcard(active_key(tenant)))

    def reserve(self, tenant: str, job_id: str, limit: int) -> None:
        """Take a slot for ``job_id``, or raise :class:`TooManyJobs`; ``limit`` 0 = no limit."""
        if limit <= 0:
            return
        self._prune(tenant)
        key = active_key(tenant)
        pipe = self.redis.pipeline()
        pipe.zadd(key, {job_id: time.time()})
        pipe.zcard(key)
        pipe.expire(key, S.QUEUED_TTL_S + S.EDIT_JOB_TIMEOUT_S)  # idle tenants leave no key
        _, held, _ = pipe.execute()
        if held > limit:
            self.redis.zrem(key, job_id)
            raise TooManyJobs(
                f"tenant {tenant!r} already has {limit} edit jobs queued or running, the most "
                "it may have; wait for one to end (GET /v1/edits/{id}) or cancel one "
                "(POST /v1/edits/{id}/cancel), then retry"
            )

    def release(self, tenant: str, job_id: str) -> None:
        """Give a slot back (its job could not be enqueued)."""
        self.redis.zrem(active_key(tenant), job_id)

    def _prune(self, tenant: str) -> None:
        key = active_key(tenant)
        members = [
            (m.decode(), score) for m, score in self.redis.zrange(key, 0, -1, withscores=True)
        ]
        if not members:
            return
        pipe = self.redis.pipeline()
        for job_id, _ in members:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
        young = time.time() - RESERVE_GRACE_S
        ended = [
            job_id
            for (job_id, reserved_at), status in zip(members, statuses, strict=True)
            if (status is None and reserved_at < young)
            or (status is not None and status.decode() not in ACTIVE)
        ]
        if ended:
            self.redis.zrem(key, *ended)
