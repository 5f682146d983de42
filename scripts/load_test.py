"""Load test: N edit submissions against the service with two workers, each job followed to its end.

    .venv/bin/python scripts/load_test.py                    # starts `vitedit serve --workers 2`
    .venv/bin/python scripts/load_test.py --server http://127.0.0.1:8000   # a running server

1. submit: N edits (a small noise image, max_steps --max-steps; every other one with min_sr 0, so
   that it is accepted) at --rate requests/s, open loop (request i starts at t0 + i / rate,
   whatever the earlier ones do), while the workers run.
   A share (--cancel-share) is canceled right after its submit returns: a queued one ends
   'canceled', a running one stops at its next step, a finished one answers 409.
2. follow: the jobs not yet ended are polled in turn (GET /v1/edits/{id}, --poll-rate requests/s
   in all) until every one has ended; each state seen is recorded.
3. check: each job reached exactly one final state (once final, every later read says the same,
   and a last read of all jobs agrees), its states only moved forward (queued -> running -> end),
   and the store holds exactly one version per succeeded or rejected job (the manifests' job_id)
   and none for a failed or canceled one.

Prints one table: jobs by final state, jobs/minute (first submit to last end, server clock), and
the API latency (p50/p99/max) of submit, cancel and poll. Requests go through a small HTTP/1.1
client (keep-alive connections, bodies encoded once): httpx spends more CPU per request than the
API does, and on a small machine it, not the API, would set the latency. Loopback only; exits 1 if
a check fails. Without --server it starts `vitedit serve --workers 2` on a free port with a fresh
store in a temporary folder (the demo model), and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
FINAL = {"succeeded", "rejected", "failed", "canceled"}
ORDER = {"queued": 0, "running": 1, **dict.fromkeys(FINAL, 2)}
WITH_VERSION = {"succeeded", "rejected"}  # a rejected version is stored, with no alias


class RawClient:
    """HTTP/1.1 over keep-alive connections to one host; ~0.3 ms of CPU a request."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: bytes = b"", ctype: str = "") -> Any:
        """(status, JSON body) of one request; a connection the server closed is replaced."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += f"Content-Type: {ctype}\r\n" if ctype else ""
        raw = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        while True:
            reader, writer = self.idle.pop() if self.idle else await self._connect()
            writer.write(raw)
            line = await reader.readline()
            if line:
                break
            writer.close()  # closed after its keep-alive timeout: send again on a new one
        length = 0
        while (header := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        self.idle.append((reader, writer))
        return int(line.split()[1]), json.loads(payload) if payload else None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and one PNG as ``images``; its content type."""
    b = secrets.token_hex(12)
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Latency:
    name: str
    ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def row(self) -> list[str]:
        lat = sorted(self.ms)
        if not lat:
            return [self.name, "0", "-", "-", "-", "-"]
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return [self.name, str(len(lat)), f"{q[49]:.1f}", f"{q[98]:.1f}", f"{lat[-1]:.1f}", codes]

    async def timed(self, request: Any) -> tuple[int, Any]:
        start = time.perf_counter()
        status, body = await request
        self.ms.append(1000 * (time.perf_counter() - start))
        self.statuses[status] += 1
        return status, body


@dataclass
class Run:
    ids: list[str] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=dict)  # job -> states in order
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # job -> its first final view
    submit: Latency = field(default_factory=lambda: Latency("submit POST /v1/edits"))
    cancel: Latency = field(default_factory=lambda: Latency("cancel POST /v1/edits/{id}/cancel"))
    poll: Latency = field(default_factory=lambda: Latency("poll GET /v1/edits/{id}"))
    problems: list[str] = field(default_factory=list)


async def submit_all(client: RawClient, args: argparse.Namespace, run: Run) -> None:
    """Open loop: submission i starts at t0 + i / rate; every k-th job is canceled at once."""
    form = {"label": "0", "model": args.model, "max_steps": str(args.max_steps)}
    # the noise images are rarely fixed in a few steps: half the jobs accept any SR (a version
    # published), the other half keep the default gate (most end 'rejected', stored unaliased)
    bodies = [
        multipart({**form, "min_sr": "0"} if i % 2 else form, noise_png(i))
        for i in range(args.jobs)
    ]
    every = round(1 / args.cancel_share) if args.cancel_share else 0
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
        status, job = await run.submit.timed(client.request("POST", "/v1/edits", *bodies[i]))
        if status != 202:
            run.problems.append(f"submit {i}: {status} {job}")
            return
        run.ids.append(job["id"])
        run.seen[job["id"]] = [job["status"]]
        if every and i % every == every - 1:
            cancel = client.request("POST", f"/v1/edits/{job['id']}/cancel")
            status, body = await run.cancel.timed(cancel)
            if status not in (200, 409):  # 409: it had already ended
                run.problems.append(f"cancel {job['id']}: {status} {body}")

    await asyncio.gather(*(one(i) for i in range(args.jobs)))


