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
