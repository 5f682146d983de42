"""Scaling out on an S3 store: the API and two worker processes, each with its own local cache
folder (as on three hosts), share one bucket (an S3 emulator, tests/s3_server.py) and one Redis.

A model registered over HTTP goes up through the API's cache and comes down into each worker's;
a burst of edits is shared by the workers; the API serves their versions, patches and merged
weights from the bucket; an alias set through the API is what a fourth host reads; a purge
leaves nothing in the bucket.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from models.store.remote import S3Remote
from models.store.store import Store
from tests.redis_server import (
    benchmark_zip,
    db_url,
    make_benchmark,
    make_tiny_backbone,
    png,
    wait_for,
    worker_process,
)
from tests.service.conftest import api

pytestmark = pytest.mark.redis

BURST = 4


def model_parts(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart files of POST /v1/models for the tiny backbone and its benchmark."""
    manifest_path = make_tiny_backbone(folder / "backbone")
    manifest = json.loads(manifest_path.read_text())
    bench = make_benchmark(folder / "bench")
    weights = (manifest_path.parent / manifest["weights"]).read_bytes()
    return [
        ("backbone", ("b.json", manifest_path.read_bytes(), "application/json")),
        ("weights", ("b.safetensors", weights, "application/octet-stream")),
        ("benchmark", ("bench.zip", benchmark_zip(bench), "application/zip")),
    ]


