"""Through a real Redis and worker: the acceptance gate (an edit that fixes nothing is stored as
rejected, gets no alias, and its job says why) and Idempotency-Key replays after success."""

from __future__ import annotations

import pytest

from models.errors import StoreError
from tests.redis_server import png
from tests.service.conftest import Served, commit_version
from tests.service.test_edits import FAST, finished, submit, wrong_target

pytestmark = pytest.mark.redis

NO_OP = {"lr": "1e-9", "max_steps": "1"}  # too weak to flip any prediction


def test_an_edit_that_fixes_nothing_is_rejected_and_gets_no_alias(served: Served) -> None:
    image = png(81)
    good = finished(
        served.client,
        submit(served.client, [image], str(wrong_target(served, image)), **FAST).json()["id"],
    )
    assert good["status"] == "succeeded" and good["report"]["acceptance"]["passed"], good

    body = finished(
        served.client,
        submit(served.client, [png(82)], str(wrong_target(served, png(82))), **NO_OP).json()["id"],
    )
    assert body["status"] == "rejected", body
    assert "SR 0.000 < min_sr 1" in body["error"] and "max_steps" in body["error"]
    rejected = body["version"]
    manifest = served.store.version("tiny", rejected)
    assert manifest.status == "rejected" and manifest.reason == body["error"]
    assert served.client.get("/v1/models/tiny/versions/latest").json()["version"] == good["version"]
    assert served.client.get("/v1/models/tiny").json()["latest_version"] == good["version"]
    listing = {
        v["version"]: v for v in served.client.get("/v1/models/tiny/versions").json()["versions"]
    }
    assert listing[rejected]["status"] == "rejected" and listing[rejected]["aliases"] == []
    put = served.client.put("/v1/models/tiny/aliases/prod", json={"version": rejected})
    assert put.status_code == 422 and "rejected" in put.json()["detail"]

    lowered = submit(
        served.client, [png(82)], str(wrong_target(served, png(82))), min_sr="0", **NO_OP
    )
    assert finished(served.client, lowered.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize("form", [{"min_sr": "1.5"}, {"min_lr": "-0.1"}, {"min_retention": "nan"}])
def test_acceptance_minima_outside_0_1_are_refused(served: Served, form: dict[str, str]) -> None:
    r = submit(served.client, [png(83)], "1", **form)
    assert r.status_code == 422 and next(iter(form)) in r.json()["detail"], r.text


def test_a_retry_after_success_with_latest_replays_the_same_job(served: Served) -> None:
    headers = {"Idempotency-Key": "retry-after-success"}
    image = png(84)
    target = str(wrong_target(served, image))
    first = submit(served.client, [image], target, model="tiny@latest", headers=headers, **FAST)
    assert finished(served.client, first.json()["id"])["status"] == "succeeded"
    again = submit(served.client, [image], target, model="tiny@latest", headers=headers, **FAST)
    assert again.status_code == 202, again.text  # @latest now names the job's own version
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


def test_a_rejected_version_is_refused_as_the_parent_of_an_edit(idle: Served) -> None:
    """A child measured against a rejected parent would pass its own gate (LR_vs_parent 1.0)
    and carry the refused damage into ``latest`` and an alias: 422 before anything is queued,
    however the parent is named."""
    why = "LR_vs_parent 0.172 < min_lr 1"
    rejected = commit_version(idle.store, rejected=why)
    accepted = commit_version(idle.store)
    queued = idle.jobs.edits.count
    for ref in (f"tiny@{rejected}", rejected):
        r = submit(idle.client, [png(85)], "1", model=ref, **FAST)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert f"version {rejected} of tiny was rejected" in detail and why in detail, detail
        assert "accepted version" in detail and r.json()["error"] == "StoreError"
    assert idle.jobs.edits.count == queued  # nothing queued
    assert not any((idle.store.root / "uploads").iterdir())  # nor uploaded
    r = submit(idle.client, [png(85)], "1", model=f"tiny@{accepted}", **FAST)
    assert r.status_code == 202, r.text
    idle.client.post(f"/v1/edits/{r.json()['id']}/cancel")


def test_the_store_refuses_to_publish_a_child_of_a_rejected_version(idle: Served) -> None:
    """What the worker publishes is checked again, not only by the API."""
    rejected = commit_version(idle.store, rejected="SR 0.000 < min_sr 1")
    with pytest.raises(StoreError, match=f"version {rejected} of tiny was rejected"):
        commit_version(idle.store, parent=rejected)
    assert [m.version for m in idle.store.versions("tiny") if m.parent == rejected] == []
