"""The worker process: load every registered model once, then run jobs without forking.

    python -m workers.main            # settings from VITEDIT_* environment variables

RQ's default worker forks a work-horse per job; after torch has run (and always with CUDA) the
child can deadlock, and reloading the models per job costs seconds. ``SimpleWorker`` runs jobs in
this process, on the warm models. A daemon thread keeps this worker's and its running job's
heartbeat keys fresh, and reaps the jobs of workers that died (see :func:`reap_dead_jobs`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

import torch
from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from workers import settings as S
from workers.client import heartbeat_key, reap_dead_jobs, worker_key
from workers.runtime import Runtime, install
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Refresh the worker and job heartbeat keys; run the dead-job watchdog now and then."""

    def __init__(self, redis: Redis, name: str, runtime: Runtime) -> None:
        super().__init__(name="vitedit-heartbeat", daemon=True)
        self.redis, self.worker, self.runtime = redis, name, runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        beats_per_watch = max(1, round(S.WATCHDOG_INTERVAL_S / S.HEARTBEAT_INTERVAL_S))
        beat = 0
        while not self.stopped.wait(0 if beat == 0 else S.HEARTBEAT_INTERVAL_S):
            try:
                self._beat()
                if beat % beats_per_watch == 0:
                    reap_dead_jobs(self.redis)
            except Exception:  # a Redis hiccup must not kill the heartbeat
                log.exception("heartbeat failed; retrying")
            beat += 1

    def _beat(self) -> None:
        self.redis.set(worker_key(self.worker), str(os.getpid()), ex=S.HEARTBEAT_TTL_S)
        job = self.runtime.current_job
        if job is not None:
            self.redis.set(heartbeat_key(job), self.worker, ex=S.HEARTBEAT_TTL_S)


def main() -> int:
    settings = WorkerSettings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    redis = Redis.from_url(settings.redis_url)
    runtime = Runtime(settings, redis)
    runtime.store.sweep(S.UPLOAD_MAX_AGE_S)
    if settings.register_demo:
        from workers.registration import register_demo

        register_demo(runtime.store)
    runtime.preload()
    install(runtime)
    name = settings.name or f"vitedit-{socket.gethostname()}-{os.getpid()}"
    heartbeat = Heartbeat(redis, name, runtime)
    heartbeat.start()
    # RQ gives its own connection a socket timeout longer than its blocking dequeue; a pooled
    # connection made earlier (redis-py's default timeout is 5 s) would time the worker out.
    rq_redis = Redis.from_url(settings.redis_url)
    queues = [
        Queue(q, connection=rq_redis, serializer=JSONSerializer)
        for q in (S.QUEUE_HIGH, S.QUEUE_EDITS)
    ]  # order = priority
    worker = SimpleWorker(queues, connection=rq_redis, serializer=JSONSerializer, name=name)
    log.info(
        "worker %s listening on %s (device %s)", name, [q.name for q in queues], runtime.device
    )
    try:
        worker.work(with_scheduler=False)
    finally:
        heartbeat.stopped.set()
        redis.delete(worker_key(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
