"""Faults of the store under a running service: a real redis-server, a real worker process, the API.

- The disk fills up while a version is saved: the worker's file-size limit (RLIMIT_FSIZE, lowered
  on the running worker with prlimit: any user may, no root, no small filesystem needed) makes
  its writes fail with EFBIG, as ENOSPC would.
- The store is read-only: its ``tmp/`` (where a version is drafted) or the model's ``versions/``
  folder (where the draft is renamed to) refuses writes. As a normal user, chmod 0555; as root,
  whom modes do not stop, the immutable attribute (``chattr +i``; skipped where the filesystem or
  the container does not allow it).
- A patch on disk is corrupted after it was stored (one byte flipped).

Each time the job must end ``failed`` with the reason, nothing may be published (no version, no
draft left, ``latest`` unchanged), the worker must go on with the next job once the fault is gone,
and a corrupted file is never served (its sha256 no longer matches the manifest's).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from models.store.store import PATCH_FILE, Store
from tests.redis_server import db_url, png, tiny_store, worker_process
from tests.service.conftest import api
from workers.client import JobClient

pytestmark = pytest.mark.redis

FAST = {"label": "3", "model": "tiny", "max_steps": "5", "min_sr": "0"}
FULL_DISK_BYTES = 1024  # every version holds a patch larger than this


@dataclass
class Service:
    client: TestClient
    store: Store
    jobs: JobClient
    worker: subprocess.Popen


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    url = db_url(redis_url, 11)
    store = tiny_store(tmp_path_factory.mktemp("faults"))
    with worker_process(url, store.root) as worker, api(url, store.root) as client:
        yield Service(client, store, JobClient(Redis.from_url(url)), worker)


def edit(service: Service, model: str = "tiny", seed: int = 1) -> dict[str, Any]:
    """Submit a short edit and wait for its end."""
    files = [("images", ("x.png", png(seed), "image/png"))]
    r = service.client.post("/v1/edits", files=files, data={**FAST, "model": model})
    assert r.status_code == 202, r.text
    body = service.client.get(f"/v1/edits/{r.json()['id']}", params={"wait": 60}).json()
    assert body["status"] not in ("queued", "running"), body
    return body


def published(service: Service) -> tuple[list[str], str | None, list[Path]]:
    """What a reader can see (versions, latest) and what a save left behind (drafts)."""
    versions = [m.version for m in service.store.versions("tiny")]
    drafts = sorted((service.store.root / "tmp").iterdir())
    return versions, service.store.latest("tiny"), drafts


def assert_failed_cleanly(service: Service, job: dict[str, Any], before: tuple, why: str) -> None:
    assert job["status"] == "failed", job
    assert why in job["error"], job["error"]
    assert job["version"] is None
    assert published(service) == before  # no version, no alias move, no draft left


# --------------------------------------------------------------------------- disk full


@contextmanager
def file_size_limit(pid: int, limit: int) -> Iterator[None]:
    """The process can write files up to ``limit`` bytes (EFBIG past it), until the block ends."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


def test_a_full_disk_during_save_fails_the_job_and_publishes_nothing(service: Service) -> None:
    first = edit(service)
    assert first["status"] == "succeeded", first
    before = published(service)
    with file_size_limit(service.worker.pid, FULL_DISK_BYTES):
        job = edit(service, seed=2)
    assert_failed_cleanly(
        service,
        job,
        before,
        "the model store could not be written (Error while serializing: I/O error: File too large",
    )
    again = edit(service, seed=3)  # the same worker, the disk free again
    assert again["status"] == "succeeded", again
    assert service.store.latest("tiny") == again["version"]


# --------------------------------------------------------------------------- read-only store


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """No file can be created in ``folder`` until the block ends (skips where that cannot be)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as undo:
        if os.geteuid() != 0:
            undo.callback(folder.chmod, folder.stat().st_mode)
            folder.chmod(0o555)
        else:  # root ignores modes: the immutable attribute stops root too
            chattr = shutil.which("chattr")
            if not chattr or subprocess.run([chattr, "+i", folder], capture_output=True).returncode:
                pytest.skip("running as root, and no immutable attribute (chattr +i) here")
            undo.callback(subprocess.run, [chattr, "-i", folder], check=True)
        with pytest.raises(OSError):
            (folder / "probe").mkdir()
        yield


@pytest.mark.parametrize(
    ("folder", "when"),
    [("tmp", "the draft is created"), ("models/tiny/versions", "the draft is renamed into place")],
)
def test_a_read_only_store_fails_the_job_and_publishes_nothing(
    service: Service, folder: str, when: str
) -> None:
    before = published(service)
    with read_only(service.store.root / folder):
        job = edit(service, seed=4)
    assert_failed_cleanly(service, job, before, "the model store could not be written")
    assert "fix the store's permissions" in job["error"]
    assert edit(service, seed=5)["status"] == "succeeded"


# --------------------------------------------------------------------------- corrupted patch


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the tensor data
    path.write_bytes(bytes(data))


def test_a_corrupted_patch_is_never_served(service: Service) -> None:
    version = edit(service, seed=6)["version"]
    assert version is not None
    corrupt(service.store.version_dir("tiny", version) / PATCH_FILE)
    base = f"/v1/models/tiny/versions/{version}"

    patch = service.client.get(f"{base}/patch")
    assert patch.status_code == 500 and patch.json()["error"] == "IntegrityError"
    assert "sha256" in patch.json()["detail"]

    weights = service.client.get(f"{base}/weights")  # the worker reads the patch
    assert weights.status_code >= 500 and "sha256" in weights.json()["detail"], weights.text

    files = [("images", ("x.png", png(6), "image/png"))]  # never loaded before: read from disk
    predict = service.client.post(f"{base}/predict", files=files)
    assert predict.status_code >= 500 and "sha256" in predict.json()["detail"], predict.text

    before = published(service)
    child = edit(service, model=f"tiny@{version}", seed=7)  # an edit on top of it
    assert_failed_cleanly(service, child, before, "sha256")
