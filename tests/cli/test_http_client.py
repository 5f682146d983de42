"""The CLI's HTTP client against the real app: submit with holdout images, follow, download
(sha256 checked), list versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.http_client import ApiError, ViteditClient
from tests.redis_server import png
from tests.service.conftest import Served

pytestmark = pytest.mark.redis


def test_client_submits_follows_and_downloads(served: Served, tmp_path: Path) -> None:
    client = ViteditClient("http://testserver", http=served.client)
    edit, holdout = tmp_path / "edit.png", tmp_path / "holdout.png"
    edit.write_bytes(png(61))
    holdout.write_bytes(png(62))
    job = client.submit_edit(
        [edit],
        ["seven"],
        "tiny",
        holdout=[holdout],
        options={"lr": 0.01, "max_steps": 30, "stop_loss": 0.5},
    )
    seen: list[str] = []
    job = client.wait(job["id"], on_update=lambda j: seen.append(j["status"]), poll_s=0.5)
    assert job["status"] == "succeeded", job
    assert seen[-1] == "succeeded"
    report = job["report"]
    assert report["holdout_source"] == "request" and report["set_sizes"]["holdout"] == 1
    assert report["edit"]["optimiser"]["stop_loss"] == 0.5
    out = tmp_path / "patch.safetensors"
    sha = client.download(job["links"]["patch"], out)
    assert sha == served.store.version("tiny", job["version"]).files["patch.safetensors"]
    listed = [v["version"] for v in client.versions("tiny")["versions"]]
    assert job["version"] in listed


def test_client_raises_the_servers_message(served: Served, tmp_path: Path) -> None:
    client = ViteditClient("http://testserver", http=served.client)
    image = tmp_path / "x.png"
    image.write_bytes(png(63))
    with pytest.raises(ApiError) as info:
        client.submit_edit([image], ["giraffe"], "tiny")
    assert info.value.status == 422 and "unknown label" in info.value.detail
