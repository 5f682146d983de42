"""One error tree, one status table, one JSON shape: for our named errors, for FastAPI's own
404/405/422, for an unreachable Redis and for anything unexpected."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cli import launcher
from models import errors as E
from service.main import create_app
from service.settings import ApiSettings
from tests.service.conftest import Served
from workers import client as C


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (E.UnknownModelError, 404),
        (E.UnknownVersionError, 404),
        (C.JobNotFound, 404),
        (E.DataError, 422),
        (E.EditConfigError, 422),
        (E.EditDiverged, 422),
        (E.UnknownMethodError, 422),
        (E.StoreError, 422),
        (E.TooLarge, 413),
        (E.Unauthorized, 401),
        (C.IdempotencyConflict, 409),
        (C.JobNotCancelable, 409),
        (C.QueueUnavailable, 503),
        (E.RateLimited, 429),
        (C.JobTimeout, 504),
        (C.JobFailed, 500),
        (E.IntegrityError, 500),
        (E.ManifestError, 500),
    ],
)
def test_each_named_error_takes_the_status_of_its_kind(error: type, status: int) -> None:
    assert E.status_of(error) == status


def test_job_errors_belong_to_the_one_tree() -> None:
    assert issubclass(C.JobNotFound, E.NotFound)
    assert issubclass(C.IdempotencyConflict, E.Conflict)
    assert issubclass(C.JobTimeout, E.Unavailable)
    assert all(issubclass(cls, E.VitEditError) for cls in (C.JobFailed, C.QueueUnavailable))


def _app(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0") -> TestClient:
    app = create_app(ApiSettings(redis_url=redis_url, store=tmp_path / "store"))

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    return TestClient(app, raise_server_exceptions=False)


def _is_error(body: dict, error: str) -> None:
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["error"] == error


def test_fastapis_own_errors_and_bugs_answer_the_json_shape(tmp_path: Path) -> None:
    with _app(tmp_path) as client:
        r = client.get("/v2/nothing")
        assert r.status_code == 404 and "/docs" in r.json()["detail"]
        _is_error(r.json(), "NotFound")
        r = client.delete("/v1/edits")
        assert r.status_code == 405 and "DELETE" in r.json()["detail"]
        _is_error(r.json(), "MethodNotAllowed")
        r = client.post("/v1/edits", data={"model": "tiny"})
        assert r.status_code == 422
        _is_error(r.json(), "Invalid")
        assert "'label'" in r.json()["detail"] and "'images'" in r.json()["detail"]
        r = client.get("/v1/edits/j1", params={"wait": "-1"})
        assert r.status_code == 422 and "'wait'" in r.json()["detail"]
        r = client.get("/boom")
        assert r.status_code == 500
        _is_error(r.json(), "InternalError")
        assert "a bug" not in r.text  # no internals leak


def test_unreachable_redis_is_503_json_with_retry_after(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{launcher.free_port()}/0"  # nothing listens there
    with _app(tmp_path, url) as client:
        r = client.get("/v1/edits/j0123")
        assert r.status_code == 503 and r.headers["retry-after"]
        _is_error(r.json(), "QueueUnavailable")


@pytest.mark.redis
def test_named_errors_answer_their_class_name(idle: Served) -> None:
    r = idle.client.get("/v1/models/nope")
    assert r.status_code == 404
    _is_error(r.json(), "UnknownModelError")


def test_a_message_loses_this_hosts_paths_but_keeps_routes_and_store_keys() -> None:
    from service.errors import without_paths

    root = "/srv/vitedit/store"
    assert without_paths(f"manifest {root}/models/m/versions/v/manifest.json is bad", (root,)) == (
        "manifest models/m/versions/v/manifest.json is bad"
    )
    assert without_paths("could not be written (No space left: /var/tmp/x/y)") == (
        "could not be written (No space left: <server path>)"
    )
    kept = "list them with GET /v1/models/m/versions; see s3://bucket/a/b or ../x/y"
    assert without_paths(kept) == kept
