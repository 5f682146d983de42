"""What issue 12 found, each as a test of the API with a real redis-server (no worker: anything
enqueued stays visible): the API refuses what the worker would refuse; odd ids, unknown models and
odd tokens are 4xx, never 5xx; uploads are refused on their headers; alias names are checked; every
error answer has the documented shape."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.editing import EDITORS, make_config
from models.errors import EditConfigError, StoreError
from models.store.store import check_name
from service.main import create_app
from service.schemas import ErrorPublic
from service.settings import ApiSettings
from tests.models.editing.test_bounds import ACCEPTED, REFUSED
from tests.redis_server import png
from tests.service.conftest import Served, api

pytestmark = pytest.mark.redis

ON_TINY = {name for name, editor in EDITORS.items() if not editor.needs_hypernetwork}
"""The tests' tiny model has no hypernetwork: where2edit is refused there before its options."""


def _edit(idle: Served, headers: dict[str, str] | None = None, **form: Any) -> Any:
    files = [("images", ("x.png", png(3), "image/png"))]
    data = {"label": "3", "model": "tiny", **form}
    return idle.client.post("/v1/edits", data=data, files=files, headers=headers or {})


def _cancel_all(idle: Served) -> None:
    for job_id in idle.jobs.edits.job_ids:
        idle.client.post(f"/v1/edits/{job_id}/cancel")
    assert idle.jobs.edits.count == 0


def test_the_registry_entry_carries_each_editors_bounds(idle: Served) -> None:
    """As the server enforces them: max_steps capped at its VITEDIT_MAX_STEPS_LIMIT (the `idle`
    app's default, 2,000; the editors allow 10,000)."""
    methods = idle.client.get("/v1/models/tiny").json()["methods"]
    for name, editor in EDITORS.items():
        expected = {k: b.to_json() for k, b in editor.config_cls.bounds().items()}
        expected["max_steps"]["high"] = 2000
        assert methods[name]["bounds"] == expected, name


def _as_form(method: str, key: str, value: Any) -> dict[str, str]:
    return {"method": method, "options": json.dumps({key: value})}  # NaN, Infinity pass as such


@pytest.mark.parametrize(("method", "key", "value"), [c for c in REFUSED if c[0] in ON_TINY])
def test_api_refuses_what_the_worker_would_refuse(
    idle: Served, method: str, key: str, value: Any
) -> None:
    with pytest.raises(EditConfigError):
        make_config(method, **{key: value})
    r = _edit(idle, **_as_form(method, key, value))
    assert r.status_code == 422, r.text
    assert key in r.json()["detail"] and "must be" in r.json()["detail"]
    assert idle.jobs.edits.count == 0


@pytest.mark.parametrize(("method", "key", "value"), ACCEPTED)
def test_api_accepts_what_the_worker_accepts(
    idle: Served, method: str, key: str, value: Any
) -> None:
    make_config(method, **{key: value})
    r = _edit(idle, **_as_form(method, key, value))
    assert r.status_code == 202, r.text
    _cancel_all(idle)


def test_api_refuses_a_huge_seed_and_lr_sent_as_form_fields(idle: Served) -> None:
    for form in ({"seed": str(2**64)}, {"lr": "1e30"}, {"method": "lora", "max_steps": "0"}):
        r = _edit(idle, **form)
        assert r.status_code == 422 and "must be" in r.json()["detail"], r.text
    assert idle.jobs.edits.count == 0


@pytest.mark.parametrize("job_id", ["a.b", "*", " ", "\x00", "a:b", "é", "j" * 200])
def test_odd_job_ids_are_404_json_on_read_and_cancel(idle: Served, job_id: str) -> None:
    path = f"/v1/edits/{quote(job_id, safe='')}"
    for r in (idle.client.get(path), idle.client.post(f"{path}/cancel")):
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "JobNotFound" and "job ids are" in r.json()["detail"]


def test_a_long_job_id_is_quoted_by_its_start_and_length(idle: Served) -> None:
    for job_id in ("j" * 5000, "j" * 100):  # refused by its pattern; well-formed but unknown
        r = idle.client.get(f"/v1/edits/{job_id}")
        assert r.status_code == 404, r.text
        assert len(r.text) < 500 and f"({len(job_id)} characters)" in r.json()["detail"]


