"""Tenants are kept apart: another tenant's job, version, alias or Idempotency-Key reads as unknown
(404, never 403); each tenant has a queued-job limit and each key a request rate (429 +
Retry-After); /readyz names no workers to a caller without a key. Real redis-server and worker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import ApiSettings
from tests.redis_server import png
from tests.service.conftest import Served, api

pytestmark = pytest.mark.redis

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
FAST = {"lr": "0.01", "max_steps": "5", "min_sr": "0"}  # accepted whatever it fixes


def submit(client: TestClient, headers: dict[str, str], model: str = "tiny", **extra: Any) -> Any:
    files = [("images", ("0.png", png(11), "image/png"))]
    data = {"label": "3", "model": model, **FAST}
    return client.post("/v1/edits", files=files, data=data, headers={**headers, **extra})


def keys_file(folder: Path, **keys: str) -> Path:
    """A keys file (TOML) of ``tenant=key`` pairs: it holds the keys' sha256 only."""
    path = folder / "keys.toml"
    path.write_text(
        "".join(
            f'[tenants.{tenant}]\nkey_sha256 = ["{hashlib.sha256(key.encode()).hexdigest()}"]\n'
            for tenant, key in keys.items()
        )
    )
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keys_file(tmp_path_factory.mktemp("keys"), alice="ka", bob="kb")


@pytest.fixture(scope="module")
def keyed(served: Served, keys: Path) -> Iterator[TestClient]:
    """The served store, redis and worker behind an API with two tenants (no rate limit)."""
    with api(served.redis_url, served.store.root, api_keys_file=keys, rate_per_s=0) as client:
        yield client


@pytest.fixture(scope="module")
def alices(keyed: TestClient) -> dict[str, Any]:
    """Alice's succeeded edit, whose version she aliased ``prod``."""
    job = submit(keyed, ALICE).json()
    done = keyed.get(f"/v1/edits/{job['id']}", params={"wait": 60}, headers=ALICE).json()
    assert done["status"] == "succeeded", done
    r = keyed.put("/v1/models/tiny/aliases/prod", json={"version": done["version"]}, headers=ALICE)
    assert r.status_code == 200, r.text
    return done


def _unknown(r: Any, error: str) -> None:
    assert r.status_code == 404 and r.json()["error"] == error, r.text


def test_another_tenants_job_is_unknown_to_read_and_to_cancel(
    keyed: TestClient, alices: dict[str, Any]
) -> None:
    job = alices["id"]
    _unknown(keyed.get(f"/v1/edits/{job}", headers=BOB), "JobNotFound")
    _unknown(keyed.post(f"/v1/edits/{job}/cancel", headers=BOB), "JobNotFound")
    # the same answer as for an id that never existed: nothing tells Bob the job exists
    never = keyed.get("/v1/edits/j0123456789abcdef", headers=BOB).json()["detail"]
    assert keyed.get(f"/v1/edits/{job}", headers=BOB).json()["detail"] == never.replace(
        "j0123456789abcdef", job
    )
    assert keyed.get(f"/v1/edits/{job}", headers=ALICE).json()["status"] == "succeeded"


def test_another_tenants_version_and_alias_are_unknown(
    keyed: TestClient, alices: dict[str, Any]
) -> None:
    version, base = alices["version"], "/v1/models/tiny/versions"
    for ref in (version, "prod"):
        _unknown(keyed.get(f"{base}/{ref}", headers=BOB), "UnknownVersionError")
        _unknown(keyed.get(f"{base}/{ref}/patch", headers=BOB), "UnknownVersionError")
        _unknown(keyed.get(f"{base}/{ref}/weights", headers=BOB), "UnknownVersionError")
        _unknown(keyed.get(f"{base}/{ref}/review", headers=BOB), "UnknownVersionError")
        files = [("images", ("0.png", png(1), "image/png"))]
        predict = keyed.post(f"{base}/{ref}/predict", files=files, headers=BOB)
        _unknown(predict, "UnknownVersionError")
        _unknown(submit(keyed, BOB, model=f"tiny@{ref}"), "UnknownVersionError")  # as a parent
    _unknown(submit(keyed, BOB, model=version), "UnknownModelError")  # a bare version id
    listing = keyed.get(base, headers=BOB).json()
    assert listing["versions"] == [] and listing["aliases"] == {}
    model = keyed.get("/v1/models/tiny", headers=BOB).json()
    assert (model["latest_version"], model["aliases"], model["n_versions"]) == (None, {}, 0)
    mine = keyed.get(base, headers=ALICE).json()
    assert version in [v["version"] for v in mine["versions"]]
    assert mine["aliases"] == {"prod": version}


def test_another_tenant_cannot_move_or_delete_prod(
    keyed: TestClient, alices: dict[str, Any]
) -> None:
    prod, version = "/v1/models/tiny/aliases/prod", alices["version"]
    _unknown(keyed.put(prod, json={"version": version}, headers=BOB), "UnknownVersionError")
    _unknown(keyed.delete(prod, headers=BOB), "UnknownVersionError")
    r = keyed.get("/v1/models/tiny/versions/prod", headers=ALICE)
    assert r.status_code == 200 and r.json()["version"] == version


def test_idempotency_keys_do_not_collide_across_tenants(idle: Served, keys: Path) -> None:
    with api(idle.redis_url, idle.store.root, api_keys_file=keys, rate_per_s=0) as client:
        key = {"Idempotency-Key": "same-key"}
        first = submit(client, ALICE, **key)
        other = submit(client, BOB, **key)
        again = submit(client, ALICE, **key)
    assert first.status_code == other.status_code == 202, (first.text, other.text)
    assert other.json()["id"] != first.json()["id"]
    assert "Idempotent-Replayed" not in other.headers
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"]


