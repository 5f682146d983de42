"""Schemathesis against the running API: a real redis-server, a real worker process and the API
served by uvicorn on a free port; the app's own OpenAPI document drives the requests.

Besides the random and boundary values schemathesis draws from the schema, the valid paths are
exercised too (an edit queued and run by the worker, predict, patch and weights downloads, the
review page, alias moves, cancel): each operation gets one valid example (real PNGs, the tiny
model, the version and job the fixture made), and a hook grounds half of the drawn valid
("positive") cases the same way. The tally at the end checks that they were reached.

Every answer must pass schemathesis' checks: no 5xx, status code, content type, headers and body
as the schema declares them, invalid data refused, valid data accepted (but for the uploads: see
:func:`call`). The short run (derandomized: the same requests every time) is in the default suite;
the ``slow`` one sends at least 1,000 requests, freshly drawn.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks

from cli import launcher
from service.main import create_app
from tests.redis_server import db_url, png, tiny_store, worker_process

pytestmark = pytest.mark.redis

SHORT_EXAMPLES = 15  # per operation and phase: a few hundred requests in all
LONG_EXAMPLES = 100  # >= 1,000 requests
SHORT_MIN_REQUESTS = 200
LONG_MIN_REQUESTS = 1000
MAX_STEPS = 20  # the server's limit: the fuzzer's edits stay short

IMAGES = [png(900 + i) for i in range(4)]
UPLOADS = {"/v1/edits", "/v1/models/{model}/versions/{version}/predict", "/v1/models"}  # POSTs
VALID_PATHS = {  # answers the grounded cases must have produced at least once
    ("POST /v1/edits", 202),
    ("GET /v1/edits/{job_id}", 200),
    ("POST /v1/models/{model}/versions/{version}/predict", 200),
    ("GET /v1/models/{model}/versions/{version}/patch", 200),
    ("GET /v1/models/{model}/versions/{version}/weights", 200),
    ("GET /v1/models/{model}/versions/{version}", 200),
    ("PUT /v1/models/{model}/aliases/{alias}", 200),
    ("DELETE /v1/models/{model}/aliases/{alias}", 204),
    ("GET /v1/models/{model}/versions/{version}/review", 200),
}


@dataclass
class Tally:
    """What one fuzz run sent: (operation, status) -> count, and its duration."""

    answers: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    started: float = 0.0
    ended: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.answers.values())

    def table(self) -> str:
        rows = sorted(self.answers.items())
        return "\n".join(f"{n:6d}  {status}  {op}" for (op, status), n in rows)


@dataclass
class Target:
    """The running service, and what exists in it (for the grounded cases)."""

    url: str
    version: str = ""
    job_id: str = ""
    tallies: dict[str, Tally] = field(default_factory=lambda: collections.defaultdict(Tally))
    run: str = ""


TARGET = Target("")  # the hooks below read it: schemathesis calls them with no fixture at hand


@pytest.fixture(scope="module")
def target(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The worker and the API (uvicorn, own process) on the tiny model; one version exists."""
    url = db_url(redis_url, 10)
    store = tiny_store(tmp_path_factory.mktemp("fuzz"))
    env = {
        "VITEDIT_REDIS_URL": url,
        "VITEDIT_STORE": str(store.root),
        "VITEDIT_MAX_STEPS_LIMIT": str(MAX_STEPS),
        "VITEDIT_MAX_WAIT_S": "0.5",  # a fuzzed ?wait= never holds the run for long
        "VITEDIT_PREDICT_TIMEOUT_S": "30",
        "VITEDIT_MATERIALISE_TIMEOUT_S": "30",
    }
    group = launcher.ProcessGroup()
    with worker_process(url, store.root):
        try:
            TARGET.url = launcher.start_api(group, env, "127.0.0.1", launcher.free_port())
            job = _first_version(TARGET.url)
            TARGET.version, TARGET.job_id = job["version"], job["id"]
            yield TARGET
        finally:
            group.stop()
            TARGET.url = ""


def _first_version(api: str) -> dict[str, Any]:
    """One real edit (so a version and a finished job exist), and alias 'prod' on it."""
    files = [("images", ("a.png", IMAGES[0], "image/png"))]
    form = {"label": "3", "model": "tiny", "max_steps": "5", "min_sr": "0"}
    job = httpx.post(f"{api}/v1/edits", files=files, data=form).json()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = httpx.get(f"{api}/v1/edits/{job['id']}", params={"wait": 0.5}).json()
    assert job["status"] == "succeeded", job
    r = httpx.put(f"{api}/v1/models/tiny/aliases/prod", json={"version": job["version"]})
    assert r.status_code == 200, r.text
    return job


