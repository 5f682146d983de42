"""The server commands against real HTTP servers that answer odd things: text that looks like rich
markup, pages that are not JSON or not of the API's shape, a corrupt download, listings whose pages
go round, a folder as --out, keys that cannot go in a header. Each ends in one ``error: ...`` line
and exit code 2 (or the right output), never a traceback, and no ``.part`` file is left."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from cli.main import main

MARKUP = ["[/bold]", "[link=http://evil.example]click[/link]", "[red]x[/red] \\[y]"]


@dataclass
class Answer:
    status: int = 200
    body: bytes | Any = b""  # bytes as they are, anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[str, dict[str, list[str]], bytes], Answer]


@dataclass
class Fake:
    url: str
    requests: list[str]


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Route]], Fake]]:
    """``fake({"GET /path": route})``: a real HTTP server on a free port answering with the routes
    (method and path; 404 otherwise), recording each request's method and path."""
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Route]) -> Fake:
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                url = urlsplit(self.path)
                key = f"{self.command} {url.path}"
                seen.append(key)
                length = int(self.headers.get("Content-Length") or 0)
                sent = self.rfile.read(length) if length else b""
                route = routes.get(key)
                answer = route(key, parse_qs(url.query), sent) if route else Answer(404, {})
                body = answer.body
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    answer.headers.setdefault("Content-Type", "application/json")
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return Fake(f"http://127.0.0.1:{server.server_address[1]}", seen)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr, which must be an ``error: ...`` (no traceback anywhere)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    (line,) = captured.err.splitlines()
    assert line.startswith("error: ")
    return line


def const(answer: Answer) -> Route:
    return lambda *_: answer


def job(**fields: Any) -> dict[str, Any]:
    return {"id": "j1", "status": "queued", "model": "demo-vit", "position": 0, **fields}


def version(v: str, **fields: Any) -> dict[str, Any]:
    return {
        "version": v,
        "parent": None,
        "method": "saliency",
        "created_at": "2024-01-01T00:00:00Z",
        "aliases": [],
        "metrics": {},
        **fields,
    }


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "f.png"
    Image.new("L", (8, 8)).save(path)
    return path


# --------------------------------------------------------------------------- 1. markup


def _echo_label(_key: str, _query: dict[str, list[str]], sent: bytes) -> Answer:
    """The server's own 422 for an unknown label, quoting it (here: from the multipart form)."""
    label = sent.split(b'name="label"\r\n\r\n')[1].split(b"\r\n")[0].decode()
    return Answer(422, {"error": "Invalid", "detail": f"unknown label {label!r}"})


