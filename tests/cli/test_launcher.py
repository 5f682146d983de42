"""The launcher stops its children by their own PIDs: SIGTERM, then SIGKILL after the grace."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from redis import Redis

from cli import launcher


def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    group = launcher.ProcessGroup()
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = group.start("stubborn", [sys.executable, "-c", stubborn])
    time.sleep(0.5)
    start = time.monotonic()
    group.stop(grace_s=0.5)
    assert proc.returncode == -9
    assert time.monotonic() - start < 10
    assert group.children == []


@pytest.mark.redis
def test_start_redis_binds_loopback_and_stops_cleanly(tmp_path: Path) -> None:
    group = launcher.ProcessGroup()
    url = launcher.start_redis(group, launcher.free_port(), tmp_path)
    try:
        assert url.startswith("redis://127.0.0.1:")
        assert Redis.from_url(url).config_get("bind")["bind"].split()[0] == "127.0.0.1"
    finally:
        group.stop()
    assert not launcher.redis_ready(url)