# --------------------------------------------------------------------------- grounding hooks

schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.hook
def flatmap_case(ctx: Any, case: Any) -> Any:
    """Half the positive cases are rewritten with things that exist; the other half and every
    negative case go out as drawn."""
    if not TARGET.version or case.meta is None or case.meta.generation.mode.name != "POSITIVE":
        return st.just(case)
    return st.booleans().flatmap(lambda real: _grounded(case) if real else st.just(case))


def _grounded(case: Any) -> Any:
    version = TARGET.version
    pick = st.fixed_dictionaries(
        {
            "version": st.sampled_from(["base", "latest", "prod", version]),
            "alias": st.sampled_from(["prod", "staging"]),
            "model": st.sampled_from(["tiny", "tiny@latest", "tiny@prod", f"tiny@{version}"]),
            "label": st.sampled_from(["3", "7", "zero", "nine"]),
            "images": st.lists(st.sampled_from(IMAGES), min_size=1, max_size=3),
        }
    )
    return pick.map(lambda p: _apply(case, p))


def _apply(case: Any, pick: dict[str, Any]) -> Any:
    """The case with real names and images; drawn options it keeps only where always valid."""
    params = case.path_parameters or {}
    for key, value in (("model", "tiny"), ("job_id", TARGET.job_id)):
        if key in params:
            params[key] = value
    if case.method.upper() == "DELETE" and case.path == "/v1/models/{model}":
        params["model"] = "never-registered"  # not the fuzzed model: ?purge=true would end the run
    for key in ("version", "alias"):
        if key in params:
            params[key] = pick[key]
    body = case.body
    if isinstance(body, dict) and case.path in UPLOADS:
        body["images"] = pick["images"]
        if "label" in body:
            body["label"] = [pick["label"]]
            body["model"] = pick["model"]
        for key in ("method", "options", "holdout", "rho", "lr", "seed"):
            body.pop(key, None)  # bounds that depend on the method: not in the schema
        if isinstance(body.get("max_steps"), int):
            body["max_steps"] = min(abs(body["max_steps"]), MAX_STEPS) or 1
    elif isinstance(body, dict) and "version" in body:
        body["version"] = TARGET.version if pick["version"] == "base" else pick["version"]
    return case


JSON, MULTIPART = "application/json", "multipart/form-data"
VERSION, JOB = "the-version", "the-job"  # placeholders in the examples, filled in by call()
EXAMPLE_PARAMS = {
    "model": "tiny",
    "version": VERSION,
    "job_id": JOB,
    "alias": "staging",
    "figure": "edits.png",
}
EXAMPLE_BODIES = {
    "POST /v1/edits": {
        "images": [IMAGES[1]],
        "label": ["3"],
        "model": "tiny",
        "max_steps": 3,
        "min_sr": 0.0,
    },
    "POST /v1/models/{model}/versions/{version}/predict": {"images": [IMAGES[2]]},
    "PUT /v1/models/{model}/aliases/{alias}": {"version": VERSION},
}


@schema.hook
def before_add_examples(ctx: Any, examples: list[Any]) -> None:
    """One valid request per operation, always sent (the examples phase): a real edit, predict,
    downloads and an alias move on the version the fixture made."""
    operation = ctx.operation
    params = {p.name: EXAMPLE_PARAMS[p.name] for p in operation.path_parameters}
    if operation.label == "DELETE /v1/models/{model}":
        params["model"] = "never-registered"  # the fuzzed model stays
    body = EXAMPLE_BODIES.get(operation.label)
    kwargs: dict[str, Any] = {"path_parameters": params or None}
    if body is not None:
        json_body = operation.method.upper() == "PUT"
        kwargs |= {"body": dict(body), "media_type": JSON if json_body else MULTIPART}
    examples.append(operation.Case(**kwargs))


def _fill(case: Any) -> None:
    """The examples' placeholders -> the version and job the fixture made."""
    names = {VERSION: TARGET.version, JOB: TARGET.job_id}
    params = case.path_parameters or {}
    for key, value in params.items():
        if isinstance(value, str):
            params[key] = names.get(value, value)
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("version"), str):
        body["version"] = names.get(body["version"], body["version"])


@schema.hook
def after_call(ctx: Any, case: Any, response: Any) -> None:
    TARGET.tallies[TARGET.run].answers[(case.operation.label, response.status_code)] += 1


