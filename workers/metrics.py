"""Metrics of the jobs: each worker's own Prometheus port, the service-wide totals, job-tagged logs.

Torch-free: the API reads the totals from here too (``service/metrics.py``).

- **Each worker** serves its own metrics (``vitedit_worker_*`` and the process's CPU and memory)
  on ``VITEDIT_METRICS_PORT`` (off when unset) with ``prometheus_client.start_http_server``: a
  daemon thread in the worker process, one port per process. A worker is one process (RQ's
  ``SimpleWorker``, no work-horse fork), so the plain in-process registry is exact and the
  multiprocess mode is not needed. In docker compose every worker container uses port 9101 in its
  own network namespace; several workers on one host without containers need one port each.
- **The service-wide totals**: every worker also adds each job's final status and the seconds of
  each edit phase to Redis hashes (``HINCRBY``, one round trip), and so do the places that end a
  job without a worker (the reaper: failed; a cancel while queued: canceled). The API's
  ``/metrics`` shows them, so one scrape sees every worker on every host.
- **Logs** of a worker carry the id of the job it is running (``[j...]``, ``[-]`` when idle),
  added by :class:`JobLogFilter` to every record, RQ's own included.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job

from workers import settings as S

log = logging.getLogger(__name__)

JOBS_KEY = f"{S.KEY_PREFIX}:metrics:jobs"
"""Hash: ``kind:status`` -> jobs that ended so (service-wide, every worker adds its own)."""

PHASE_SECONDS_KEY = f"{S.KEY_PREFIX}:metrics:phase-seconds"
"""Hash: edit phase -> seconds spent in it, summed over every edit of the service."""

PHASE_COUNT_KEY = f"{S.KEY_PREFIX}:metrics:phase-count"
"""Hash: edit phase -> how many edits went through it."""

FINAL_STATUSES = ("succeeded", "failed", "rejected", "canceled")
"""A job's final status, as ``GET /v1/edits/{id}`` shows it."""

JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Seconds: a predict takes tens of milliseconds, an edit on a CPU up to the 30-min job timeout."""

JOBS = Counter(
    "vitedit_worker_jobs", "Jobs this worker ended, by kind and final status.", ["kind", "status"]
)
JOB_SECONDS = Histogram(
    "vitedit_worker_job_seconds",
    "Seconds this worker spent on each job, by kind and final status.",
    ["kind", "status"],
    buckets=JOB_BUCKETS,
)
PHASE_SECONDS = Histogram(
    "vitedit_worker_phase_seconds",
    "Seconds of each phase (loading, masking, optimizing, evaluating, saving) of this worker's edits.",
    ["phase"],
    buckets=JOB_BUCKETS,
)
BUSY = Gauge("vitedit_worker_busy", "1 while this worker runs a job, else 0.")
HEARTBEAT = Gauge(
    "vitedit_worker_last_heartbeat_timestamp_seconds",
    "Unix time of this worker's last heartbeat written to Redis (0: none yet).",
)


# --------------------------------------------------------------------------- service-wide totals


def count_job(redis: Redis, kind: str, status: str) -> None:
    """Add one ended job to the service-wide totals (a Redis outage loses the count, not the job)."""
    with contextlib.suppress(RedisError):
        redis.hincrby(JOBS_KEY, f"{kind}:{status}", 1)


def count_phase(redis: Redis, phase: str, seconds: float) -> None:
    """One edit phase's seconds, in this worker's histogram and in the service-wide totals."""
    PHASE_SECONDS.labels(phase).observe(seconds)
    with contextlib.suppress(RedisError):
        pipe = redis.pipeline()  # MULTI: the sum and the count move together
        pipe.hincrbyfloat(PHASE_SECONDS_KEY, phase, seconds)
        pipe.hincrby(PHASE_COUNT_KEY, phase, 1)
        pipe.execute()


@dataclass
class Totals:
    """The service-wide totals as the API shows them."""

    jobs: dict[tuple[str, str], int]  # (kind, status) -> jobs
    phase_seconds: dict[str, float]
    phase_count: dict[str, int]


def read_totals(redis: Redis) -> Totals:
    """Read the three hashes (raises RedisError when Redis is away)."""
    pipe = redis.pipeline(transaction=False)
    for key in (JOBS_KEY, PHASE_SECONDS_KEY, PHASE_COUNT_KEY):
        pipe.hgetall(key)
    jobs, seconds, count = pipe.execute()
    return Totals(
        jobs={tuple(k.decode().split(":", 1)): int(v) for k, v in jobs.items()},  # type: ignore[misc]
        phase_seconds={k.decode(): float(v) for k, v in seconds.items()},
        phase_count={k.decode(): int(v) for k, v in count.items()},
    )


# --------------------------------------------------------------------------- one job


def final_status(result: Any) -> str:
    """A finished job's status from its return value (see ``workers.client._state``)."""
    if isinstance(result, dict) and result.get("canceled"):
        return "canceled"
    if isinstance(result, dict) and result.get("rejected"):
        return "rejected"
    return "succeeded"


