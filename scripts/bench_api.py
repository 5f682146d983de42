"""Latency of the API under a fixed request rate on loopback, and the time of one real edit.

    .venv/bin/vitedit serve &                      # or any running server on 127.0.0.1
    .venv/bin/python scripts/bench_api.py --image fail.png --label Sneaker

1. submit: POST /v1/edits (one small image, max_steps 1) at --rate requests/s for --seconds, open
   loop (each request starts on schedule, whatever the previous ones do). With --redis-url (the
   server's Redis, printed by `vitedit serve`) the workers are suspended meanwhile (rq suspend,
   with a TTL) so that they do not run the bench's jobs; the jobs are canceled afterwards (untimed).
   Without it, each job is canceled as soon as its submit returns.
2. poll: GET /v1/edits/{id} at the same rate on the jobs of phase 1.
3. one edit: submit --image with --label, long-poll until it ends; prints submit -> succeeded.

Loopback only, at most --seconds x --rate requests per phase (capped at 60 s and 200 req/s).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Phase:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> list[str]:
        lat = sorted(self.latencies_ms)
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        rate = len(lat) / self.seconds if self.seconds else 0.0
        errors = ", ".join(f"{k}: {v}" for k, v in self.errors.items()) or "0"
        return [
            self.name,
            str(len(lat)),
            f"{rate:.1f}",
            f"{q[49]:.1f}",
            f"{q[98]:.1f}",
            f"{lat[-1]:.1f}" if lat else "-",
            errors,
        ]


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


async def open_loop(name: str, rate: float, total: int, send: object) -> Phase:
    """Start request i at t0 + i / rate; record each one's latency (send to full response)."""
    phase = Phase(name)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        start = time.perf_counter()
        try:
            status = await send(i)  # type: ignore[operator]
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if status in (200, 202):
            phase.latencies_ms.append(1000 * (time.perf_counter() - start))
        else:
            phase.errors[str(status)] = phase.errors.get(str(status), 0) + 1

    await asyncio.gather(*(one(i) for i in range(total)))
    phase.seconds = time.perf_counter() - t0
    return phase


async def bench_latency(args: argparse.Namespace) -> tuple[Phase, Phase]:
    total = int(args.rate * args.seconds)
    image = noise_png(0)
    ids: list[str] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=args.server, timeout=30, limits=limits) as client:
        cancels: list[asyncio.Task] = []

        async def submit(i: int) -> int:
            r = await client.post(
                "/v1/edits",
                files={"images": ("x.png", image, "image/png")},
                data={"label": "0", "model": args.model, "max_steps": "1"},
            )
            if r.status_code == 202:
                ids.append(r.json()["id"])
                if not args.redis_url:  # no suspended workers: cancel at once (untimed)
                    cancels.append(asyncio.create_task(client.post(f"/v1/edits/{ids[-1]}/cancel")))
            return r.status_code

        submits = await open_loop("submit POST /v1/edits", args.rate, total, submit)

        async def poll(i: int) -> int:
            return (await client.get(f"/v1/edits/{ids[i % len(ids)]}")).status_code

        if not ids:
            raise SystemExit(f"no submit succeeded ({submits.errors}); is {args.model} served?")
        polls = await open_loop("poll GET /v1/edits/{id}", args.rate, total, poll)
        if args.redis_url:
            cancels = [asyncio.create_task(client.post(f"/v1/edits/{j}/cancel")) for j in ids]
        await asyncio.gather(*cancels, return_exceptions=True)
    return submits, polls


@contextmanager
def suspended_workers(redis_url: str | None, ttl_s: int) -> Iterator[None]:
    """rq suspend (auto-expires after ttl_s) while the block runs; nothing without a URL."""
    if not redis_url:
        yield
        return
    if urlparse(redis_url).hostname not in LOOPBACK:
        raise SystemExit("--redis-url must be on loopback")
    from redis import Redis
    from rq.suspension import resume, suspend

    redis = Redis.from_url(redis_url)
    suspend(redis, ttl_s)
    try:
        yield
    finally:
        resume(redis)


def one_edit(args: argparse.Namespace) -> tuple[float, dict]:
    data = args.image.read_bytes() if args.image else noise_png(1)
    form = {"label": args.label, "model": args.model}
    if args.max_steps:
        form["max_steps"] = str(args.max_steps)
    with httpx.Client(base_url=args.server, timeout=args.edit_timeout + 30) as client:
        start = time.perf_counter()
        job = (
            client.post("/v1/edits", files={"images": ("edit.png", data, "image/png")}, data=form)
            .raise_for_status()
            .json()
        )
        while job["status"] not in ("succeeded", "failed", "canceled"):
            if time.perf_counter() - start > args.edit_timeout:
                raise SystemExit(f"the edit did not finish within {args.edit_timeout} s")
            job = client.get(f"/v1/edits/{job['id']}", params={"wait": 10}).json()
        return time.perf_counter() - start, job


def print_table(rows: list[list[str]]) -> None:
    head = ["phase", "ok", "req/s", "p50 ms", "p99 ms", "max ms", "errors"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="demo-vit")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (<= 200)")
    p.add_argument("--seconds", type=float, default=10.0, help="per phase (<= 60)")
    p.add_argument("--image", type=Path, help="image of the timed edit (default: noise)")
    p.add_argument("--label", default="0", help="its target label (index or class name)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="of the timed edit (default: the method's)"
    )
    p.add_argument("--edit-timeout", type=float, default=600.0)
    p.add_argument("--skip-edit", action="store_true")
    p.add_argument("--redis-url", help="the server's Redis: suspend workers during phases 1-2")
    args = p.parse_args()
    if urlparse(args.server).hostname not in LOOPBACK:
        raise SystemExit("bench_api.py only targets a server on loopback (127.0.0.1)")
    if not (0 < args.rate <= 200 and 0 < args.seconds <= 60):
        raise SystemExit("--rate must be in (0, 200] and --seconds in (0, 60]")
    with suspended_workers(args.redis_url, ttl_s=int(4 * args.seconds) + 120):
        submits, polls = asyncio.run(bench_latency(args))
    print(
        f"open-loop load: {args.rate:g} requests/s for {args.seconds:g} s per phase, "
        f"server {args.server}"
    )
    print_table([submits.row(), polls.row()])
    if not args.skip_edit:
        seconds, job = one_edit(args)
        phases = (job.get("report") or {}).get("seconds")
        print(
            f"\none edit ({args.model}, label {args.label}): submit -> {job['status']} in "
            f"{seconds:.2f} s; worker phases (s): {phases}; version {job.get('version')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