async def follow_all(client: RawClient, args: argparse.Namespace, run: Run) -> None:
    """Poll the jobs not yet ended in turn, --poll-rate requests/s in all, until all ended."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        waiting = [j for j in run.ids if j not in run.final]
        if not waiting:
            return
        for job_id in waiting:
            start = time.perf_counter()
            status, view = await run.poll.timed(client.request("GET", f"/v1/edits/{job_id}"))
            if status != 200:
                run.problems.append(f"poll {job_id}: {status} {view}")
                run.final[job_id] = {"status": "lost", "version": None}
                continue
            record(run, job_id, view)
            await asyncio.sleep(max(0.0, 1 / args.poll_rate - (time.perf_counter() - start)))
    run.problems.append(f"{len(run.ids) - len(run.final)} jobs did not end in {args.timeout:.0f} s")


def record(run: Run, job_id: str, view: dict[str, Any]) -> None:
    states = run.seen[job_id]
    state = view["status"]
    if ORDER[state] < ORDER[states[-1]]:
        run.problems.append(f"job {job_id} went back from {states[-1]} to {state}")
    first = run.final.get(job_id)
    if first is not None and (state, view["version"]) != (first["status"], first["version"]):
        run.problems.append(f"job {job_id} ended twice: {first['status']} then {state}")
    if state != states[-1]:
        states.append(state)
    if state in FINAL and first is None:
        run.final[job_id] = view


def check_versions(args: argparse.Namespace, run: Run) -> None:
    """A last read of every job agrees with its first final view; one version per job at most."""
    with httpx.Client(base_url=args.server, timeout=60) as client:
        for job_id in run.ids:
            record(run, job_id, client.get(f"/v1/edits/{job_id}").json())
        listing = client.get(f"/v1/models/{args.model}/versions").json()["versions"]
        made_by: Counter[str] = Counter()
        version_of: dict[str, str] = {}
        for v in listing:
            manifest = client.get(f"/v1/models/{args.model}/versions/{v['version']}").json()
            job_id = manifest["manifest"].get("job_id")
            if job_id in run.seen:
                made_by[job_id] += 1
                version_of[job_id] = v["version"]
    for job_id, view in run.final.items():
        want = 1 if view["status"] in WITH_VERSION else 0
        if made_by[job_id] != want:
            run.problems.append(
                f"job {job_id} ({view['status']}) has {made_by[job_id]} versions, expected {want}"
            )
        elif want and version_of[job_id] != view["version"]:
            run.problems.append(f"job {job_id} names {view['version']}, the store has another")


def jobs_per_minute(run: Run) -> tuple[float, float]:
    """Jobs that ended per minute, first submit (created_at) to last end (ended_at), and the span."""
    views = list(run.final.values())
    starts = [datetime.fromisoformat(v["created_at"]) for v in views if v.get("created_at")]
    ends = [datetime.fromisoformat(v["ended_at"]) for v in views if v.get("ended_at")]
    if not starts or not ends:
        return 0.0, 0.0
    span = (max(ends) - min(starts)).total_seconds()
    return (60 * len(views) / span if span else 0.0), span


def print_report(args: argparse.Namespace, run: Run, wall_s: float) -> None:
    states = Counter(v["status"] for v in run.final.values())
    per_min, span = jobs_per_minute(run)
    print(
        f"\n{len(run.ids)} jobs submitted at {args.rate:g}/s (max_steps {args.max_steps}, "
        f"cancel share {args.cancel_share:g}) to {args.server}, model {args.model}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    not_ended = len(run.ids) - sum(states[s] for s in FINAL)
    print(f"final states: {dict(sorted(states.items()))}; not ended: {not_ended}")
    print(f"throughput: {per_min:.1f} jobs/minute ({len(run.final)} jobs ended {span:.1f} s after")
    print(f"the first submit; wall {wall_s:.1f} s)")
    head = ["request", "n", "p50 ms", "p99 ms", "max ms", "statuses"]
    rows = [run.submit.row(), run.cancel.row(), run.poll.row()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    verdict = "every job reached exactly one final state" if not run.problems else "PROBLEMS"
    print(f"\ncheck: {verdict}")
    for line in run.problems[:20]:
        print(f"  {line}")


async def load(args: argparse.Namespace, run: Run) -> None:
    client = RawClient(args.server)
    try:
        await submit_all(client, args, run)
        await follow_all(client, args, run)
    finally:
        client.close()


@contextmanager
def served(workers: int) -> Iterator[str]:
    """`vitedit serve --workers N` on a free port, fresh store in a temporary folder."""
    from cli import launcher

    with tempfile.TemporaryDirectory(prefix="vitedit-load-") as folder:
        port = launcher.free_port()
        argv = [sys.executable, "-m", "cli.main", "serve", "--port", str(port)]
        argv += ["--store", str(Path(folder) / "store"), "--workers", str(workers)]
        with open(Path(folder) / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=log
            )
            url = f"http://127.0.0.1:{port}"
            try:
                launcher.wait_until(
                    lambda: launcher.http_ready(f"{url}/readyz") and _workers(url) >= workers,
                    300,
                    f"vitedit serve with {workers} workers",
                    alive=lambda: proc.poll() is None,
                )
                yield url
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def _workers(url: str) -> int:
    return len(httpx.get(f"{url}/readyz").json().get("workers") or [])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", help="a running server on loopback (default: start one)")
    p.add_argument("--workers", type=int, default=2, help="workers of the server started here")
    p.add_argument("--model", default="demo-vit")
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--rate", type=float, default=100.0, help="submissions per second (<= 200)")
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--cancel-share", type=float, default=0.1, help="share canceled at once")
    p.add_argument("--poll-rate", type=float, default=20.0, help="status requests per second")
    p.add_argument("--timeout", type=float, default=1800.0, help="for all jobs to end")
    args = p.parse_args()
    if not (0 < args.rate <= 200 and 0 < args.jobs <= 2000 and 0 <= args.cancel_share < 1):
        raise SystemExit("--rate in (0, 200], --jobs in (0, 2000], --cancel-share in [0, 1)")
    if args.server and urlparse(args.server).hostname not in LOOPBACK:
        raise SystemExit("load_test.py only targets a server on loopback (127.0.0.1)")
    run = Run()
    with served(args.workers) if not args.server else _given(args.server) as url:
        args.server = url
        start = time.perf_counter()
        asyncio.run(load(args, run))
        check_versions(args, run)
        print_report(args, run, time.perf_counter() - start)
    return 1 if run.problems else 0


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    sys.exit(main())
