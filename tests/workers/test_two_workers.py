"""Two worker processes on one Redis and one store: what scaling out (README, "Scaling out") needs.

A burst of edits is shared between the workers, each job runs exactly once (one version per job,
named by its job id), each worker loads the model once and keeps it warm for all its jobs, and a
version written by one worker is served by the other once the first is gone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.redis_server import db_url, png, tiny_store, wait_for, worker_process
from tests.service.conftest import api
from workers.client import JobClient

pytestmark = pytest.mark.redis

BURST = 8
READY_LINE = "model tiny ready"  # workers/warm.py logs it once per load of the model


def test_two_workers_share_a_burst_and_serve_each_others_versions(
    redis_url: str, tmp_path: Path
) -> None:
    url = db_url(redis_url, 4)
    redis = Redis.from_url(url)
    redis.flushdb()
    store = tiny_store(tmp_path)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with (
        worker_process(url, store.root, logs[0]) as first,
        worker_process(url, store.root, logs[1]),
        api(url, store.root) as client,
    ):
        ids = []
        for seed in range(BURST):  # sent at once: both workers are idle and listening
            files = [("images", ("x.png", png(seed), "image/png"))]
            data = {"label": "3", "model": "tiny", "max_steps": "20", "min_sr": "0"}
            r = client.post("/v1/edits", files=files, data=data)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def ended() -> bool:
            states = [client.get(f"/v1/edits/{i}").json()["status"] for i in ids]
            return all(s not in ("queued", "running") for s in states)

        assert wait_for(ended, 120, poll_s=0.5)
        views = {i: client.get(f"/v1/edits/{i}").json() for i in ids}
        assert all(v["status"] == "succeeded" for v in views.values()), views

        ran_by = {
            i: Job.fetch(i, connection=redis, serializer=JSONSerializer).worker_name for i in ids
        }
        assert len(set(ran_by.values())) == 2, ran_by  # the burst was shared

        # exactly once: one version per job, each naming its job
        versions = store.versions("tiny")
        assert sorted(m.job_id for m in versions) == sorted(ids)
        assert {views[i]["version"] for i in ids} == {m.version for m in versions}

        # warm: each worker loaded the model once, for all the jobs it ran
        for log in logs:
            assert log.read_text().count(READY_LINE) == 1, log.read_text()[-2000:]

        # the first worker's version, served by the second once the first has stopped
        first_name = next(name for name in set(ran_by.values()) if name.endswith(f"-{first.pid}"))
        version = next(views[i]["version"] for i in ids if ran_by[i] == first_name)
        first.terminate()
        first.wait(timeout=30)
        jobs = JobClient(redis)
        assert wait_for(lambda: first_name not in jobs.live_workers(), 30)
        start = time.monotonic()
        files = [("images", ("x.png", png(0), "image/png"))]
        r = client.post(f"/v1/models/tiny/versions/{version}/predict", files=files)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version
        print(f"\nversion of worker A served by worker B in {time.monotonic() - start:.2f} s")


def test_two_registrations_of_one_name_at_once_leave_one_consistent_model(
    redis_url: str, tmp_path: Path
) -> None:
    # two workers, two POST /v1/models of a new name at the same moment, with other weights:
    # one is registered, the other refused, and the entry names the files that are there
    import json
    import threading

    from safetensors.torch import load, save

    from models.store.manifest import sha256_file
    from models.store.store import Store
    from tests.redis_server import make_tiny_backbone

    url = db_url(redis_url, 4)
    Redis.from_url(url).flushdb()
    store = tiny_store(tmp_path)
    manifest_path = make_tiny_backbone(tmp_path / "twin")
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("weights_sha256")
    first = (manifest_path.parent / manifest["weights"]).read_bytes()
    state = load(first)
    key = next(iter(state))
    state[key] = state[key] + 1.0  # the second registration's weights differ
    bodies = [first, save(state)]
    answers: list[int] = []
    with (
        worker_process(url, store.root, tmp_path / "worker-a.log"),
        worker_process(url, store.root, tmp_path / "worker-b.log"),
        api(url, store.root) as one,
        api(url, store.root) as two,
    ):
        start = threading.Barrier(2)

        def post(client, weights: bytes) -> None:
            parts = [
                ("backbone", ("b.json", json.dumps(manifest).encode(), "application/json")),
                ("weights", ("b.safetensors", weights, "application/octet-stream")),
            ]
            start.wait()
            answers.append(
                client.post("/v1/models", files=parts, data={"name": "twin"}).status_code
            )

        threads = [
            threading.Thread(target=post, args=a) for a in zip((one, two), bodies, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(answers) == [201, 422], answers
    entry = Store(store.root).model("twin")
    on_disk = store.root / "models" / "twin" / "base" / "backbone.safetensors"
    assert sha256_file(on_disk) == entry.weights_sha256
