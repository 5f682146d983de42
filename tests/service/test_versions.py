"""``GET /v1/models/{model}/versions``: the listing comes a page at a time (service/routes/versions.py)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from cli.http_client import ViteditClient
from tests.service.conftest import Served, commit_version


def test_the_listing_pages_through_every_version_once_in_order(idle: Served) -> None:
    made = [commit_version(idle.store) for _ in range(7)]
    seen: list[str] = []
    params: dict[str, object] = {"limit": 3}
    pages = 0
    while True:
        answer = idle.client.get("/v1/models/tiny/versions", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages += 1
        assert len(body["versions"]) <= 3
        seen += [v["version"] for v in body["versions"]]
        if body["next_after"] is None:
            assert "link" not in answer.headers
            break
        assert body["next_after"] == seen[-1]
        link = urlparse(answer.headers["link"].split(";")[0].strip("<>"))
        assert parse_qs(link.query) == {"after": [seen[-1]], "limit": ["3"]}
        params = {"limit": 3, "after": body["next_after"]}
    assert seen[-7:] == made and len(seen) == len(set(seen)) and pages == -(-len(seen) // 3)


def test_the_cli_client_follows_the_pages(idle: Served) -> None:
    for _ in range(3):
        commit_version(idle.store)
    every = [
        v["version"]
        for v in idle.client.get("/v1/models/tiny/versions?limit=1000").json()["versions"]
    ]
    client = ViteditClient("http://testserver", http=idle.client)
    assert [v.version for v in client.versions("tiny", page_size=2).versions] == every


def test_a_bad_page_request_says_what_to_pass(idle: Served) -> None:
    for query, status, says in (
        ("limit=0", 422, "greater than or equal to 1"),
        ("limit=1001", 422, "less than or equal to 1000"),
        ("after=../x", 422, "pattern"),
        ("after=v-nope", 404, "not a version of tiny"),
        ("after=" + "v" * 64, 404, "not a version of tiny"),
    ):
        answer = idle.client.get(f"/v1/models/tiny/versions?{query}")
        assert answer.status_code == status and says in answer.text, (query, answer.text)


def test_an_alias_named_like_a_version_id_or_reserved_is_refused(idle: Served) -> None:
    """It would shadow that version in GET, predict and ``model=tiny@<id>``."""
    first, other = commit_version(idle.store), commit_version(idle.store)
    for alias in (other, "latest", "base"):
        r = idle.client.put(f"/v1/models/tiny/aliases/{alias}", json={"version": first})
        assert r.status_code == 422, r.text
        assert "pick another name" in r.json()["detail"] and r.json()["error"] == "StoreError"
    assert other not in idle.store.aliases("tiny")
    assert idle.client.get(f"/v1/models/tiny/versions/{other}").json()["version"] == other


def test_a_damaged_version_leaves_the_listings_whole_and_no_server_path_in_an_answer(
    idle: Served,
) -> None:
    good, bad = commit_version(idle.store), commit_version(idle.store)
    path = idle.store.version_dir("tiny", bad) / "manifest.json"
    kept = path.read_bytes()
    path.write_text("{")
    try:
        listing = idle.client.get("/v1/models/tiny/versions?limit=1000")
        assert listing.status_code == 200, listing.text
        ids = [v["version"] for v in listing.json()["versions"]]
        assert good in ids and bad not in ids
        models = idle.client.get("/v1/models")
        assert models.status_code == 200, models.text
        r = idle.client.get(f"/v1/models/tiny/versions/{bad}")
        assert r.status_code == 500 and r.json()["error"] == "ManifestError", r.text
        root = str(idle.store.root.resolve())
        assert root not in r.text and str(idle.store.root) not in r.text
        assert f"models/tiny/versions/{bad}/manifest.json" in r.json()["detail"]  # a store key
    finally:
        path.write_bytes(kept)
