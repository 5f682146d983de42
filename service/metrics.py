"""Prometheus metrics of the API: ``GET /metrics`` (open, like /healthz; keep it off the internet).

- HTTP: ``vitedit_http_requests_total`` and ``vitedit_http_request_duration_seconds`` by method,
  route template (``/v1/edits/{job_id}``, never the raw path: ids would explode the series;
  ``unmatched`` for paths no route serves) and status. Measured outside the request guard, so
  the 401 and 413 answered from the headers count too.
- The queue, read from Redis at each scrape: ``vitedit_queue_depth`` and ``vitedit_jobs_running``
  by queue, ``vitedit_workers_live`` and ``vitedit_workers_busy``, ``vitedit_redis_up``.
- The jobs of the whole service (every worker on every host adds to Redis, see
  ``workers/metrics.py``): ``vitedit_jobs_total`` by kind and final status (succeeded, failed,
  rejected, canceled) and ``vitedit_job_phase_seconds`` (sum and count) by edit phase. Every API
  replica shows the same totals: aggregate them with ``max``, not ``sum``.
- The process: CPU, memory, open files.

One registry per app, in this process: the API runs as one uvicorn process (scale it out with
more replicas, each scraped on its own), so prometheus_client's multiprocess mode is not needed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq.registry import StartedJobRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers import metrics as job_metrics
from workers.client import JobClient

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
"""Methods counted by name; any other is counted as "other", so a client cannot grow the label
set (and the API's memory) by sending made-up methods."""


class HttpMetrics:
    """Plain ASGI middleware: count and time every HTTP request by route template and status."""

    def __init__(
        self,
        app: ASGIApp,
        templates: Callable[[], list[tuple[re.Pattern[str], str]]],
        requests: Counter,
        latency: Histogram,
    ) -> None:
        self.app, self.templates, self.requests, self.latency = app, templates, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an exception that escapes is answered 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            labels = (method, self.route_of(scope), str(status))
            self.requests.labels(*labels).inc()
            self.latency.labels(*labels).observe(time.perf_counter() - start)

    def route_of(self, scope: Scope) -> str:
        """The template of the route that served (or would have served) this request."""
        path = getattr(scope.get("route"), "path", None)  # set by the router on a match
        if path:
            return str(path)
        # answered before routing (the request guard's 401/413) or by no route
        return next((t for rx, t in self.templates() if rx.fullmatch(scope["path"])), UNMATCHED)


def schema_templates(app: FastAPI) -> Callable[[], list[tuple[re.Pattern[str], str]]]:
    """The app's path templates (from its OpenAPI schema, read once) as regular expressions."""
    table: list[tuple[re.Pattern[str], str]] = []

    def templates() -> list[tuple[re.Pattern[str], str]]:
        if not table:
            for template in app.openapi()["paths"]:
                parts = re.split(r"\{[^}]+\}", template)
                table.append((re.compile("[^/]+".join(map(re.escape, parts))), template))
        return table

    return templates


class QueueCollector(Collector):
    """Queue, workers and the service-wide job totals, read from Redis at each scrape."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app  # app.state.jobs exists once the lifespan has started

    def collect(self) -> Iterator[Metric]:
        jobs: JobClient | None = getattr(self.app.state, "jobs", None)
        up = GaugeMetricFamily("vitedit_redis_up", "1 when this API reached Redis at this scrape.")
        if jobs is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            families = list(self._families(jobs))
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, jobs: JobClient) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "vitedit_queue_depth", "Jobs waiting in each queue.", labels=["queue"]
        )
        running = GaugeMetricFamily(
            "vitedit_jobs_running", "Jobs a worker has started, by queue.", labels=["queue"]
        )
        for queue in (jobs.edits, jobs.high):
            depth.add_metric([queue.name], queue.count)
            registry = StartedJobRegistry(queue.name, connection=jobs.redis)
            running.add_metric([queue.name], jobs.redis.zcard(registry.key))
        states = jobs.worker_states()
        live = GaugeMetricFamily("vitedit_workers_live", "Workers with a fresh heartbeat.")
        live.add_metric([], len(states))
        busy = GaugeMetricFamily("vitedit_workers_busy", "Live workers running a job.")
        busy.add_metric([], sum(1 for s in states.values() if s.get("job")))
        yield from (depth, running, live, busy)
        yield from _totals(job_metrics.read_totals(jobs.redis))


def _totals(totals: job_metrics.Totals) -> Iterator[Metric]:
    ended = CounterMetricFamily(
        "vitedit_jobs",
        "Jobs of the whole service that ended, by kind and final status.",
        labels=["kind", "status"],
    )
    for (kind, status), n in sorted(totals.jobs.items()):
        ended.add_metric([kind, status], n)
    phases = SummaryMetricFamily(
        "vitedit_job_phase_seconds",
        "Seconds the service's edits spent in each phase (sum and count over all workers).",
        labels=["phase"],
    )
    for phase, count in sorted(totals.phase_count.items()):
        phases.add_metric([phase], count, totals.phase_seconds.get(phase, 0.0))
    yield from (ended, phases)


def install(app: FastAPI) -> None:
    """Count every request (outermost middleware: add it after the others) and serve /metrics."""
    registry = CollectorRegistry()
    requests = Counter(
        "vitedit_http_requests",
        "HTTP requests answered, by method, route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "vitedit_http_request_duration_seconds",
        "Seconds from a request's arrival to its last byte, by method, route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    registry.register(QueueCollector(app))
    ProcessCollector(registry=registry)
    app.add_middleware(
        HttpMetrics, templates=schema_templates(app), requests=requests, latency=latency
    )

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:  # sync: FastAPI runs it in a thread (it reads Redis)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
