"""What a submit costs the API (scripts/load_test.py measures the latency; docs/reliability.md):
one Redis transaction, and models.json parsed again only when it changed."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from redis import Redis

from models.store.store import Store
from tests.redis_server import png
from tests.service.conftest import Served

pytestmark = pytest.mark.redis


def _calls(redis: Redis) -> Counter[str]:
    stats = redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()})


def _submit(idle: Served, seed: int) -> dict:
    files = [("images", ("x.png", png(seed), "image/png"))]
    r = idle.client.post("/v1/edits", files=files, data={"label": "3", "model": "tiny"})
    assert r.status_code == 202, r.text
    return r.json()


def test_a_submit_is_one_redis_transaction_and_reports_its_position(idle: Served) -> None:
    """RQ's enqueue took two MULTI/EXEC, and the position an LPOS (a scan of the queue)."""
    redis = Redis.from_url(idle.redis_url)
    ahead = idle.jobs.edits.count
    before = _calls(redis)
    job = _submit(idle, 1)
    done = _calls(redis) - before
    assert done["exec"] == 1 and done["lpos"] == 0, dict(done)
    assert job["position"] == ahead
    assert idle.jobs.edits.job_ids[ahead] == job["id"]
    assert _submit(idle, 2)["position"] == ahead + 1
    idle.client.post(f"/v1/edits/{job['id']}/cancel")


def test_a_model_registered_while_the_api_runs_is_served_at_once(idle: Served) -> None:
    """The API keeps models.json parsed between requests: a change must show in the next one."""
    store = Store(idle.store.root)
    entry = store.model("tiny")
    assert idle.client.get("/v1/models/tiny2").status_code == 404
    store.register_model(replace(entry, name="tiny2"))
    assert idle.client.get("/v1/models/tiny2").json()["default_method"] == entry.default_method
    other = next(m for m in entry.methods if m != entry.default_method)
    store.register_model(replace(entry, name="tiny2", default_method=other))
    assert idle.client.get("/v1/models/tiny2").json()["default_method"] == other
