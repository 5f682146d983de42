"""The CLI's HTTP client against the real app: submit with holdout images, follow, download
(sha256 checked), list versions; typed answers, and errors raised as the server's own kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import launcher
from cli.http_client import Job, VersionSummary, ViteditClient
from models.errors import DataError, Invalid, NotFound, Unavailable
from tests.redis_server import png
from tests.service.conftest import Served

pytestmark = [
    pytest.mark.redis,
    # the client's per-request timeouts (a long poll, a model upload) are for real servers;
    # starlette's TestClient, the transport here, ignores them and says so
    pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument"),
]


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
    assert isinstance(job, Job) and job.status in ("queued", "running")
    seen: list[str] = []
    job = client.wait(job.id, on_update=lambda j: seen.append(j.status), poll_s=0.5)
    assert job.status == "succeeded", job
    assert seen[-1] == "succeeded"
    assert job.report is not None
    assert job.report["holdout_source"] == "request" and job.report["set_sizes"]["holdout"] == 1
    assert job.report["edit"]["optimiser"]["stop_loss"] == 0.5
    out = tmp_path / "patch.safetensors"
    sha = client.download(job.links["patch"], out)
    assert sha == served.store.version("tiny", job.version).files["patch.safetensors"]
    listed = client.versions("tiny").versions
    assert all(isinstance(v, VersionSummary) for v in listed)
    assert job.version in [v.version for v in listed]
    assert client.version("tiny", "latest").version == job.version
    (prediction,) = client.predict("tiny", job.version, [tmp_path / "edit.png"]).predictions
    assert prediction.label == 7 and 0 < prediction.probability <= 1
    second = client.submit_edit([edit], ["seven"], "tiny", options={"lr": 0.01, "max_steps": 2})
    listed_jobs = client.jobs(limit=2, page_size=1)  # newest first, over pages of the listing
    assert [j.id for j in listed_jobs] == [second.id, job.id]
    assert listed_jobs[1].version == job.version and listed_jobs[1].report is None
    assert [j.id for j in client.jobs(limit=1)] == [second.id]
    client.wait(second.id, poll_s=0.2)


def test_client_raises_the_servers_message(served: Served, tmp_path: Path) -> None:
    client = ViteditClient("http://testserver", http=served.client)
    image = tmp_path / "x.png"
    image.write_bytes(png(63))
    with pytest.raises(DataError) as info:  # the class the server names
        client.submit_edit([image], ["giraffe"], "tiny")
    assert isinstance(info.value, Invalid)
    assert info.value.status == 422 and "unknown label" in (info.value.detail or "")
    with pytest.raises(NotFound) as missing:  # JobNotFound is the queue's: its kind stands in
        client.edit("j0000")
    assert missing.value.status == 404


def test_client_says_an_unreachable_server_is_unavailable() -> None:
    client = ViteditClient(f"http://127.0.0.1:{launcher.free_port()}")
    with pytest.raises(Unavailable, match="cannot reach"):
        client.models()