def call(case: Any) -> None:
    """Send the case to the running API and run every check on the answer.

    One exception: an upload (edit, predict, a model's files) that the schema allows is not always one the API can
    take. The schema says "bytes"; the API needs an image it can decode, and a label, method and
    options the model knows (their bounds depend on the method, so they are not in the schema).
    Those refusals are 422 by design, so positive_data_acceptance is off for the two upload
    operations; their grounded cases must still be accepted (the tally checks 202 and 200).
    """
    _fill(case)
    upload = case.path in UPLOADS and case.method.upper() == "POST"
    excluded = [checks.positive_data_acceptance] if upload else []
    case.call_and_validate(base_url=TARGET.url, excluded_checks=excluded)


@pytest.fixture
def run(request: pytest.FixtureRequest, target: Target) -> Iterator[Tally]:
    """Tallies the answers under the test's name."""
    TARGET.run = request.function.__name__
    tally = TARGET.tallies[TARGET.run]
    tally.started = tally.started or time.monotonic()
    yield tally
    tally.ended = time.monotonic()


FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


# --------------------------------------------------------------------------- the runs


@schema.parametrize()
@settings(max_examples=SHORT_EXAMPLES, derandomize=True, **FUZZ_SETTINGS)
def test_short_fuzz_run_meets_the_schema(case: Any, run: Tally) -> None:
    call(case)


def _check_tally(name: str, least: int) -> Tally:
    tally = TARGET.tallies.get(name)
    if tally is None or not tally.requests:
        pytest.skip(f"{name} did not run (this test sums it up)")
    print(f"\n{name}: {tally.requests} requests in {tally.ended - tally.started:.1f} s\n")
    print(tally.table())
    assert tally.requests >= least
    assert not [k for k in tally.answers if k[1] >= 500], tally.table()
    assert set(tally.answers) >= VALID_PATHS, VALID_PATHS - set(tally.answers)
    return tally


def test_short_fuzz_run_sent_hundreds_of_requests_and_reached_the_valid_paths() -> None:
    tally = _check_tally("test_short_fuzz_run_meets_the_schema", SHORT_MIN_REQUESTS)
    assert tally.ended - tally.started < 60


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=LONG_EXAMPLES, **FUZZ_SETTINGS)
def test_long_fuzz_run_meets_the_schema(case: Any, run: Tally) -> None:
    call(case)


@pytest.mark.slow
def test_long_fuzz_run_sent_over_a_thousand_requests_and_reached_the_valid_paths() -> None:
    _check_tally("test_long_fuzz_run_meets_the_schema", LONG_MIN_REQUESTS)


# --------------------------------------------------------------------------- what it found


def test_a_405_lists_every_method_the_path_serves(target: Target) -> None:
    """Starlette's 405 named only the first route's method: 'Allow: PUT' where DELETE is served
    too (found by schemathesis' OPTIONS probe)."""
    r = httpx.options(f"{target.url}/v1/models/tiny/aliases/prod")
    assert r.status_code == 405
    assert r.headers["allow"] == "PUT, DELETE"
    assert r.json()["error"] == "MethodNotAllowed"


def test_head_on_a_download_gives_its_headers_without_the_body(target: Target) -> None:
    url = f"{target.url}/v1/models/tiny/versions/{target.version}/patch"
    head, get = httpx.head(url), httpx.get(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-content-sha256"] == get.headers["x-content-sha256"]
    assert int(head.headers["content-length"]) == len(get.content)


@pytest.mark.parametrize(
    "path", ["/v1/models/%C3%A9/versions", "/v1/models/tiny/versions/%0A", "/v1/models/.x"]
)
def test_a_name_outside_the_schemas_pattern_is_refused_by_the_router(
    target: Target, path: str
) -> None:
    """The schema said any string; the store then refused with its own 422."""
    r = httpx.get(f"{target.url}{path}")
    assert r.status_code == 422 and "pattern" in r.json()["detail"]


def test_an_alias_cannot_target_a_malformed_version(target: Target) -> None:
    r = httpx.put(f"{target.url}/v1/models/tiny/aliases/x", json={"version": ""})
    assert r.status_code == 422 and "version" in r.json()["detail"]


def test_an_unparseable_json_body_is_a_documented_400(target: Target) -> None:
    r = httpx.put(
        f"{target.url}/v1/models/tiny/aliases/x",
        content=b"\xff\xfe{",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    documented = schema.raw_schema["paths"]["/v1/models/{model}/aliases/{alias}"]["put"]
    assert "400" in documented["responses"]
