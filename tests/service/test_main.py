"""``create_app``: what building the app does before it serves anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi._compat import v2
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings


def test_the_app_builds_every_route_field_before_its_first_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI builds a route's parameter fields lazily, silencing a pydantic warning with the
    # thread-unsafe warnings.catch_warnings(); built on two request threads at once, the warning
    # escaped. create_app builds them all in its own thread, so serving builds none.
    built: list[str] = []
    post_init = v2.ModelField.__post_init__

    def counting(self: v2.ModelField) -> None:
        built.append(self.name)
        post_init(self)

    monkeypatch.setattr(v2.ModelField, "__post_init__", counting)
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0", store=tmp_path / "store")
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    assert {"method", "label", "default_method"} <= set(built)  # the edit and register forms
    built.clear()
    for method, path in [
        ("GET", "/no/such/path"),  # matched against every route before the 404
        ("POST", "/v1/edits"),
        ("GET", "/v1/models"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ]:
        client.request(method, path)
    assert built == []