@pytest.mark.parametrize("what", ["weights", "predict", "patch"])
def test_unknown_model_is_404_before_anything_is_queued(idle: Served, what: str) -> None:
    path = f"/v1/models/nope/versions/base/{what}"
    files = [("images", ("x.png", png(3), "image/png"))]
    r = idle.client.post(path, files=files) if what == "predict" else idle.client.get(path)
    assert r.status_code == 404 and r.json()["error"] == "UnknownModelError", r.text
    assert idle.jobs.high.count == 0


def test_a_non_ascii_bearer_token_is_401_not_500(idle: Served) -> None:
    with api(idle.redis_url, idle.store.root, api_keys="s3cret") as client:
        for token in ("sécret".encode(), b"\xff\xfe", "s3cret\u00a0".encode()):
            r = client.get("/v1/models", headers={"Authorization": b"Bearer " + token})
            assert r.status_code == 401 and r.json()["error"] == "Unauthorized", r.text
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


class _BodyReads:
    """An ASGI wrapper that counts the request body bytes the app under it read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.read = app, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def test_an_upload_is_refused_on_its_headers_before_its_body_is_read(idle: Served) -> None:
    settings = ApiSettings(
        redis_url=idle.redis_url, store=idle.store.root, api_keys="k", max_body_bytes=1 << 20
    )
    reads = _BodyReads(create_app(settings))
    big = [("images", ("big.png", bytes(3 << 20), "image/png"))]
    key = {"Authorization": "Bearer k"}
    with TestClient(reads) as client:
        r = client.post("/v1/edits", data={"label": "3", "model": "tiny"}, files=big)
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        r = client.post("/v1/edits", data={"label": "3", "model": "tiny"}, files=big, headers=key)
        assert r.status_code == 413 and r.json()["error"] == "TooLarge", r.text
        assert reads.read == 0
        chunked = client.post(  # no Content-Length: stopped once past the limit
            "/v1/edits",
            content=iter([bytes(1 << 19)] * 6),
            headers={**key, "content-type": "multipart/form-data; boundary=b"},
        )
        assert chunked.status_code == 413 and chunked.json()["error"] == "TooLarge"
        # a Content-Length of more digits than int() takes (Python's limit: 4,300): 413, not 500
        huge = client.post("/v1/edits", content=b"", headers={**key, "content-length": "9" * 5000})
        assert huge.status_code == 413 and "5000-digit" in huge.json()["detail"], huge.text
    assert idle.jobs.edits.count == 0


@pytest.mark.parametrize("alias", ["evil%0A", "evil%0D%0Ax", "%00", "a%20b", "x" * 65])
def test_alias_names_with_control_characters_are_refused(idle: Served, alias: str) -> None:
    r = idle.client.put(f"/v1/models/tiny/aliases/{alias}", json={"version": "latest"})
    assert r.status_code == 422 and r.json()["error"] == "Invalid", r.text
    assert idle.store.aliases("tiny") == {}


def test_the_store_refuses_a_name_with_a_trailing_newline() -> None:
    with pytest.raises(StoreError, match="invalid alias"):
        check_name("evil\n", "alias")


def test_every_error_answer_has_the_shape_the_openapi_schema_declares(idle: Served) -> None:
    spec = idle.client.get("/openapi.json").json()
    declared = spec["components"]["schemas"]["ErrorPublic"]
    assert declared["properties"]["detail"]["type"] == "string"
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in operations.items():
            for status in ("401", "422", "500", "503"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorPublic"}, (method, path)
            if "{" in path:
                assert "404" in op["responses"], (method, path)
    app_422 = _edit(idle, lr="-1")  # refused by our checks
    fastapi_422 = idle.client.post("/v1/edits", data={"model": "tiny"})  # refused by FastAPI
    for r in (app_422, fastapi_422):
        assert r.status_code == 422
        ErrorPublic.model_validate(r.json())


def _png_of(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "status", "message"),
    [((1, 1_000_000), 413, "each side"), ((4000, 100), 422, "aspect ratio")],
)
def test_a_tiny_file_of_absurd_shape_is_refused_from_its_header(
    idle: Served, size: tuple[int, int], status: int, message: str
) -> None:
    data = _png_of(size)
    assert len(data) < 10_000  # the header says what decoding would cost
    files = [("images", ("long.png", data, "image/png"))]
    for r in (
        idle.client.post("/v1/edits", data={"label": "3", "model": "tiny"}, files=files),
        idle.client.post("/v1/models/tiny/versions/base/predict", files=files),
    ):
        assert r.status_code == status and message in r.json()["detail"], r.text
    assert idle.jobs.edits.count == idle.jobs.high.count == 0