def test_a_tenant_at_its_queued_job_limit_gets_429_with_retry_after(
    idle: Served, tmp_path: Path
) -> None:
    carol, dave = {"Authorization": "Bearer kc"}, {"Authorization": "Bearer kd"}  # no jobs yet
    keys = keys_file(tmp_path, carol="kc", dave="kd")
    with api(
        idle.redis_url, idle.store.root, api_keys_file=keys, rate_per_s=0, max_active_jobs=2
    ) as client:
        jobs = [submit(client, carol).json()["id"] for _ in range(2)]  # no worker: they stay
        refused = submit(client, carol)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "TooManyJobs" and "cancel" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) > 0
        assert submit(client, dave).status_code == 202  # Dave's limit is his own
        client.post(f"/v1/edits/{jobs[0]}/cancel", headers=carol)
        assert submit(client, carol).status_code == 202  # a canceled job frees its slot


def test_a_key_over_its_request_rate_gets_429_with_retry_after(idle: Served, keys: Path) -> None:
    with api(
        idle.redis_url, idle.store.root, api_keys_file=keys, rate_per_s=0.2, rate_burst=3
    ) as c:
        answers = [c.get("/v1/models", headers=ALICE) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[-1].json()["error"] == "RateLimited"
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 5
        assert c.get("/v1/models", headers=BOB).status_code == 200  # per key


def test_readyz_names_workers_only_to_a_caller_with_a_key(keyed: TestClient) -> None:
    anonymous = keyed.get("/readyz")
    assert anonymous.status_code == 200, anonymous.text
    assert anonymous.json()["workers"] is None and anonymous.json()["unavailable_models"] is None
    assert keyed.get("/readyz", headers={"Authorization": "Bearer wrong"}).json()["workers"] is None
    assert keyed.get("/readyz", headers=BOB).json()["workers"]


def test_keys_file_holds_digests_tenants_and_limits(tmp_path: Path) -> None:
    from service.tenants import Keyring  # here: the tests above run without it too

    digest = hashlib.sha256(b"ka").hexdigest()
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[tenants.alice]\nkey_sha256 = ["{digest}"]\nmax_active_jobs = 1\n')
    ring = Keyring.from_settings(ApiSettings(api_keys="plain,bob:kb", api_keys_file=toml))
    alice = ring.authenticate("Bearer ka")
    assert alice is not None and (alice.tenant, alice.limits.max_active_jobs) == ("alice", 1)
    assert alice.limits.rate_per_s == ApiSettings().rate_per_s  # the default where not set
    plain = ring.authenticate("Bearer plain")
    assert plain is not None and plain.tenant == "default"  # plain keys: as before tenants
    bob = ring.authenticate("Bearer kb")  # a tenant:key pair
    assert bob is not None and bob.tenant == "bob" and bob.key_id != alice.key_id
    assert ring.authenticate("Bearer bob:kb") is None
    with pytest.raises(ValueError, match="also"):  # one key, two tenants
        Keyring.from_settings(ApiSettings(api_keys="bob:ka", api_keys_file=toml))
    assert ring.authenticate(f"Bearer {digest}") is None  # the digest is not a key
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"tenants": {"bob": {"key_sha256": ["kb"]}}}))
    with pytest.raises(ValueError, match=r"keys\.json: .*key_sha256"):
        Keyring.from_settings(ApiSettings(api_keys_file=bad))
    for key in ("k\u00fc", "two words", "tab\tkey"):  # no client sends these bytes alike
        with pytest.raises(ValueError, match="printable ASCII"):
            Keyring.from_settings(ApiSettings(api_keys=f"bob:{key}"))


def test_each_tenant_lists_its_own_edits_newest_first_a_page_at_a_time(
    keyed: TestClient,
) -> None:
    mine = [submit(keyed, ALICE).json()["id"] for _ in range(3)]
    theirs = submit(keyed, BOB).json()["id"]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        answer = keyed.get("/v1/edits", params=params, headers=ALICE)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["edits"]) <= 2 and all(e["report"] is None for e in body["edits"])
        seen += [e["id"] for e in body["edits"]]
        if body["next_before"] is None:
            break
        assert body["next_before"] == seen[-1] and 'rel="next"' in answer.headers["link"]
        params = {"limit": 2, "before": body["next_before"]}
    assert seen[:3] == mine[::-1] and theirs not in seen and len(seen) == len(set(seen))
    bobs = [e["id"] for e in keyed.get("/v1/edits", headers=BOB).json()["edits"]]
    assert bobs[0] == theirs and not set(mine) & set(bobs)
    # another tenant's job is no place to start a page from: it reads as unknown
    _unknown(keyed.get("/v1/edits", params={"before": mine[0]}, headers=BOB), "JobNotFound")
    for query, status in (("limit=0", 422), ("limit=101", 422), ("before=a:b", 422)):
        answer = keyed.get(f"/v1/edits?{query}", headers=ALICE)
        assert answer.status_code == status, (query, answer.text)


def test_a_listed_job_whose_record_expired_is_left_out_and_dropped(served: Served) -> None:
    from workers.client import DEFAULT_TENANT, edits_index_key

    index = edits_index_key(DEFAULT_TENANT)
    gone = "j" + "0" * 32
    served.jobs.redis.zadd(index, {gone: 1.0})  # the oldest entry, its job record expired
    everything, _ = served.jobs.list_edits(100)
    assert gone not in [v.id for v in everything]
    assert served.jobs.redis.zscore(index, gone) is None
