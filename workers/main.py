"""The worker process: load every registered model once, then run jobs without forking.

    python -m workers.main            # settings from VITEDIT_* environment variables

RQ's default worker forks a work-horse per job; after torch has run (and always with CUDA) the
child can deadlock, and reloading the models per job costs seconds. ``SimpleWorker`` runs jobs in
this process, on the warm models. A daemon thread keeps this worker's and its running job's
heartbeat keys fresh, reaps the jobs of workers that died and keeps house (see
:mod:`workers.housekeeping`).

The worker outlives its Redis: when the connection drops (Redis restarted, network gone), RQ's
loop ends; this one waits for Redis with a backoff, reports the job that was cut off as failed,
and starts a fresh RQ worker on the same warm models. Only SIGTERM/SIGINT end it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from models.precision import use_tf32
from workers import metrics
from workers import settings as S
from workers.client import heartbeat_key, worker_key
from workers.housekeeping import Heartbeat, housekeeping
from workers.runtime import Runtime, install
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

LOST_REDIS = (
    "Redis became unreachable while this job ran, so its result could not be recorded; "
    "nothing was stored. Submit the request again."
)


UNSUBSCRIBE_WAIT_S = 5.0  # the most a stopping worker waits for RQ's pubsub clean-up
PUBSUB_POLL_S = 1.0  # the longest read of the worker's pubsub listener (RQ's: 60 s)


def within(seconds: float, fn: Callable[[], object], what: str) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``seconds`` for it: True if it finished.
    If not, say so and go on; the thread dies with the process."""
    thread = threading.Thread(target=fn, name=what, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        log.warning("%s did not finish within %.0f s; going on without it", what, seconds)
        return False
    return True


class Worker(SimpleWorker):
    """RQ's SimpleWorker that remembers a stop request (RQ's own flag misses an idle one) and
    does not hang on its pubsub clean-up when stopping."""

    max_connection_wait_time = S.REDIS_RECONNECT_MAX_S  # RQ's default backs off to 60 s
    stopping = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    def subscribe(self) -> None:
        """RQ's subscribe, with reads of at most PUBSUB_POLL_S in the listener thread.

        RQ 2.12 unsubscribes, then stops the listener, whose reads block for 60 s. When the
        listener reads the unsubscribe reply before the stop, it goes back to such a read, and
        redis-py's ``stop()`` waits for that read to end: once in CI a SIGTERM-ed worker stayed
        after "unsubscribing from channel" for over 30 s (RQ's issue 1613 is the same kind of
        hang). With short reads the listener sees the stop within a second
        (tests/workers/test_stopping.py reproduces the race)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def unsubscribe(self) -> None:
        # A stop request must stop the worker, whatever RQ's clean-up does: bounded as well.
        within(UNSUBSCRIBE_WAIT_S, super().unsubscribe, f"RQ pubsub clean-up of {self.name}")


def rq_worker(redis: Redis, name: str) -> Worker:
    queues = [
        Queue(q, connection=redis, serializer=JSONSerializer) for q in (S.QUEUE_HIGH, S.QUEUE_EDITS)
    ]  # order = priority
    return Worker(queues, connection=redis, serializer=JSONSerializer, name=name)


def wait_for_redis(redis: Redis, stop: threading.Event) -> bool:
    """Ping with a doubling backoff until Redis answers (True) or a stop is requested (False)."""
    delay = 0.25
    while not stop.is_set():
        try:
            redis.ping()
            return True
        except RedisError as exc:
            log.warning("Redis unavailable (%s); retrying in %.1f s", exc, delay)
        stop.wait(delay)
        delay = min(2 * delay, S.REDIS_RECONNECT_MAX_S)
    return False


def report_lost_jobs(redis: Redis, runtime: Runtime) -> None:
    """Say why the jobs cut off by the outage failed; the reaper then moves them to failed."""
    for job_id in list(runtime.lost_jobs):
        with contextlib.suppress(NoSuchJobError):
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
            job.meta["error"] = LOST_REDIS
            job.save_meta()
        redis.delete(heartbeat_key(job_id))
        runtime.lost_jobs.remove(job_id)
        log.warning("job %s was cut off by the Redis outage: reported failed", job_id)


def forget(worker: SimpleWorker) -> None:
    """Mark an RQ worker that lost its connection dead (so its name can register again)."""
    try:
        worker.teardown()
    except Exception:  # what is left expires with RQ's worker TTL
        log.debug("teardown of %s failed", worker.name, exc_info=True)


def serve(redis: Redis, rq_redis: Redis, name: str, runtime: Runtime) -> None:
    """Run RQ workers until SIGTERM/SIGINT, reconnecting whenever Redis goes away."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    delay = 0.0
    while True:
        worker, started = rq_worker(rq_redis, name), time.monotonic()
        try:
            worker.work(with_scheduler=False)  # returns on a stop request or a lost connection
        except RedisError as exc:  # raised by RQ's own clean-up when the connection is gone
            log.warning("worker %s lost Redis: %s", name, exc)
        except ValueError as exc:  # RQ found our name still registered by the last round
            log.warning("worker %s could not register: %s", name, exc)
        if worker.stopping:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):  # RQ's handlers need Redis: ours don't
            signal.signal(signum, request_stop)
        # a round that ends at once again and again (not an outage) must not spin
        quick = time.monotonic() - started < S.REDIS_RECONNECT_MAX_S
        delay = min(2 * delay, S.REDIS_RECONNECT_MAX_S) if quick and delay else 0.1
        if stop.wait(delay) or not wait_for_redis(rq_redis, stop):
            return
        forget(worker)
        try:
            report_lost_jobs(redis, runtime)
            runtime.announce()  # free again (Redis may hold the state from before the outage)
        except RedisError:  # gone again: the next round waits for it
            continue
        log.info("worker %s reconnected to Redis", name)


def main() -> int:
    settings = WorkerSettings()
    metrics.log_with_job_ids()  # every log line carries the running job's id
    metrics.serve_metrics(settings.metrics_port, settings.metrics_addr)  # answers while loading
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    use_tf32(settings.tf32)
    redis = Redis.from_url(settings.redis_url)
    runtime = Runtime(settings, redis)
    if settings.register_demo:
        from workers.registration import register_builtin

        register_builtin(runtime.store)
    runtime.preload()
    install(runtime)
    with contextlib.suppress(RedisError):  # the heartbeat thread does it later otherwise
        housekeeping(runtime)
    name = settings.name or f"vitedit-{socket.gethostname()}-{os.getpid()}"
    runtime.worker_name = name
    heartbeat = Heartbeat(redis, name, runtime)
    heartbeat.start()
    # RQ gives its own connection a socket timeout longer than its blocking dequeue; a pooled
    # connection made earlier (redis-py's default timeout is 5 s) would time the worker out.
    rq_redis = Redis.from_url(settings.redis_url)
    log.info("worker %s listening (device %s)", name, runtime.device)
    try:
        serve(redis, rq_redis, name, runtime)
    finally:
        heartbeat.stopped.set()
        with contextlib.suppress(RedisError):
            redis.delete(worker_key(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
