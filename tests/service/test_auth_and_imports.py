"""API keys, and the promise that the API process never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.service.conftest import Served, api

pytestmark = pytest.mark.redis


def test_api_keys_are_enforced_when_configured(idle: Served) -> None:
    with api(idle.redis_url, idle.store.root, api_keys="s3cret,other") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": "Bearer other"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open


def test_api_keys_are_off_by_default(idle: Served) -> None:
    assert idle.client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    "module",
    [
        "service.main",
        "workers.client",
        "cli.http_client",
        "cli.api",
        "models.store.store",
    ],
)
def test_api_side_modules_never_import_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "from service.main import create_app\n"
        "create_app()\n"
        "heavy = [m for m in ('torch', 'timm', 'safetensors.torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
