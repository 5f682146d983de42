"""A worker's background thread: heartbeats, the dead-job reaper, and the store's housekeeping.

Every worker refreshes its own heartbeat key, its running job's, and one key per model it failed
to load (``GET /readyz`` lists them; they expire once no live worker refreshes them). The reaper
(:func:`~workers.client.reap_dead_jobs`) and the housekeeping (sweep the uploads of jobs that will
never run: canceled, expired or crashed; trim the merged-weights cache) run in one process at a
time across the whole service, under Redis locks with a TTL, so a holder that dies frees its lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from workers import settings as S
from workers.client import heartbeat_key, reap_dead_jobs, unavailable_key
from workers.runtime import Runtime

log = logging.getLogger(__name__)

HOUSEKEEPING_LOCK = f"{S.KEY_PREFIX}:lock:housekeeping"


def live_uploads(redis: Redis) -> set[str]:
    """Upload ids named by a job that is queued, being dequeued or running."""
    ids: list[str] = []
    for name in (S.QUEUE_EDITS, S.QUEUE_HIGH):
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        ids += queue.get_job_ids()
        ids += [i.decode() for i in redis.lrange(queue.intermediate_queue_key, 0, -1)]
        registry = StartedJobRegistry(name, connection=redis, serializer=JSONSerializer)
        ids += [m.decode().split(":", 1)[0] for m in redis.zrange(registry.key, 0, -1)]
    jobs = Job.fetch_many(ids, connection=redis, serializer=JSONSerializer)
    uploads = set()
    for job in jobs:
        payload = job.args[0] if job is not None and job.args else None
        if isinstance(payload, dict) and payload.get("upload"):
            uploads.add(str(payload["upload"]))
    return uploads


def housekeeping(runtime: Runtime) -> bool:
    """Sweep orphaned uploads and drafts, trim the weights cache; False if another process
    holds the lock."""
    lock = runtime.redis.lock(HOUSEKEEPING_LOCK, timeout=S.HOUSEKEEPING_LOCK_TTL_S, blocking=False)
    if not lock.acquire():
        return False
    try:
        settings, store = runtime.settings, runtime.store
        swept = store.sweep(settings.upload_grace_s, keep=live_uploads(runtime.redis))
        evicted = store.evict_cached_weights(
            settings.weights_cache_max_bytes, settings.cache_min_idle_s
        )
        if swept or evicted:
            log.info("housekeeping: swept %d uploads/drafts, evicted %s", swept, evicted)
        return True
    finally:
        # expired after a very slow round, or Redis went away: the TTL frees it
        with contextlib.suppress(RedisError):
            lock.release()


class Heartbeat(threading.Thread):
    """Refresh the worker and job heartbeat keys; reap dead jobs and keep house now and then."""

    def __init__(self, redis: Redis, name: str, runtime: Runtime) -> None:
        super().__init__(name="vitedit-heartbeat", daemon=True)
        self.redis, self.worker, self.runtime = redis, name, runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        due = {"reap": 0.0, "house": 0.0}
        while not self.stopped.is_set():
            now = time.monotonic()
            try:
                self._beat()
                if now >= due["reap"]:
                    reap_dead_jobs(self.redis)
                    due["reap"] = now + S.WATCHDOG_INTERVAL_S
                if now >= due["house"]:
                    housekeeping(self.runtime)
                    due["house"] = now + S.HOUSEKEEPING_INTERVAL_S
            except RedisError as exc:  # the worker's main loop reconnects; keep beating
                log.warning("heartbeat: Redis unavailable (%s); retrying", exc)
            except Exception:  # a bug in one round must not stop the heartbeat
                log.exception("heartbeat round failed; retrying")
            self.stopped.wait(S.HEARTBEAT_INTERVAL_S)

    def _beat(self) -> None:
        self.runtime.announce()
        job = self.runtime.current_job
        if job is not None:
            self.redis.set(heartbeat_key(job), self.worker, ex=S.HEARTBEAT_TTL_S)
        for model, failed in list(self.runtime.unavailable.items()):  # read by GET /readyz
            self.redis.set(unavailable_key(model), failed.reason, ex=S.HEARTBEAT_TTL_S)
