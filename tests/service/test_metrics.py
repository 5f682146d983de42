"""Prometheus metrics: the API's /metrics (requests by route template and status, queue depth, the
service's jobs by final status and phase seconds) and a worker's own port, scraped after real
requests and a real edit on a real worker; worker log lines carry the job id."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from cli.launcher import free_port
from tests.redis_server import db_url, png, tiny_store, worker_process
from tests.service.conftest import Served, api
from workers import metrics
from workers import settings as S
from workers.client import JobClient, reap_dead_jobs

pytestmark = pytest.mark.redis

FAST = {"lr": "0.01", "max_steps": "60"}
EDIT_PHASES = ("loading", "optimizing", "evaluating", "saving")  # method ft: no masking phase

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@dataclass
class Metered:
    served: Served
    worker_port: int

    def api(self) -> Samples:
        r = self.served.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        return parse(r.text)

    def worker(self) -> Samples:
        return parse(httpx.get(f"http://127.0.0.1:{self.worker_port}/metrics").text)


@pytest.fixture(scope="module")
def metered(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    """API + one real worker serving its metrics on a free port (redis db 14)."""
    url = db_url(redis_url, 14)
    store = tiny_store(tmp_path_factory.mktemp("metered"))
    port = free_port()
    env = {"VITEDIT_METRICS_PORT": str(port)}
    with worker_process(url, store.root, **env), api(url, store.root) as client:
        yield Metered(Served(client, store, JobClient(Redis.from_url(url)), url), port)


def submit_edit(served: Served, image: bytes, label: str) -> str:
    files = [("images", ("x.png", image, "image/png"))]
    r = served.client.post("/v1/edits", files=files, data={"label": label, "model": "tiny", **FAST})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_requests_are_counted_by_route_template_and_status(metered: Metered) -> None:
    client = metered.served.client
    before = metered.api()
    for _ in range(3):
        assert client.get("/v1/models").status_code == 200
    for name in ("nope", "other"):  # two ids, one series: the template, not the path
        assert client.get(f"/v1/models/{name}/versions").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    after = metered.api()

    requests = "vitedit_http_requests_total"
    assert moved(before, after, requests, method="GET", route="/v1/models", status="200") == 3
    versions = {"method": "GET", "route": "/v1/models/{model}/versions", "status": "404"}
    assert moved(before, after, requests, **versions) == 2
    assert moved(before, after, requests, method="GET", route="unmatched", status="404") == 1
    assert not any(
        dict(labels).get("route", "").startswith("/v1/models/nope") for _, labels in after
    )
    latency = "vitedit_http_request_duration_seconds"
    assert moved(before, after, f"{latency}_count", **versions) == 2
    assert moved(before, after, f"{latency}_sum", **versions) > 0


def test_made_up_methods_share_one_series(metered: Metered) -> None:
    client = metered.served.client
    before = metered.api()
    for method in ("BREW", "WHEN", "X-1"):  # each would have been a series of its own
        assert client.request(method, "/v1/models").status_code == 405
    after = metered.api()
    labels = {"method": "other", "route": "/v1/models", "status": "405"}
    assert moved(before, after, "vitedit_http_requests_total", **labels) == 3
    assert not any(dict(ls).get("method") in ("BREW", "WHEN", "X-1") for _, ls in after)


def test_requests_refused_by_the_guard_are_counted_under_their_route(metered: Metered) -> None:
    served = metered.served
    with api(served.redis_url, served.store.root, api_keys="k1") as client:
        assert client.get("/v1/models").status_code == 401
        samples = parse(client.get("/metrics").text)  # /metrics stays open, like /healthz
    labels = {"method": "GET", "route": "/v1/models", "status": "401"}
    assert value(samples, "vitedit_http_requests_total", **labels) == 1


def test_an_edit_moves_the_job_and_phase_counters_of_the_api_and_the_worker(
    metered: Metered,
) -> None:
    served = metered.served
    api_before, worker_before = metered.api(), metered.worker()
    job = submit_edit(served, png(21), "3")
    body = served.client.get(f"/v1/edits/{job}", params={"wait": 60}).json()
    assert body["status"] in ("succeeded", "rejected"), body
    status = body["status"]
    api_after, worker_after = metered.api(), metered.worker()

    for final in metrics.FINAL_STATUSES:  # exactly one job, under its final status
        expected = 1 if final == status else 0
        assert moved(api_before, api_after, "vitedit_jobs_total", kind="edit", status=final) == (
            expected
        )
        worker_jobs = moved(
            worker_before, worker_after, "vitedit_worker_jobs_total", kind="edit", status=final
        )
        assert worker_jobs == expected
    job_seconds = "vitedit_worker_job_seconds"
    assert moved(worker_before, worker_after, f"{job_seconds}_count", kind="edit", status=status)
    total = moved(worker_before, worker_after, f"{job_seconds}_sum", kind="edit", status=status)
    phase_total = 0.0
    for phase in EDIT_PHASES:
        summary = "vitedit_job_phase_seconds"
        assert moved(api_before, api_after, f"{summary}_count", phase=phase) == 1, phase
        histogram = "vitedit_worker_phase_seconds"
        assert moved(worker_before, worker_after, f"{histogram}_count", phase=phase) == 1, phase
        seconds = moved(worker_before, worker_after, f"{histogram}_sum", phase=phase)
        assert seconds == pytest.approx(moved(api_before, api_after, f"{summary}_sum", phase=phase))
        phase_total += seconds
    assert 0 < phase_total <= total
    assert value(worker_after, "vitedit_worker_busy") == 0
    assert value(api_after, "vitedit_redis_up") == 1
    assert value(api_after, "vitedit_workers_live") == 1


def test_worker_health_check_reads_its_fresh_heartbeat(metered: Metered) -> None:
    stamp = value(metered.worker(), "vitedit_worker_last_heartbeat_timestamp_seconds")
    assert 0 < time.time() - stamp < 30
    assert metrics.check(metered.worker_port) == 0
    assert metrics.check(free_port()) == 1  # nothing listening there


def test_queue_depth_and_a_cancel_while_queued(idle: Served) -> None:
    """No worker: submitted edits wait in the queue; a cancel counts the job canceled."""
    before = parse(idle.client.get("/metrics").text)
    jobs = [submit_edit(idle, png(30 + i), "1") for i in range(2)]
    middle = parse(idle.client.get("/metrics").text)
    assert idle.client.post(f"/v1/edits/{jobs[0]}/cancel").status_code == 200
    after = parse(idle.client.get("/metrics").text)

    depth = "vitedit_queue_depth"
    assert moved(before, middle, depth, queue="vitedit-edits") == 2
    assert moved(middle, after, depth, queue="vitedit-edits") == -1
    assert moved(before, after, "vitedit_jobs_total", kind="edit", status="canceled") == 1
    assert value(after, "vitedit_workers_live") == 0


def test_reaped_job_counts_as_failed(idle: Served) -> None:
    """A job whose worker died (started, no heartbeat) is failed by the reaper and counted so."""
    redis = idle.jobs.redis
    job = Job.create(
        "workers.jobs.edit",
        args=({},),
        connection=redis,
        serializer=JSONSerializer,
        meta={"kind": "edit"},
        origin=S.QUEUE_EDITS,
    )
    job.started_at = datetime.now(UTC) - timedelta(minutes=5)
    job.save()
    registry = StartedJobRegistry(S.QUEUE_EDITS, connection=redis, serializer=JSONSerializer)
    redis.zadd(registry.key, {f"{job.id}:lost-execution": time.time() + 600})
    before = metrics.read_totals(redis).jobs.get(("edit", "failed"), 0)
    assert reap_dead_jobs(redis, grace_s=0) == [job.id]
    assert metrics.read_totals(redis).jobs.get(("edit", "failed"), 0) == before + 1


log = logging.getLogger("tests.metrics-probe")


def logging_job() -> dict[str, Any]:
    """An RQ job that logs inside the worker's job context (see the test below)."""
    job = get_current_job()
    assert job is not None
    return metrics.run_job("probe", job.connection, lambda: log.warning("inside the job") or {})


def test_worker_log_lines_carry_the_running_job_id(redis_url: str) -> None:
    redis = Redis.from_url(db_url(redis_url, 14))
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s [%(job_id)s]: %(message)s"))
    handler.addFilter(metrics.JobLogFilter())
    log.addHandler(handler)
    try:
        queue = Queue("metrics-probe", connection=redis, serializer=JSONSerializer)
        job = queue.enqueue(logging_job)
        SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
        log.warning("after the job")
    finally:
        log.removeHandler(handler)
    assert job.get_status(refresh=True) == "finished"
    lines = out.getvalue().splitlines()
    assert f"tests.metrics-probe [{job.id}]: inside the job" in lines
    assert "tests.metrics-probe [-]: after the job" in lines
    assert metrics.read_totals(redis).jobs[("probe", "succeeded")] >= 1
