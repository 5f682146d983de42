"""The launcher supervises its children: a dead child is restarted (with a backoff that grows while
it keeps crashing), redis-server keeps every accepted job across a kill -9 (append-only file), and
no child outlives a launcher that is stopped with SIGTERM and SIGKILLed two seconds later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from redis import Redis

from cli import launcher
from tests.redis_server import kill_redis, own_redis, supervise_until, wait_for
from workers.client import JobClient, JobState
from workers.payloads import EditPayload, JobImage


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_supervise_restarts_a_killed_child(tmp_path: Path) -> None:
    group = launcher.ProcessGroup()
    try:
        first = group.start("sleeper", ["sleep", "60"])
        first.kill()
        first.wait()
        took = supervise_until(group, lambda: group.child("sleeper").alive, 10)
        child = group.child("sleeper")
        assert child.proc is not None and child.proc.pid != first.pid
        assert child.restarts == 1
        assert launcher.RESTART_BACKOFF_S <= took < launcher.RESTART_BACKOFF_S + 2
    finally:
        group.stop(grace_s=1)


def test_backoff_doubles_while_a_child_keeps_crashing_and_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher, "RESTART_BACKOFF_S", 0.05)
    monkeypatch.setattr(launcher, "RESTART_BACKOFF_MAX_S", 0.2)
    group = launcher.ProcessGroup()
    group.start("crasher", ["sh", "-c", "exit 3"])
    backoffs = []
    try:
        deadline = time.monotonic() + 10
        while len(backoffs) < 5 and time.monotonic() < deadline:
            child = group.child("crasher")
            waiting = child.restart_at is not None
            group.supervise()
            if not waiting and child.restart_at is not None:  # a new crash was seen
                backoffs.append(child.backoff_s)
            time.sleep(0.01)
    finally:
        group.stop(grace_s=1)
    assert backoffs == [0.05, 0.1, 0.2, 0.2, 0.2]


def _submit(jobs: JobClient) -> str:
    payload = EditPayload(
        model="tiny",
        upload="u0123",
        images=[JobImage(path="uploads/u0123/edit-000", target=1)],
        method="ft",
        options={"max_steps": 5},
    )
    job_id, new = jobs.claim_idempotency_key("retry-me", "body-sha")
    assert new
    return jobs.submit_edit(payload, job_id=job_id).id


@pytest.mark.redis
def test_a_killed_redis_is_restarted_with_every_accepted_job(tmp_path: Path) -> None:
    with own_redis(tmp_path / "redis") as (group, url):
        jobs = JobClient(Redis.from_url(url))
        job_id = _submit(jobs)  # answered: the API would have sent 202 now
        kill_redis(group)
        took = supervise_until(group, lambda: launcher.redis_ready(url), 20)
        view = jobs.view(job_id)
        assert view.state == JobState.QUEUED and view.position == 0
        assert jobs.claim_idempotency_key("retry-me", "body-sha") == (job_id, False)
        assert any((tmp_path / "redis").glob("appendonly*"))
    print(f"redis back with its jobs {took:.2f} s after kill -9")


LAUNCHER = textwrap.dedent(
    """
    import json, signal, sys, time
    from pathlib import Path
    from cli import launcher

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    group = launcher.ProcessGroup()
    try:
        launcher.start_redis(group, launcher.free_port(), Path(sys.argv[1]))
        ready = Path(sys.argv[1]) / "stubborn.ready"
        stubborn = (
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'w').close(); time.sleep(600)"
        )
        group.start("stubborn", [sys.executable, "-c", stubborn, str(ready)])
        launcher.wait_until(ready.exists, 30, "the stubborn child")
        print(json.dumps([c.proc.pid for c in group.children]), flush=True)
        while True:
            group.supervise()
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        group.stop()
    """
)


@pytest.mark.redis
def test_no_child_outlives_a_launcher_killed_two_seconds_after_sigterm(tmp_path: Path) -> None:
    """What a process manager does: SIGTERM, then SIGKILL while the launcher is still stopping."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "redis")],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout is not None
    pids = json.loads(proc.stdout.readline())
    try:
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        proc.kill()
        proc.wait()
        assert wait_for(lambda: not any(alive(p) for p in pids), 5), [p for p in pids if alive(p)]
    finally:
        for pid in pids:  # only ours, by their own PIDs
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