def test_api_and_two_workers_share_an_s3_store_through_their_own_caches(
    redis_url: str, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    url = db_url(redis_url, 0)
    redis = Redis.from_url(url)
    s3 = {"VITEDIT_STORE_URL": s3_url, "VITEDIT_S3_ENDPOINT_URL": s3_endpoint}
    caches = {name: tmp_path / name for name in ("api", "worker-a", "worker-b", "other")}
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with (
        worker_process(url, caches["worker-a"], logs[0], **s3),
        worker_process(url, caches["worker-b"], logs[1], **s3),
        api(url, caches["api"], store_url=s3_url, s3_endpoint_url=s3_endpoint) as client,
    ):
        r = client.post("/v1/models", files=model_parts(tmp_path), data={"name": "mine"})
        assert r.status_code == 201, r.text

        ids = []
        for seed in range(BURST):
            files = [("images", ("x.png", png(seed), "image/png"))]
            data = {"label": "3", "model": "mine", "method": "ft", "max_steps": "20"}
            r = client.post("/v1/edits", files=files, data={**data, "min_sr": "0"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def ended() -> bool:
            states = [client.get(f"/v1/edits/{i}").json()["status"] for i in ids]
            return all(s not in ("queued", "running") for s in states)

        assert wait_for(ended, 180, poll_s=0.5)
        views = [client.get(f"/v1/edits/{i}").json() for i in ids]
        assert all(v["status"] == "succeeded" for v in views), views
        workers = {
            Job.fetch(i, connection=redis, serializer=JSONSerializer).worker_name for i in ids
        }
        assert len(workers) == 2, workers  # the burst was shared
        for cache in ("worker-a", "worker-b"):  # each worker fetched the model into its cache
            assert (caches[cache] / "models/mine/base/backbone.json").is_file()

        # the API host reads what the workers published: versions, patches, merged weights
        version = views[0]["version"]
        listed = client.get("/v1/models/mine/versions").json()
        assert {v["version"] for v in listed["versions"]} == {v["version"] for v in views}
        patch = client.get(f"/v1/models/mine/versions/{version}/patch")
        assert patch.status_code == 200
        other = Store(caches["other"], remote=S3Remote(s3_url, endpoint_url=s3_endpoint))
        manifest = other.version("mine", version)  # a fourth host, reading the bucket
        assert patch.headers["X-Content-SHA256"] == manifest.files["patch.safetensors"]
        weights = client.get(f"/v1/models/mine/versions/{version}/weights")
        assert weights.status_code == 200 and len(weights.content) > 0

        r = client.put("/v1/models/mine/aliases/prod", json={"version": version})
        assert r.status_code == 200, r.text
        assert other.resolve("mine@prod").version == version
        assert other.remote is not None and other.remote.list("uploads/") == []
        assert not any((caches["api"] / "uploads").iterdir())  # no upload stays on the API host

        # a model put into the bucket by the team itself (as `aws s3 cp` would), registered
        # from there: the worker that loads it downloads the folder into its cache
        manifest = json.loads(dict(model_parts(tmp_path / "again"))["backbone"][1])
        weights = dict(model_parts(tmp_path / "again"))["weights"][1]
        put = other.remote.put_bytes
        put(
            "incoming/big/backbone.json",
            json.dumps({**manifest, "weights": "w.safetensors"}).encode(),
        )
        put("incoming/big/w.safetensors", weights)
        r = client.post("/v1/models", data={"name": "big", "source": "incoming/big"})
        assert r.status_code == 201, r.text
        assert [b.key for b in other.remote.list("models/big/base/")] == [
            "models/big/base/backbone.json",
            "models/big/base/backbone.safetensors",
        ]
        assert client.delete("/v1/models/big").status_code == 204

        assert client.delete("/v1/models/mine", params={"purge": True}).status_code == 204
        assert other.models() == [] and other.remote.list("models/") == []


def test_an_unreachable_s3_store_answers_503_with_the_reason(
    redis_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """(``s3_endpoint``: for the session's credentials; this test stops its own server.)"""
    from tests.s3_server import new_bucket, s3_server

    url = db_url(redis_url, 0)
    server = contextlib.ExitStack()
    endpoint = server.enter_context(s3_server())
    new_bucket(endpoint, "gone-soon")
    settings = {"store_url": "s3://gone-soon/store", "s3_endpoint_url": endpoint}
    with api(url, tmp_path / "api", **settings) as client:
        assert client.get("/v1/models").json() == []
        server.close()  # the S3 server goes away under the running API
        r = client.get("/v1/models")
        assert r.status_code == 503, r.text
        assert "could not be reached" in r.json()["detail"]
        assert "VITEDIT_S3_ENDPOINT_URL" in r.json()["detail"]
        ready = client.get("/readyz")  # a load balancer stops sending it requests
        assert ready.status_code == 503 and ready.json()["store"] is False
    with (
        pytest.raises(Exception, match="could not be reached"),
        api(url, tmp_path / "b", **settings),
    ):
        pass  # and an API started without it stops at start, saying why


def test_a_request_reads_each_s3_index_once(
    redis_url: str, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    # the registry (models.json) and an alias file are read with conditional GETs, and a
    # version's existence with a HEAD: once per request, however many times the request
    # looks (before: 2-3 GETs of models.json per request)
    from workers.registration import register_model

    url = db_url(redis_url, 0)
    setup = Store(tmp_path / "setup", remote=S3Remote(s3_url, endpoint_url=s3_endpoint))
    register_model(setup, "tiny", make_tiny_backbone(tmp_path / "backbone"), default_method="ft")
    with api(url, tmp_path / "api", store_url=s3_url, s3_endpoint_url=s3_endpoint) as client:
        calls: list[tuple[str, str]] = []
        events = client.app.state.store.remote.client.meta.events
        for op in ("GetObject", "HeadObject"):
            events.register(
                f"before-parameter-build.s3.{op}",
                lambda params, op=op, **_: calls.append((op, params["Key"].rsplit("/", 1)[-1])),
            )
        reads: dict[str, list[tuple[str, str]]] = {}
        for name, request in {
            "model": lambda: client.get("/v1/models/tiny"),
            "versions": lambda: client.get("/v1/models/tiny/versions"),
            "submit": lambda: client.post(
                "/v1/edits",
                files=[("images", ("x.png", png(1), "image/png"))],
                data={"label": "3", "model": "tiny@latest"},
            ),
        }.items():
            calls.clear()
            assert request().status_code < 300
            reads[name] = list(calls)
        for name, seen in reads.items():
            assert seen.count(("GetObject", "models.json")) <= 1, (name, seen)
            assert len(seen) == len(set(seen)), (name, seen)  # nothing read twice
    Redis.from_url(url).flushdb()
