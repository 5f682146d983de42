"""The review page of a version (GET /v1/models/{m}/versions/{v}/review).

End to end: a real API process (uvicorn), a real worker and redis-server, two chained edits of the
tiny model, then Debian's headless Chromium opens the page: every section renders, every image it
references is served as a sha256-checked PNG, and a screenshot is kept under pytest's tmp dir.
Fast: the route's 404s and a version stored before review figures existed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cli import launcher
from models.store.store import Store
from tests.redis_server import db_url, png, tiny_store, worker_process
from tests.service.conftest import Served, commit_version
from workers.registration import register_model

pytestmark = pytest.mark.redis

FAST = {"lr": "0.01", "max_steps": "60"}
SECTIONS = {
    "summary": "Summary",
    "edits": "Edit images: predictions before and after",
    "holdout": "Held-out failures fixed and not fixed",
    "locality": "Locality images that flipped",
    "retention": "Retention of earlier edits",
    "mask": "Mask: where the edit changed the network",
    "front": "GR / LR on the model's benchmark front",
}
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
WINDOW = (1200, 4200)


@dataclass
class Live:
    url: str
    store: Store
    versions: list[str]  # the chained edits, oldest first


def _edit(url: str, image: bytes, label: str, model: str) -> str:
    files = [("images", ("edit.png", image, "image/png"))]
    data = {"label": label, "model": model, **FAST}
    job = httpx.post(f"{url}/v1/edits", files=files, data=data, timeout=30).json()
    body = httpx.get(f"{url}/v1/edits/{job['id']}", params={"wait": 120}, timeout=150).json()
    assert body["status"] in ("succeeded", "rejected"), body
    return body["version"]


def _with_front(store: Store, folder: Path) -> None:
    """Register the tiny model again, with benchmark results measured on its weights."""
    entry = store.model("tiny")
    results = folder / "results.json"
    methods = {
        "ft": {"front": [{"lr": 0.7, "gr": 0.5, "knob": None}]},
        "random": {"front": [{"lr": 0.8, "gr": 0.3, "knob": 0.1}, {"lr": 0.9, "gr": 0.2}]},
    }
    data = {"backbone": {"sha256": entry.weights_sha256}, "methods": methods, "settings": {}}
    results.write_text(json.dumps(data))
    benchmark = {**entry.benchmark, "results": str(results)}
    register_model(store, "tiny", Path(entry.backbone), benchmark=benchmark, default_method="ft")


@pytest.fixture(scope="module")
def live(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    url = db_url(redis_url, 13)
    root = tmp_path_factory.mktemp("review")
    store = tiny_store(root)
    _with_front(store, root)
    group = launcher.ProcessGroup()
    env = {"VITEDIT_REDIS_URL": url, "VITEDIT_STORE": str(store.root)}
    try:
        with worker_process(url, store.root):
            api = launcher.start_api(group, env, "127.0.0.1", launcher.free_port())
            # label 3 has a benchmark group (GR); the second edit retains the first
            first = _edit(api, png(71), "3", "tiny")
            second = _edit(api, png(72), "5", f"tiny@{first}")
            yield Live(api, store, [first, second])
    finally:
        group.stop()


class _Page(HTMLParser):
    """The text of each <section id=...> and the src of every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "section":
            self._current = found.get("id") or ""
            self.sections[self._current] = ""
        if tag == "img":
            self.images.append(found.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self.sections[self._current] += data


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # the tests run as root on CI
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",  # every image loaded before the DOM or the screenshot
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (Debian: apt-get install chromium); the review page's "
    "browser test needs one",
)
def test_review_page_renders_every_section_in_headless_chromium(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = live.versions
    page_url = f"{live.url}/v1/models/tiny/versions/{second}/review"
    dom = _chromium("--dump-dom", page_url, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    for key, title in SECTIONS.items():
        assert page.sections.get(key, "").startswith(title), (key, page.sections.get(key))
    assert "1 held-out images" not in page.sections["holdout"]  # the group has 3 images
    assert "held-out images (the model's benchmark groups" in page.sections["holdout"]
    assert "locality images changed their prediction" in page.sections["locality"]
    assert first in page.sections["retention"]  # the earlier edit of the lineage
    assert "blocks." in page.sections["mask"] and "fc1 rows changed" in page.sections["mask"]
    assert "results.json" in page.sections["front"] and "This edit: GR" in page.sections["front"]

    manifest = live.store.version("tiny", second)
    figures = manifest.review["figures"]
    assert {"edits", "retention", "mask", "front"} <= set(figures)
    assert len(page.images) == len(figures)
    for src in page.images:
        answer = httpx.get(live.url + src, timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", src
        sha = hashlib.sha256(answer.content).hexdigest()
        assert answer.headers["x-content-sha256"] == sha == manifest.files[src.split("/", 6)[-1]]

    shot = tmp_path / "review.png"
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    taken = _chromium(f"--screenshot={shot}", size, page_url, profile=tmp_path / "profile")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as im:
        darkest, lightest = im.convert("L").getextrema()
        assert im.size == WINDOW and darkest < 100 < lightest  # text on a page, not a blank
    with capsys.disabled():
        print(f"\nreview page screenshot: {shot}")


def test_every_review_figure_is_a_manifest_file_with_its_sha256(live: Live) -> None:
    for version in live.versions:
        manifest = live.store.version("tiny", version)
        figures = manifest.review["figures"]
        assert figures and set(figures.values()) <= set(manifest.files)
        folder = live.store.version_dir("tiny", version)
        for file in figures.values():
            assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == manifest.files[file]
        assert manifest.review["mask"] and manifest.review["locality"]["images"] == 8


def test_review_of_an_alias_draws_the_resolved_versions_figures(live: Live) -> None:
    answer = httpx.get(f"{live.url}/v1/models/tiny/versions/latest/review", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    srcs = _parse(answer.text).images
    assert srcs and all(f"/versions/{live.versions[-1]}/review/" in s for s in srcs)


def test_the_inline_page_carries_its_figures_with_their_sha256(live: Live) -> None:
    version = live.versions[-1]
    answer = httpx.get(
        f"{live.url}/v1/models/tiny/versions/{version}/review", params={"inline": True}, timeout=30
    )
    assert answer.status_code == 200
    srcs = _parse(answer.text).images
    manifest = live.store.version("tiny", version)
    prefix = "data:image/png;base64,"
    assert len(srcs) == len(manifest.review["figures"]) and all(s.startswith(prefix) for s in srcs)
    embedded = {hashlib.sha256(base64.b64decode(s.removeprefix(prefix))).hexdigest() for s in srcs}
    assert embedded == {manifest.files[f] for f in manifest.review["figures"].values()}


def test_a_damaged_figure_is_refused_not_served(live: Live) -> None:
    version = live.versions[0]
    path = live.store.version_dir("tiny", version) / "review" / "mask.png"
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10])
        answer = httpx.get(f"{live.url}/v1/models/tiny/versions/{version}/review/mask.png")
        assert answer.status_code == 500 and "sha256" in answer.json()["detail"]
    finally:
        path.write_bytes(original)


# --------------------------------------------------------------------------- fast: the route


def test_review_of_base_is_404_saying_it_has_no_edit(idle: Served) -> None:
    answer = idle.client.get("/v1/models/tiny/versions/base/review")
    assert answer.status_code == 404
    assert "no edit to review" in answer.json()["detail"]
    assert "/v1/models/tiny/versions" in answer.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/tiny/versions/v20990101-000000-abcdef/review",
        "/v1/models/nope/versions/latest/review",
        "/v1/models/tiny/versions/v20990101-000000-abcdef/review/edits.png",
    ],
)
def test_review_of_an_unknown_model_or_version_is_404(idle: Served, path: str) -> None:
    answer = idle.client.get(path)
    assert answer.status_code == 404 and answer.json()["error"] in (
        "UnknownVersionError",
        "UnknownModelError",
    )


