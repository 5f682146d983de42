"""The warm model stays the base between jobs: a patch cut off midway is reverted, a base found
modified at job start is restored; a model that fails to load is marked unavailable (and listed by
/readyz) while the worker serves the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from redis import Redis

from models.errors import ModelUnavailable
from tests.redis_server import db_url, make_tiny_backbone, png, tiny_store, wait_for, worker_process
from tests.workers.test_runtime import edit_once
from workers import tasks
from workers.payloads import PredictPayload
from workers.registration import register_model
from workers.runtime import Runtime
from workers.settings import WorkerSettings

NO_REDIS = "redis://127.0.0.1:1/0"  # never contacted by these in-process jobs


class CutOff(Exception):
    """Stands for RQ's job timeout, which arrives as an exception at whatever line runs."""


def sites_are_base(rt: Runtime, name: str = "tiny") -> bool:
    loaded = rt.models[name]
    params = loaded.sites.params(loaded.model)
    return all(torch.equal(p, b) for p, b in zip(params, loaded.base_weights, strict=True))


def test_a_version_load_cut_off_midway_leaves_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cpu")
    version = edit_once(Runtime(settings, Redis.from_url(NO_REDIS)), 71)
    rt = Runtime(settings, Redis.from_url(NO_REDIS))  # a fresh worker: v1 is not cached
    loaded = rt.load("tiny")
    original, calls = torch.Tensor.index_copy_, []

    def cut_off_second_write(self: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise CutOff
        return original(self, *args)

    monkeypatch.setattr(torch.Tensor, "index_copy_", cut_off_second_write)
    with pytest.raises(CutOff), rt.activate(loaded, version):
        pass
    assert sites_are_base(rt)


def predict(rt: Runtime, seed: int) -> list[float]:
    upload, _ = rt.store.new_upload()
    path = rt.store.write_upload(upload, "p-000", png(seed))
    out = tasks.predict(rt, PredictPayload(model="tiny", upload=upload, images=[path]), job=None)
    return [t["probability"] for t in out["predictions"][0]["top"]]


def test_a_job_starts_on_the_base_even_if_the_last_one_left_it_modified(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    rt = Runtime(WorkerSettings(store=store.root, device="cpu"), Redis.from_url(NO_REDIS))
    clean = predict(rt, 5)
    loaded = rt.models["tiny"]
    with torch.no_grad():  # what a revert cut off by a timeout would leave behind
        loaded.sites.params(loaded.model)[0].add_(1.0)
    assert predict(rt, 5) == clean
    assert sites_are_base(rt)


def broken_store(tmp_path: Path) -> Path:
    """``tiny`` and ``broken``, whose backbone weights file was replaced after registration."""
    store = tiny_store(tmp_path)
    register_model(store, "broken", make_tiny_backbone(tmp_path / "other"))
    (tmp_path / "other" / "tiny.safetensors").write_bytes(b"not safetensors")
    return store.root


def test_a_model_that_fails_to_load_is_unavailable_and_the_others_serve(tmp_path: Path) -> None:
    root = broken_store(tmp_path)
    rt = Runtime(WorkerSettings(store=root, device="cpu"), Redis.from_url(NO_REDIS))
    rt.preload()  # does not raise: one bad model must not stop (and crash-loop) the worker
    assert set(rt.models) == {"tiny"}
    failed_at = rt.unavailable["broken"].at
    with pytest.raises(ModelUnavailable, match="'broken' failed to load"):
        rt.load("broken")
    assert rt.unavailable["broken"].at == failed_at  # not tried again on every job
    assert predict(rt, 3)


@pytest.mark.redis
def test_readyz_lists_the_model_a_worker_could_not_load(redis_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import ApiSettings

    url = db_url(redis_url, 8)
    root = broken_store(tmp_path)
    app = create_app(ApiSettings(redis_url=url, store=root))
    with worker_process(url, root) as worker, TestClient(app) as client:

        def listed() -> bool:
            return "broken" in (client.get("/readyz").json().get("unavailable_models") or {})

        assert wait_for(listed, 15)
        body = client.get("/readyz").json()
        assert body["status"] == "ok" and "tiny" not in body["unavailable_models"]
        assert "failed to load" in body["unavailable_models"]["broken"]
        assert worker.poll() is None
