"""`vitedit serve` starts redis, a worker and the API, and Ctrl-C (SIGINT) stops all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cli import launcher
from tests.redis_server import WORKER_START_S, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_serve_runs_everything_and_sigint_stops_it(tmp_path: Path) -> None:
    port = launcher.free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITEDIT_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "store"),
            "--no-demo",
        ],
        env=env,
        # as `vitedit serve &` from a script: the shell starts it with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: launcher.http_ready(f"{url}/readyz"), WORKER_START_S, poll_s=1)
        kids = children(proc.pid)
        assert len(kids) == 3  # redis-server, worker, API
        assert httpx.get(f"{url}/v1/models").json() == []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not [k for k in kids if Path(f"/proc/{k}").exists()]  # stopped and reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
