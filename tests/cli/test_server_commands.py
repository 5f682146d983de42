"""``vitedit edit`` / ``versions`` as a user runs them: real processes (``python -m cli.main``,
80 columns) against a real API process (uvicorn, as ``vitedit serve`` starts it) that needs an
API key, a real worker and redis-server, on the tests' tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli import launcher
from tests.redis_server import db_url, png, tiny_store, worker_process

pytestmark = pytest.mark.redis

KEY = "k-cli-test"


@dataclass
class Live:
    url: str
    images: Path


@pytest.fixture(scope="module")
def live(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    url = db_url(redis_url, 9)
    root = tmp_path_factory.mktemp("cli-live")
    store = tiny_store(root)
    group = launcher.ProcessGroup()
    env = {
        "VITEDIT_REDIS_URL": url,
        "VITEDIT_STORE": str(store.root),
        "VITEDIT_API_KEYS": f"other,{KEY}",
    }
    images = root / "images"
    images.mkdir()
    for name, seed in (("edit", 61), ("holdout", 62)):
        (images / f"{name}.png").write_bytes(png(seed))
    try:
        with worker_process(url, store.root):
            api = launcher.start_api(group, env, "127.0.0.1", launcher.free_port())
            yield Live(api, images)
    finally:
        group.stop()


def vitedit(*argv: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITEDIT_")}
    env.update(COLUMNS="80", LINES="50", **({"VITEDIT_API_KEY": key} if key else {}))
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def edit(live: Live, model: str) -> subprocess.CompletedProcess[str]:
    return vitedit(
        "edit",
        str(live.images / "edit.png"),
        "--label",
        "seven",
        "--model",
        model,
        "--holdout",
        str(live.images / "holdout.png"),
        "--lr",
        "0.01",
        "--max-steps",
        "30",
        "--option",
        "stop_loss=0.5",
        "--server",
        live.url,
    )


@pytest.fixture(scope="module")
def chain(live: Live) -> list[subprocess.CompletedProcess[str]]:
    """Two edits through the CLI, the second on the first's version (a parent with a full id)."""
    return [edit(live, "tiny"), edit(live, "tiny@latest")]


def test_edit_ends_with_the_version_its_url_key_figures_and_review_page(
    live: Live, chain: list
) -> None:
    first = chain[0]
    assert first.returncode == 0, first.stdout + first.stderr
    *_, version_line, url_line, figures, review_line, hint = first.stdout.splitlines()
    assert version_line.startswith("version v") and version_line.endswith("(succeeded)")
    version = version_line.split()[1]
    url = url_line.split()[1]
    assert url == f"{live.url}/v1/models/tiny/versions/{version}"  # whole, not wrapped
    assert figures.startswith("SR 1.000  GR ") and " LR " in figures and "vs base" in figures
    answer = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.json()["version"] == version
    report = answer.json()["manifest"]["report"]["metrics"]
    assert f"LR {report['LR_vs_parent']:.3f} (vs parent" in figures
    assert review_line == f"review  {url}/review"
    page = httpx.get(review_line.split()[1], headers={"Authorization": f"Bearer {KEY}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # with API keys a browser cannot fetch the page: the CLI saves it, figures inside
    assert f"vitedit download tiny {version} --review" in hint
    out = live.images.parent / "review.html"
    saved = vitedit(
        "download", "tiny", "latest", "--review", "--out", str(out), "--server", live.url
    )
    assert saved.returncode == 0, saved.stderr
    html = out.read_text()
    assert (
        html.count('src="data:image/png;base64,') >= 3 and "/review/" not in html.split("<img")[1]
    )


def test_versions_shows_whole_ids_at_80_columns(live: Live, chain: list) -> None:
    ids = [run.stdout.splitlines()[-5].split()[1] for run in chain]  # the "version v..." line
    alias = httpx.put(  # an alias widens its column, as in the README's session
        f"{live.url}/v1/models/tiny/aliases/prod",
        json={"version": ids[0]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert alias.status_code == 200, alias.text
    listing = vitedit("versions", "tiny", "--server", live.url)
    assert listing.returncode == 0, listing.stderr
    assert max(map(len, listing.stdout.splitlines())) <= 80
    assert "…" not in listing.stdout and "LR root" in listing.stdout  # no column cut
    words = listing.stdout.split()
    assert ids[1] in words  # the newest version, in full
    assert words.count(ids[0]) == 2  # the first version's row, and as the second's parent


def test_jobs_lists_the_edits_newest_first(live: Live, chain: list) -> None:
    ids = [run.stdout.splitlines()[-5].split()[1] for run in chain]  # the "version v..." line
    listing = vitedit("jobs", "--limit", "2", "--server", live.url)
    assert listing.returncode == 0, listing.stderr
    assert "2 edit job(s), newest first" in listing.stdout
    assert max(map(len, listing.stdout.splitlines())) <= 80 and "…" not in listing.stdout
    rows = [line.split() for line in listing.stdout.splitlines() if line.startswith("j")][1:]
    assert len(rows) == 2 and all(row[1] == "succeeded" for row in rows)
    words = listing.stdout.split()
    assert words.index(ids[1]) < words.index(ids[0])  # the second edit is listed first
    refused = vitedit("jobs", "--limit", "0", "--server", live.url)
    assert refused.returncode != 0 and "--limit must be at least 1" in refused.stderr


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (None, "needs an API key: pass --api-key KEY or set VITEDIT_API_KEY"),
        ("wrong", "refused the API key given by --api-key or VITEDIT_API_KEY"),
    ],
)
def test_401_tells_a_cli_user_about_api_key_not_headers(
    live: Live, key: str | None, says: str
) -> None:
    run = vitedit("versions", "tiny", "--server", live.url, key=key)
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert says in line and "VITEDIT_API_KEYS" in line
    assert "Bearer" not in line and "Authorization" not in line
    ok = vitedit("versions", "tiny", "--server", live.url, "--api-key", KEY, key=None)
    assert ok.returncode == 0, ok.stderr


def test_local_file_problems_are_one_line_not_a_traceback(live: Live, tmp_path: Path) -> None:
    missing = vitedit("edit", str(tmp_path / "nope.png"), "--label", "3", "--server", live.url)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"{tmp_path / 'nope.png'} is not a file" in missing.stderr
    bad_option = vitedit(
        "edit",
        str(live.images / "edit.png"),
        "--label",
        "3",
        "--option",
        "c=[[[",
        "--server",
        live.url,
    )
    assert bad_option.returncode != 0 and "Traceback" not in bad_option.stderr
    assert "is not valid JSON" in bad_option.stderr
    deep = vitedit(
        "edit", str(live.images / "edit.png"), "--label", "3", "--option", "c=" + "[" * 100_000
    )
    assert deep.returncode != 0 and "(100002 characters)" in deep.stderr and len(deep.stderr) < 500
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a download into a folder that is a file
    run = vitedit(
        "download", "tiny", "base", "--out", str(blocked / "x.safetensors"), "--server", live.url
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert str(blocked) in run.stderr