def test_a_version_stored_before_review_figures_renders_with_notes(idle: Served) -> None:
    version = commit_version(idle.store)
    answer = idle.client.get(f"/v1/models/tiny/versions/{version}/review")
    assert answer.status_code == 200
    page = _parse(answer.text)
    assert set(SECTIONS) <= set(page.sections) and page.images == []
    assert "stored before review figures existed" in page.sections["edits"]
    assert "three (3)" in page.sections["edits"]  # the report's predictions, by class name
    figure = idle.client.get(f"/v1/models/tiny/versions/{version}/review/edits.png")
    assert figure.status_code == 404 and "has no review figure" in figure.json()["detail"]


def test_a_section_the_worker_could_not_draw_says_why(idle: Served) -> None:
    review = {"figures": {}, "errors": {"mask": "IndexError: too many indices"}, "holdout": {}}
    version = commit_version(idle.store, review)
    page = _parse(idle.client.get(f"/v1/models/tiny/versions/{version}/review").text)
    assert "could not be drawn (IndexError: too many indices)" in page.sections["mask"]
    assert "No held-out images" in page.sections["holdout"]


def test_a_figure_name_outside_the_pattern_is_refused(idle: Served) -> None:
    version = commit_version(idle.store)
    answer = idle.client.get(f"/v1/models/tiny/versions/{version}/review/manifest.json")
    assert answer.status_code == 422


def test_the_review_route_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, service.main, service.routes.review; "
        "print(sorted({'torch', 'timm', 'matplotlib'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
