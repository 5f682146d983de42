"""End to end through a real Redis and a real worker process: submit, follow, cancel, download,
predict, chain edits, aliases. The model is the tests' tiny random-init ViT."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as load_safetensors

from models.backbones import load_backbone
from models.sites import Patch
from models.store.manifest import BackboneManifest
from models.store.store import PATCH_FILE
from tests.redis_server import png, wait_for
from tests.service.conftest import Served

pytestmark = pytest.mark.redis

FAST = {"lr": "0.01", "max_steps": "60"}


def submit(
    client: TestClient,
    images: list[bytes],
    label: str,
    model: str = "tiny",
    headers: dict[str, str] | None = None,
    **form: Any,
) -> Any:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post(
        "/v1/edits",
        files=files,
        data={"label": label, "model": model, **form},
        headers=headers or {},
    )


def finished(client: TestClient, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    body = client.get(f"/v1/edits/{job_id}", params={"wait": timeout_s}).json()
    assert body["status"] in ("succeeded", "failed", "rejected", "canceled"), body
    return body


def fresh_backbone(served: Served) -> Any:
    return load_backbone(BackboneManifest.read(served.store.model("tiny").backbone))


def base_prediction(served: Served, image: bytes) -> int:
    return local_prediction(fresh_backbone(served), image)


def wrong_target(served: Served, image: bytes) -> int:
    return (base_prediction(served, image) + 1) % 10


def edit(served: Served, image: bytes, model: str = "tiny") -> dict[str, Any]:
    """Submit a fast edit towards a label the base model does not predict; wait for the end."""
    r = submit(served.client, [image], str(wrong_target(served, image)), model=model, **FAST)
    return finished(served.client, r.json()["id"])


def local_prediction(backbone: Any, image: bytes) -> int:
    with torch.no_grad():
        return int(backbone.model(backbone.preprocess([Image.open(io.BytesIO(image))])).argmax())


def test_edit_succeeds_and_its_patch_fixes_a_fresh_backbone(served: Served) -> None:
    image = png(11)
    target = wrong_target(served, image)
    r = submit(served.client, [image], str(target), **FAST)
    assert r.status_code == 202
    assert r.headers["location"] == f"/v1/edits/{r.json()['id']}"
    assert r.json()["status"] in ("queued", "running", "succeeded")
    body = finished(served.client, r.json()["id"])
    assert body["status"] == "succeeded", body
    assert body["report"]["metrics"]["SR"] == 1.0
    assert set(body["report"]["seconds"]) >= {"loading", "optimizing", "evaluating"}

    patch_resp = served.client.get(body["links"]["patch"])
    assert patch_resp.status_code == 200
    assert patch_resp.headers["x-content-sha256"] == hashlib.sha256(patch_resp.content).hexdigest()
    tmp = served.store.root.parent / "downloaded.patch.safetensors"
    tmp.write_bytes(patch_resp.content)
    patch, meta = Patch.load(tmp)
    assert meta["version"] == body["version"]
    fresh = fresh_backbone(served)
    patch.apply(fresh.model)
    assert local_prediction(fresh, image) == target


def test_predict_and_weights_use_the_new_version(served: Served) -> None:
    image = png(12)
    target = wrong_target(served, image)
    version = finished(
        served.client, submit(served.client, [image], str(target), **FAST).json()["id"]
    )["version"]
    files = [("images", ("x.png", image, "image/png"))]
    pred = served.client.post(f"/v1/models/tiny/versions/{version}/predict", files=files)
    assert pred.status_code == 200, pred.text
    assert pred.json()["predictions"][0]["label"] == target
    base = served.client.post("/v1/models/tiny/versions/base/predict", files=files).json()
    assert base["predictions"][0]["label"] == base_prediction(served, image)

    weights = served.client.get(f"/v1/models/tiny/versions/{version}/weights")
    assert weights.status_code == 200
    assert weights.headers["x-content-sha256"] == hashlib.sha256(weights.content).hexdigest()
    fresh = fresh_backbone(served)
    fresh.model.load_state_dict(load_safetensors(weights.content))
    assert local_prediction(fresh, image) == target


def test_chained_edit_starts_from_its_parent_and_reports_retention(served: Served) -> None:
    first_image, second_image = png(21), png(22)
    v1 = edit(served, first_image)["version"]
    second = edit(served, second_image, model=f"tiny@{v1}")
    assert second["status"] == "succeeded", second
    assert second["parent_version"] == v1
    assert v1 in second["report"]["retention"]["per_version"]
    # by hand: a version's patch (cumulative over the base) on a fresh backbone, asked about the
    # earlier edit images and the targets those edits were given
    first_target, second_target = (
        wrong_target(served, first_image),
        wrong_target(served, second_image),
    )

    def kept(version: str, image: bytes, target: int) -> float:
        fresh = fresh_backbone(served)
        Patch.load(served.store.version_file("tiny", version, PATCH_FILE))[0].apply(fresh.model)
        return float(local_prediction(fresh, image) == target)

    held = kept(second["version"], first_image, first_target)
    assert second["report"]["retention"] == {"per_version": {v1: held}, "min": held}
    # a third edit moves the first image to another class: v1's edit is lost, and says so
    third = finished(
        served.client,
        submit(
            served.client,
            [first_image],
            str((first_target + 1) % 10),
            model=f"tiny@{second['version']}",
            **FAST,
        ).json()["id"],
    )
    assert third["report"]["metrics"]["SR"] == 1.0
    per_version = {
        v1: kept(third["version"], first_image, first_target),
        second["version"]: kept(third["version"], second_image, second_target),
    }
    assert per_version[v1] == 0.0
    assert third["report"]["retention"] == {
        "per_version": per_version,
        "min": min(per_version.values()),
    }
    detail = served.client.get(f"/v1/models/tiny/versions/{second['version']}").json()
    assert detail["lineage"] == [v1, second["version"]]
    listing = served.client.get("/v1/models/tiny/versions").json()
    parents = {v["version"]: v["parent"] for v in listing["versions"]}
    assert parents[second["version"]] == v1


def test_aliases_move_and_resolve_in_submissions(served: Served) -> None:
    body = edit(served, png(31))
    put = served.client.put("/v1/models/tiny/aliases/prod", json={"version": body["version"]})
    assert put.status_code == 200 and put.json()["version"] == body["version"]
    detail = served.client.get("/v1/models/tiny/versions/prod").json()
    assert detail["version"] == body["version"] and "prod" in detail["aliases"]
    r = submit(served.client, [png(32)], "1", model="tiny@prod", max_steps="1")
    assert finished(served.client, r.json()["id"])["parent_version"] == body["version"]
    assert served.client.delete("/v1/models/tiny/aliases/prod").status_code == 204
    assert served.client.get("/v1/models/tiny/versions/prod").status_code == 404


def test_idempotency_key_replays_the_job_and_rejects_another_body(served: Served) -> None:
    headers = {"Idempotency-Key": "key-123"}
    first = submit(served.client, [png(41)], "2", headers=headers, max_steps="1")
    again = submit(served.client, [png(41)], "2", headers=headers, max_steps="1")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = submit(served.client, [png(42)], "2", headers=headers, max_steps="1")
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]
    finished(served.client, first.json()["id"])


def test_cancel_stops_a_running_job_and_removes_a_queued_one(served: Served) -> None:
    long = {"lr": "1e-9", "max_steps": "10000", "options": '{"stop_loss": 0}'}
    running = submit(served.client, [png(51)], "4", **long).json()["id"]
    queued = submit(served.client, [png(52)], "4", **long).json()["id"]

    def optimizing() -> bool:
        body = served.client.get(f"/v1/edits/{running}").json()
        return body["status"] == "running" and (body["step"] or 0) > 0

    assert wait_for(optimizing, 60)
    assert served.client.get(f"/v1/edits/{queued}").json()["position"] == 0
    uploads = served.store.root / "uploads"
    assert len(list(uploads.iterdir())) == 2  # the running job's images and the queued one's
    assert served.client.post(f"/v1/edits/{queued}/cancel").json()["status"] == "canceled"
    assert len(list(uploads.iterdir())) == 1  # the canceled job's went with it
    assert served.client.post(f"/v1/edits/{running}/cancel").json()["cancel_requested"]
    body = finished(served.client, running, timeout_s=30)
    assert body["status"] == "canceled" and body["version"] is None
    assert served.client.post(f"/v1/edits/{running}/cancel").status_code == 409


def test_models_listing_and_readiness(served: Served) -> None:
    models = served.client.get("/v1/models").json()
    tiny = next(m for m in models if m["name"] == "tiny")
    assert tiny["default_method"] == "ft" and "random" in tiny["methods"]
    assert tiny["class_names"][3] == "three"
    ready = served.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"]


def test_a_job_whose_model_was_removed_since_still_reads_with_its_version(served: Served) -> None:
    """GET /v1/edits/{id} answered 404 "no model named ..." while the job list showed the job."""
    from dataclasses import replace

    served.store.register_model(replace(served.store.model("tiny"), name="tiny-gone"))
    image = png(17)
    job = finished(served.client, edit(served, image, model="tiny-gone")["id"])
    assert job["status"] == "succeeded", job
    assert job["note"] is None and "version" in job["links"]
    r = served.client.delete("/v1/models/tiny-gone", params={"purge": True})
    assert r.status_code == 204, r.text
    r = served.client.get(f"/v1/edits/{job['id']}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["version"] == job["version"]
    assert body["report"] is None and "version" not in body["links"]
    assert f"version {job['version']} of tiny-gone no longer exists" in body["note"]
    listed = served.client.get("/v1/edits").json()["edits"]
    assert job["id"] in [e["id"] for e in listed]