@pytest.mark.parametrize("label", MARKUP)
def test_a_servers_error_is_printed_as_text_not_markup(
    label: str, fake: Any, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = fake({"POST /v1/edits": _echo_label})
    argv = ["edit", str(image), "--label", label, "--no-wait", "--server", server.url]
    assert main(argv) == 2
    assert one_error(capsys) == f"error: HTTP 422: unknown label {label!r}"


def test_a_jobs_error_and_names_are_printed_as_text(
    fake: Any, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = job(status="failed", error=" ".join(MARKUP), version="[b]v", model="[i]m")
    server = fake({"POST /v1/edits": const(Answer(200, failed))})
    assert main(["edit", str(image), "--label", "x", "--no-wait", "--server", server.url]) == 1
    out = capsys.readouterr().out
    assert f"job j1: failed {' '.join(MARKUP)}" in out
    assert "version [b]v was stored as failed" in out


def test_listings_print_the_servers_names_as_text(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = version("[/b]v1", method="[link=http://e.x]m[/link]", aliases=["[red]a"], status="[/]")
    listing = {"model": "[bold]demo", "versions": [odd], "aliases": {"[red]a": "[/b]v1"}}
    jobs = {"edits": [job(id="[/i]j", method="[/]", model="[u]m")], "next_before": None}
    server = fake(
        {
            "GET /v1/models/demo-vit/versions": const(Answer(200, listing)),
            "GET /v1/edits": const(Answer(200, jobs)),
        }
    )
    assert main(["versions", "demo-vit", "--server", server.url]) == 0
    out = capsys.readouterr().out
    for text in (
        "[bold]demo: 1 version(s)",
        "[/b]v1",
        "[link=http://e.x]m[/link]",
        "[red]a",
        "[/]",
    ):
        assert text in out
    assert main(["jobs", "--server", server.url]) == 0
    out = capsys.readouterr().out
    for text in ("[/i]j", "[u]m@base", "[/]"):
        assert text in out


# --------------------------------------------------------------------------- 2. odd answers


@pytest.mark.parametrize(
    ("argv", "route", "answer", "why"),
    [
        (
            ["versions", "demo-vit"],
            "GET /v1/models/demo-vit/versions",
            Answer(200, b"<html>hello</html>", {"Content-Type": "text/html"}),
            "not JSON (text/html)",
        ),
        (["jobs"], "GET /v1/edits", Answer(200, [1, 2, 3]), "expected a JSON object with 'edits'"),
        (["jobs"], "GET /v1/edits", Answer(200, {"edits": [1]}), "a Job was expected, got 1"),
        (
            ["jobs"],
            "GET /v1/edits",
            Answer(200, {"edits": [{"id": "j", "status": 7}]}),
            "a Job whose 'status' is 7",
        ),
        (
            ["versions", "demo-vit"],
            "GET /v1/models/demo-vit/versions",
            Answer(200, {"versions": [], "aliases": {}}),
            "with 'model'",
        ),
        (
            ["versions", "demo-vit"],
            "GET /v1/models/demo-vit/versions",
            Answer(200, b"\xff\xfe", {"Content-Type": "application/json"}),
            "not JSON",
        ),
    ],
)
def test_an_answer_that_is_not_the_apis_is_one_line(
    argv: list[str],
    route: str,
    answer: Answer,
    why: str,
    fake: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = fake({route: const(answer)})
    assert main([*argv, "--server", server.url]) == 2
    line = one_error(capsys)
    assert line.startswith(
        f"error: the server at {server.url} answered something that is not vitedit's API"
    )
    assert why in line and "is --server a vitedit server?" in line


def test_an_edit_report_of_another_shape_is_one_line(
    fake: Any, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = job(status="succeeded", version="v1", report={"metrics": [1]})
    server = fake({"POST /v1/edits": const(Answer(200, done))})
    assert main(["edit", str(image), "--label", "x", "--no-wait", "--server", server.url]) == 2
    assert "a report that is not vitedit's for job j1" in one_error(capsys)


def _download_routes(patch: Answer) -> dict[str, Route]:
    detail = {
        "model": "demo-vit",
        "version": "v1",
        "lineage": [],
        "aliases": [],
        "manifest": {},
        "links": {},
    }
    return {
        "GET /v1/models/demo-vit/versions/latest": const(Answer(200, detail)),
        "GET /v1/models/demo-vit/versions/v1/patch": const(patch),
    }


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        (Answer(200, b"not gzip at all" * 100, {"Content-Encoding": "gzip"}), "DecodingError"),
        (Answer(200, b"x" * 1000, {"X-Content-SHA256": "0" * 64}), "the server announced"),
        (Answer(500, b"<html>oops</html>"), "HTTP 500"),
    ],
)
def test_a_failed_download_leaves_no_part_file(
    patch: Answer,
    why: str,
    fake: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    server = fake(_download_routes(patch))
    assert main(["download", "demo-vit", "latest", "--server", server.url]) == 2
    assert why in one_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["http://[::1", "http://HOST:PORT"])
def test_a_server_url_that_is_not_a_url_is_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["versions", "demo-vit", "--server", url]) == 2
    line = one_error(capsys)
    assert repr(url) in line and "--server" in line


# --------------------------------------------------------------------------- 3. pagination


def _alternating(cursor: str, items: str, extra: dict[str, Any]) -> Route:
    """Pages of one item each whose next cursor goes a, b, a, b, ..."""

    def route(_key: str, query: dict[str, list[str]], _sent: bytes) -> Answer:
        now = query.get(cursor.removeprefix("next_"), [""])[0]
        item = version(f"v{len(now)}") if items == "versions" else job()
        return Answer(200, {items: [item], cursor: "b" if now == "a" else "a", **extra})

    return route


def _empty_pages(cursor: str, items: str, extra: dict[str, Any]) -> Route:
    """Empty pages whose next cursor always changes."""
    count = iter(range(1_000_000))
    return lambda *_: Answer(200, {items: [], cursor: f"c{next(count)}", **extra})


@pytest.mark.parametrize("pages", [_alternating, _empty_pages])
@pytest.mark.parametrize(
    ("argv", "route", "cursor", "items", "extra"),
    [
        (
            ["versions", "demo-vit"],
            "GET /v1/models/demo-vit/versions",
            "next_after",
            "versions",
            {"model": "demo-vit", "aliases": {}},
        ),
        (["jobs", "--limit", "1000"], "GET /v1/edits", "next_before", "edits", {}),
    ],
)
def test_listings_whose_pages_go_round_end_in_an_error(
    pages: Callable[..., Route],
    argv: list[str],
    route: str,
    cursor: str,
    items: str,
    extra: dict[str, Any],
    fake: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = fake({route: pages(cursor, items, extra)})
    assert main([*argv, "--server", server.url]) == 2
    line = one_error(capsys)
    assert "not vitedit's API" in line
    assert "the pages go round" in line or "an empty page names a next one" in line
    assert len(server.requests) <= 3


# --------------------------------------------------------------------------- 4. --out a folder


def test_download_into_a_folder_writes_the_servers_file_name_there(
    fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outdir").mkdir()
    server = fake(_download_routes(Answer(200, b"patch bytes")))
    assert main(["download", "demo-vit", "latest", "--out", "outdir", "--server", server.url]) == 0
    written = tmp_path / "outdir" / "demo-vit-v1.patch.safetensors"
    assert written.read_bytes() == b"patch bytes"
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "demo-vit-v1.patch.safetensors",
        "outdir",
    ]
    assert f"wrote {Path('outdir') / written.name}" in capsys.readouterr().out


# --------------------------------------------------------------------------- 5. header text


@pytest.mark.parametrize(
    ("key", "option"),
    [("kü", "--api-key (or $VITEDIT_API_KEY)"), ("k\ney", "--api-key (or $VITEDIT_API_KEY)")],
)
def test_an_api_key_that_is_not_ascii_is_refused_before_asking(
    key: str,
    option: str,
    fake: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = fake({})
    monkeypatch.setenv("VITEDIT_API_KEY", key)
    assert main(["versions", "demo-vit", "--server", server.url]) == 2
    line = one_error(capsys)
    assert line.startswith(f"error: API keys and Idempotency-Keys are ASCII text: {option}")
    assert key not in line  # a secret is not echoed
    assert server.requests == []


def test_an_idempotency_key_that_is_not_ascii_is_refused_before_asking(
    fake: Any, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = fake({})
    argv = ["edit", str(image), "--label", "x", "--idempotency-key", "ключ", "--no-wait"]
    assert main([*argv, "--server", server.url]) == 2
    line = one_error(capsys)
    assert "API keys and Idempotency-Keys are ASCII text: --idempotency-key" in line
    assert server.requests == []