class CurrentJob:
    """The id of the job this worker process runs (one at a time: RQ's SimpleWorker)."""

    def __init__(self) -> None:
        self.id: str | None = None


CURRENT = CurrentJob()


def run_job(kind: str, redis: Redis, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one job's ``work``: its id on the worker's log lines, its status and seconds counted.

    An exception is a failed job (re-raised for RQ); a worker killed mid-job counts nothing here,
    the reaper counts it failed (``workers.client``).
    """
    job = get_current_job()
    CURRENT.id = job.id if job is not None else None
    BUSY.set(1)
    start, status = time.perf_counter(), "failed"
    try:
        result = work()
        status = final_status(result)
        return result
    finally:
        JOBS.labels(kind, status).inc()
        JOB_SECONDS.labels(kind, status).observe(time.perf_counter() - start)
        count_job(redis, kind, status)
        log.info("%s job ended: %s in %.2f s", kind, status, time.perf_counter() - start)
        BUSY.set(0)
        CURRENT.id = None


class JobLogFilter(logging.Filter):
    """Adds ``job_id`` (the running job's id, or ``-``) to every record of a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = CURRENT.id or "-"
        return True


def log_with_job_ids(level: int = logging.INFO) -> None:
    """The worker's logging: every line carries the running job's id."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s [%(job_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobLogFilter())


# --------------------------------------------------------------------------- the metrics port


def serve_metrics(port: int | None, addr: str) -> bool:
    """Serve this process's metrics on ``addr:port`` in a daemon thread; False if off or taken.

    A port that cannot be bound is logged, not fatal: the worker still runs its jobs.
    """
    if not port:
        return False
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        log.error(
            "metrics port %s:%d unavailable (%s): this worker serves no metrics", addr, port, exc
        )
        return False
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True


def heartbeat_age(text: str, now: float) -> float | None:
    """Seconds since the last heartbeat in a worker's metrics page (None: no heartbeat yet)."""
    for family in text_string_to_metric_families(text):
        if family.name == "vitedit_worker_last_heartbeat_timestamp_seconds":
            stamp = family.samples[0].value
            return now - stamp if stamp > 0 else None
    return None


def check(port: int, timeout_s: float = 3.0) -> int:
    """Health check of a worker (the worker image's HEALTHCHECK): 0 when its metrics port
    answers and its last heartbeat to Redis is fresher than the heartbeat TTL, else 1."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            age = heartbeat_age(r.read().decode(), time.time())
    except OSError as exc:
        print(f"unhealthy: no metrics on port {port} ({exc})", file=sys.stderr)
        return 1
    if age is None or age > S.HEARTBEAT_TTL_S:
        print(
            f"unhealthy: last heartbeat to Redis {age if age is None else round(age)} s ago",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.metrics check [--port N]``: the worker's health check."""
    parser = argparse.ArgumentParser(prog="python -m workers.metrics")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("--port", type=int, default=None, help="default: VITEDIT_METRICS_PORT")
    args = parser.parse_args(argv)
    port = args.port or S.WorkerSettings().metrics_port
    if not port:
        print("unhealthy: no metrics port (set VITEDIT_METRICS_PORT or --port)", file=sys.stderr)
        return 1
    return check(port)


if __name__ == "__main__":
    sys.exit(main())
