"""Every bad request is a 4xx with an actionable message, and leaves nothing behind: no job in
the queue, no upload in the store, no version. No worker runs here, so anything enqueued would stay
visible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from tests.redis_server import png
from tests.service.conftest import Served

pytestmark = pytest.mark.redis

GOOD = {"label": "3", "model": "tiny"}
TRUNCATED_PNG = png(1)[:60]
BIG_PNG = png(2, size=200)  # > the 4096-byte limit of the `idle` app
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"  # Pillow would run Ghostscript on it
PGM = b"P5\n2 2\n255\n" + bytes([0, 64, 128, 255])  # a 2x2 grey PGM: Pillow reads it as PPM
FORMATS = "not one of the accepted formats: PNG, JPEG, BMP, WebP, GIF or TIFF"


def _files(*images: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


CASES: list[tuple[str, dict[str, Any], list[Any], int, str]] = [
    ("not an image", GOOD, _files(b"hello, I am text"), 422, FORMATS),
    ("an EPS file", GOOD, _files(EPS), 422, FORMATS),
    ("a PGM file", GOOD, _files(PGM), 422, FORMATS),
    ("an EPS holdout", GOOD, _files(png(3)) + _files(EPS, field="holdout"), 422, FORMATS),
    ("corrupt image", GOOD, _files(TRUNCATED_PNG), 422, "not a readable image"),
    ("empty file", GOOD, _files(b""), 422, "empty"),
    ("too large", GOOD, _files(BIG_PNG), 413, "larger than"),
    ("too many images", GOOD, _files(*[png(i) for i in range(5)]), 413, "at most"),
    ("no image", GOOD, [], 422, "images"),
    ("unknown label name", {**GOOD, "label": "giraffe"}, _files(png(3)), 422, "unknown label"),
    ("label out of range", {**GOOD, "label": "10"}, _files(png(3)), 422, "out of range"),
    ("Arabic-Indic zero", {**GOOD, "label": "\u0660"}, _files(png(3)), 422, "unknown label"),
    ("label of 5,000 digits", {**GOOD, "label": "1" * 5000}, _files(png(3)), 422, "out of range"),
    (
        "labels do not match images",
        {**GOOD, "label": ["1", "2"]},
        _files(png(3), png(4), png(5)),
        422,
        "labels for",
    ),
    ("no label", {"model": "tiny"}, _files(png(3)), 422, "label"),
    ("unknown model", {**GOOD, "model": "nope"}, _files(png(3)), 404, "no model named"),
    ("unknown version", {**GOOD, "model": "tiny@v-missing"}, _files(png(3)), 404, "no version"),
    ("unknown alias", {**GOOD, "model": "tiny@prod"}, _files(png(3)), 404, "no version"),
    ("an '@' naming nothing", {**GOOD, "model": "tiny@"}, _files(png(3)), 422, "alias or version"),
    (
        "path traversal in the version",
        {**GOOD, "model": "tiny@../../etc"},
        _files(png(3)),
        422,
        "invalid alias or version",
    ),
    ("unknown method", {**GOOD, "method": "magic"}, _files(png(3)), 422, "unknown method"),
    (
        "method needs a hypernetwork",
        {**GOOD, "method": "where2edit"},
        _files(png(3)),
        422,
        "needs a hypernetwork",
    ),
    ("option of another method", {**GOOD, "rho": "0.1"}, _files(png(3)), 422, "no option"),
    ("rho out of range", {**GOOD, "method": "random", "rho": "1.5"}, _files(png(3)), 422, "(0, 1]"),
    ("max_steps zero", {**GOOD, "max_steps": "0"}, _files(png(3)), 422, "max_steps"),
    ("max_steps too many", {**GOOD, "max_steps": "100000"}, _files(png(3)), 422, "max_steps"),
    (
        "max_steps past the server's limit",
        {**GOOD, "max_steps": "2001"},
        _files(png(3)),
        422,
        "option max_steps=2001 must be an integer in [1, 2000]",
    ),
    (
        "min_sr not a number",
        {**GOOD, "min_sr": "nan"},
        _files(png(3)),
        422,
        "min_sr=nan must be a finite number in [0, 1]",
    ),
    (
        "min_lr infinite",
        {**GOOD, "min_lr": "inf"},
        _files(png(3)),
        422,
        "min_lr=inf must be a finite number in [0, 1]",
    ),
    (
        "min_retention over 1",
        {**GOOD, "min_retention": "1.5"},
        _files(png(3)),
        422,
        "min_retention=1.5 must be a finite number in [0, 1]",
    ),
    ("negative lr", {**GOOD, "lr": "-1"}, _files(png(3)), 422, "must be a number in (0, 1]"),
    ("not a number", {**GOOD, "lr": "fast"}, _files(png(3)), 422, "lr"),
    ("misspelt field", {**GOOD, "max_step": "5"}, _files(png(3)), 422, "'max_step': unknown field"),
    ("options not JSON", {**GOOD, "options": "{c: 1}"}, _files(png(3)), 422, "JSON object"),
    (
        "options with an integer of 5,000 digits",
        {**GOOD, "options": '{"c": ' + "1" * 5000 + "}"},
        _files(png(3)),
        422,
        "JSON object",
    ),
    (
        "options nested past the parser's depth",
        {**GOOD, "options": "[" * 100_000},
        _files(png(3)),
        422,
        "JSON object",
    ),
    (
        "lr past a float's range in options",
        {**GOOD, "options": '{"lr": 1' + "0" * 400 + "}"},
        _files(png(3)),
        422,
        "... (401 characters) must be a number in (0, 1]",
    ),
    (
        "max_steps of 401 digits in options",
        {**GOOD, "options": '{"max_steps": 1' + "0" * 400 + "}"},
        _files(png(3)),
        422,
        "... (401 characters) must be an integer in [1, ",
    ),
    ("lr past a float's range", {**GOOD, "lr": "1" + "0" * 400}, _files(png(3)), 422, "(0, 1]"),
    (
        "holdout with mixed labels",
        {**GOOD, "label": ["1", "2"]},
        _files(png(3), png(4)) + _files(png(5), field="holdout"),
        422,
        "holdout",
    ),
]


def _nothing_left(idle: Served) -> None:
    assert idle.jobs.edits.count == 0
    assert not list((idle.store.root / "uploads").iterdir())
    assert idle.store.versions("tiny") == []
    assert not Redis.from_url(idle.redis_url).keys("vitedit:idempotency:*")


@pytest.mark.parametrize(
    ("form", "files", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_edit_request_is_rejected_and_leaves_nothing(
    idle: Served, form: dict[str, Any], files: list[Any], status: int, message: str
) -> None:
    r = idle.client.post(
        "/v1/edits", data=form, files=files or None, headers={"Idempotency-Key": "k-bad"}
    )
    assert r.status_code == status, r.text
    assert message in r.text
    _nothing_left(idle)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/models/nope/versions", 404),
        ("/v1/models/tiny/versions/v-missing", 404),
        ("/v1/models/tiny/versions/base/patch", 404),
        ("/v1/edits/j-missing", 404),
        ("/v1/models/tiny/versions/..%2F..%2Fetc", 404),  # the router: no such route
    ],
)
def test_unknown_resources_are_404(idle: Served, path: str, status: int) -> None:
    r = idle.client.get(path)
    assert r.status_code == status and r.json()["detail"]


@pytest.mark.parametrize("version", ["%2E%2E", ".env", "..%5C..%5Cetc"])
def test_unsafe_version_names_are_refused_before_the_store_looks(
    idle: Served, version: str
) -> None:
    """Names the router accepts as one path segment; the path parameter's pattern (the store's
    name rule, published in the OpenAPI schema) refuses them (a 404 "no version" would mean the
    store looked for a folder named after them). check_name refuses them too: test_store."""
    r = idle.client.get(f"/v1/models/tiny/versions/{version}")
    assert r.status_code == 422, r.text
    assert "'version'" in r.json()["detail"] and "pattern" in r.json()["detail"]


HUGE = "x" * 100_000
"""A value a client may send in any text field; no answer echoes it whole."""


@pytest.mark.parametrize(
    "form",
    [
        {"method": HUGE},
        {"label": HUGE},
        {"model": HUGE},
        {"model": f"{HUGE}@latest"},
        {"model": f"tiny@{HUGE}"},
        {"options": json.dumps({HUGE: 1})},
        {"options": json.dumps({"lr": HUGE})},
        {"options": json.dumps({"lr": [HUGE]})},
        {"options": json.dumps({"seed": HUGE})},
        {"options": json.dumps({f"k{i}": 1 for i in range(10_000)})},
        {HUGE[:1000]: "1"},  # an unknown field (a longer name: 400 from the multipart parser)
    ],
    ids=lambda form: f"{next(iter(form))[:10]}={str(next(iter(form.values())))[:12]}",
)
def test_a_long_value_is_not_echoed_whole(idle: Served, form: dict[str, str]) -> None:
    """A 100 kB method, label, model or option came back whole in the answer (and its log line)."""
    r = idle.client.post("/v1/edits", data={**GOOD, **form}, files=_files(png(3)))
    assert r.status_code in (404, 422), r.text[:500]
    assert r.json()["detail"] and len(r.content) < 2048, r.text[:500]
    assert "characters" in r.text or "..." in r.text, r.text[:500]  # it says the text was cut
    _nothing_left(idle)


def test_bad_predict_image_is_rejected_before_queueing(idle: Served) -> None:
    r = idle.client.post("/v1/models/tiny/versions/base/predict", files=_files(b"not an image"))
    assert r.status_code == 422
    assert idle.jobs.high.count == 0
    _nothing_left(idle)


@pytest.mark.parametrize("data", [EPS, PGM], ids=["eps", "pgm"])
def test_predict_refuses_formats_outside_the_allow_list(idle: Served, data: bytes) -> None:
    """Pillow reads both (and would hand the EPS to Ghostscript); the API refuses them unread."""
    r = idle.client.post("/v1/models/tiny/versions/base/predict", files=_files(data))
    assert r.status_code == 422, r.text
    assert r.json() == {
        "detail": f"0.png is not a readable image ({FORMATS})",
        "error": "DataError",
    }
    assert idle.jobs.high.count == 0


def test_an_idempotency_key_longer_than_255_characters_is_refused(idle: Served) -> None:
    files = [("images", ("x.png", png(3), "image/png"))]
    r = idle.client.post(
        "/v1/edits", files=files, data=GOOD, headers={"Idempotency-Key": "k" * 256}
    )
    assert r.status_code == 422 and "idempotency-key" in r.text.lower(), r.text
    assert idle.jobs.edits.count == 0  # nothing was queued
    for key in ("\u043a\u043b\u044e\u0447".encode(), b"two words"):  # UTF-8 bytes; a space
        r = idle.client.post("/v1/edits", files=files, data=GOOD, headers={"Idempotency-Key": key})
        assert r.status_code == 422 and "idempotency-key" in r.text.lower(), r.text
    assert idle.jobs.edits.count == 0


def test_unknown_form_field_names_what_the_endpoint_takes(idle: Served) -> None:
    """A typo would otherwise run on defaults: each multipart route refuses fields it does not
    take, listing the ones it does."""
    r = idle.client.post("/v1/edits", data={**GOOD, "mix": "7", "rh0": "0.1"}, files=_files(png(3)))
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "mix"], ["body", "rh0"]]
    assert "label, lr, max_steps" in r.json()["detail"]
    r = idle.client.post(
        "/v1/models/tiny/versions/base/predict", data={"topk": "5"}, files=_files(png(3))
    )
    assert r.status_code == 422 and "'topk': unknown field" in r.text, r.text
    assert "form fields images and the query parameters top_k" in r.text
    assert idle.jobs.high.count == 0
    r = idle.client.post("/v1/models", data={"name": "m2", "sorce": "incoming/x"})
    assert r.status_code == 422 and "'sorce': unknown field" in r.text, r.text
    _nothing_left(idle)


def test_reserved_and_dangling_aliases_are_rejected(idle: Served) -> None:
    aliases = "/v1/models/tiny/aliases"
    r = idle.client.put(f"{aliases}/prod", json={"version": "v-no", "verison": "x"})
    assert r.status_code == 422 and "verison" in r.text, r.text
    assert idle.client.put(f"{aliases}/latest", json={"version": "x"}).status_code == 422
    assert idle.client.put(f"{aliases}/prod", json={"version": "v-no"}).status_code == 404
    assert idle.client.delete(f"{aliases}/prod").status_code == 404


def test_valid_request_is_queued_with_position(idle: Served) -> None:
    r = idle.client.post("/v1/edits", data=GOOD, files=_files(png(7)))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["position"] == 0
    second = idle.client.post("/v1/edits", data=GOOD, files=_files(png(8))).json()
    assert second["position"] == 1
    for job in (r.json()["id"], second["id"]):
        assert idle.client.post(f"/v1/edits/{job}/cancel").json()["status"] == "canceled"
    assert idle.jobs.edits.count == 0


def test_the_max_steps_advertised_is_the_max_steps_enforced(idle: Served) -> None:
    """GET /v1/models advertised the editor's 10,000 while edits refused more than the server's
    VITEDIT_MAX_STEPS_LIMIT (2,000 by default, the `idle` app's)."""
    model = idle.client.get("/v1/models/tiny").json()
    assert [m for m in idle.client.get("/v1/models").json() if m["name"] == "tiny"] == [model]
    for method in model["methods"].values():
        assert method["bounds"]["max_steps"]["high"] == 2000
    method = model["default_method"]
    high = model["methods"][method]["bounds"]["max_steps"]["high"]
    uploads = set((idle.store.root / "uploads").iterdir())
    r = idle.client.post("/v1/edits", data={**GOOD, "max_steps": str(high)}, files=_files(png(3)))
    assert r.status_code == 202, r.text
    assert idle.client.post(f"/v1/edits/{r.json()['id']}/cancel").json()["status"] == "canceled"
    for upload in set((idle.store.root / "uploads").iterdir()) - uploads:  # no worker removes it
        idle.store.remove_upload(upload.name)
    r = idle.client.post(
        "/v1/edits", data={**GOOD, "max_steps": str(high + 1)}, files=_files(png(3))
    )
    assert r.status_code == 422 and f"an integer in [1, {high}]" in r.json()["detail"], r.text
    assert idle.jobs.edits.count == 0
    assert set((idle.store.root / "uploads").iterdir()) == uploads  # the 422 wrote nothing


def test_a_models_default_max_steps_past_the_servers_limit_is_capped(idle: Served, tmp_path):
    """A manifest's extra.edit_defaults may set max_steps up to the editor's 10,000; a client
    that left max_steps out got that many steps on a server that refuses more than 2,000 (the
    `idle` app's VITEDIT_MAX_STEPS_LIMIT). The default served, and advertised, is now capped."""
    import dataclasses

    from models.store.manifest import BackboneManifest
    from workers.registration import register_model

    tiny = BackboneManifest.read(Path(idle.store.model("tiny").backbone))
    extra = {"edit_defaults": {"max_steps": 5000, "lr": 0.01}}
    long_run = dataclasses.replace(tiny, extra=extra, weights=str(tiny.weights_path), base_dir=None)
    long_run.write(tmp_path / "backbone.json")
    register_model(idle.store, "tiny-long", tmp_path / "backbone.json", default_method="ft")
    uploads = set((idle.store.root / "uploads").iterdir())
    try:
        model = idle.client.get("/v1/models/tiny-long").json()
        for name, method in model["methods"].items():
            if "max_steps" in method["options"]:
                assert method["options"]["max_steps"] == 2000, name
                assert method["bounds"]["max_steps"]["high"] == 2000, name
        assert model["methods"]["ft"]["options"]["lr"] == 0.01  # other defaults as measured
        data = {"label": "3", "model": "tiny-long"}
        r = idle.client.post("/v1/edits", data=data, files=_files(png(3)))
        assert r.status_code == 202, r.text
        assert r.json()["max_steps"] == 2000  # the job carries the capped default
        job = idle.jobs.edits.fetch_job(r.json()["id"])
        assert job.args[0]["options"]["max_steps"] == 2000, job.args
        assert idle.client.post(f"/v1/edits/{r.json()['id']}/cancel").json()["status"] == "canceled"
        # a model whose default is within the limit keeps it, and its jobs do not carry it
        r = idle.client.post("/v1/edits", data=GOOD, files=_files(png(3)))
        assert r.status_code == 202 and r.json()["max_steps"] is None, r.text
        assert idle.client.post(f"/v1/edits/{r.json()['id']}/cancel").json()["status"] == "canceled"
    finally:
        for upload in set((idle.store.root / "uploads").iterdir()) - uploads:  # no worker here
            idle.store.remove_upload(upload.name)
        idle.store.unregister_model("tiny-long")


def test_readyz_is_503_without_workers(idle: Served) -> None:
    r = idle.client.get("/readyz")
    assert r.status_code == 503 and "no worker" in r.json()["detail"]
    assert idle.client.get("/healthz").status_code == 200
