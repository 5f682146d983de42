"""/docs and /redoc work offline: every script, style and icon they load is served by the API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings

ASSET = re.compile(r'(?:src|href)="([^"]+)"')


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The app without its lifespan: the docs need neither Redis nor the store."""
    store = tmp_path_factory.mktemp("docs") / "store"
    return TestClient(create_app(ApiSettings(redis_url="redis://127.0.0.1:1/0", store=store)))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_another_host(client: TestClient, page: str) -> None:
    html = client.get(page)
    assert html.status_code == 200
    assert "://" not in html.text.replace("http://www.w3.org", ""), html.text  # no CDN, no fonts
    assets = ASSET.findall(html.text)
    assert assets, html.text
    for url in assets:
        assert url.startswith("/"), url
        served = client.get(url)
        assert served.status_code == 200, url
        assert len(served.content) > 1000, url


def test_swagger_ui_bundle_is_served_as_javascript(client: TestClient) -> None:
    (script,) = [u for u in ASSET.findall(client.get("/docs").text) if u.endswith(".js")]
    served = client.get(script)
    assert served.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert b"SwaggerUIBundle" in served.content
    assert "openapi" in client.get("/openapi.json").json()


def test_docs_files_stay_outside_the_api_key_and_the_schema(tmp_path: Path) -> None:
    keyed = TestClient(
        create_app(ApiSettings(redis_url="redis://127.0.0.1:1/0", store=tmp_path, api_keys="k"))
    )
    assert keyed.get("/docs").status_code == 200
    paths = keyed.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]
