"""A small typed client of the vitedit HTTP API (httpx, torch-free). Used by ``vitedit edit``.

    client = ViteditClient("http://127.0.0.1:8000")
    job = client.submit_edit([Path("shoe.png")], ["Sneaker"], model="demo-vit@latest")
    job = client.wait(job.id)
    client.download(job.links["patch"], Path("patch.safetensors"))

Answers come back as small dataclasses (:class:`Job`, :class:`Model`, ...); error answers are
raised as the server's own kinds of :mod:`models.errors` (``NotFound``, ``Invalid``, ...), with
``status`` and ``detail`` set: the class the server names when this package defines it, else the
kind its status stands for.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tempfile
import time
import typing
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

from models.errors import STATUS, IntegrityError, Invalid, Unavailable, VitEditError, by_name

TERMINAL = {"succeeded", "failed", "rejected", "canceled"}
FORM_OPTIONS = ("method", "rho", "max_steps", "seed", "lr", "min_sr", "min_lr", "min_retention")
"""Options sent as form fields of their own; any other option goes in the ``options`` JSON."""

MAX_PAGES = 10_000
"""The most pages a listing is followed over: far more than any store holds, fewer than forever."""

T = TypeVar("T")


class NotOurAPI(VitEditError):
    """The server answered something that is not vitedit's API (not JSON, or of another shape)."""


def check_header_text(value: str, what: str) -> str:
    """``value`` if it can go in an HTTP header (printable ASCII), else :class:`Invalid`."""
    bad = next((i for i, c in enumerate(value) if not " " <= c <= "~"), None)
    if bad is not None:
        raise Invalid(
            f"API keys and Idempotency-Keys are ASCII text: {what} has a character that is not "
            f"printable ASCII (character {bad + 1} of {len(value)}): use letters, digits and "
            "punctuation only"
        )
    return value


@functools.cache
def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint, as pydantic's strict mode reads it (no
    coercion: "3" is not an int, 1 is not a bool; an int is a float)."""
    try:
        _adapter(hint).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def _from_json(cls: type[T], data: Any, **nested: Any) -> T:
    """A dataclass from a JSON object: known fields only (a newer server may send more), each of
    its type; :class:`NotOurAPI` for anything else."""
    if not isinstance(data, dict):
        raise NotOurAPI(f"a {cls.__name__} was expected, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in data.items() if k in fields and k not in nested}
    for name, f in fields.items():
        if name in nested:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in known and required:
            raise NotOurAPI(f"a {cls.__name__} without {name!r}: {_show(data)}")
        if name in known and not _matches(known[name], hints[name]):
            raise NotOurAPI(f"a {cls.__name__} whose {name!r} is {_show(known[name])}")
    return cls(**known, **nested)


def _show(value: Any, limit: int = 80) -> str:
    """A value of an answer, as an error message quotes it: its JSON, cut short."""
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _field(data: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """``data[name]``, which must be a ``kind``; :class:`NotOurAPI` otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get(name), kind):
        raise NotOurAPI(f"expected a JSON object with {name!r}, got {_show(data)}")
    return data[name]


@dataclass(frozen=True)
class Job:
    """An edit job: ``status`` is queued, running, succeeded, failed, rejected or canceled."""

    id: str
    status: str
    model: str | None = None
    parent_version: str | None = None
    method: str | None = None
    position: int | None = None
    phase: str | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    version: str | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    links: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Method:
    options: dict[str, Any]
    needs_hypernetwork: bool
    description: str
    bounds: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Model:
    name: str
    backbone: dict[str, Any]
    num_classes: int
    class_names: list[str]
    default_method: str
    methods: dict[str, Method]
    hypernetwork_id: str | None
    latest_version: str | None
    aliases: dict[str, str]
    n_versions: int


@dataclass(frozen=True)
class VersionSummary:
    version: str
    parent: str | None
    method: str
    created_at: str
    aliases: list[str]
    metrics: dict[str, Any]
    status: str = "accepted"


@dataclass(frozen=True)
class VersionList:
    model: str
    versions: list[VersionSummary]
    aliases: dict[str, str]


@dataclass(frozen=True)
class VersionDetail:
    model: str
    version: str
    lineage: list[str]
    aliases: list[str]
    manifest: dict[str, Any]
    links: dict[str, str]


@dataclass(frozen=True)
class Prediction:
    label: int
    class_name: str
    probability: float
    top: list[dict[str, Any]]


@dataclass(frozen=True)
class Predictions:
    model: str
    version: str | None
    predictions: list[Prediction]


KINDS = {status: kind for kind, status in STATUS.items()}


def api_error(status: int, body: Any, text: str = "") -> VitEditError:
    """The error an answer stands for: the class it names if we know it, else its status' kind."""
    body = body if isinstance(body, dict) else {}
    detail = body.get("detail", text)
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    cls = by_name(body.get("error")) or KINDS.get(status)
    cls = cls or (VitEditError if status >= 500 else Invalid)
    error = cls(f"HTTP {status}: {detail}")
    error.status, error.detail = status, detail
    return error


class ViteditClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http``: an httpx client to use instead of a new one (e.g. FastAPI's TestClient)."""
        if api_key:
            check_header_text(api_key, "the API key")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.http = http or httpx.Client(
                base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
            )
        except httpx.InvalidURL as exc:
            raise Invalid(
                f"the server {base_url!r} is not a URL ({exc}): give --server (or "
                "$VITEDIT_SERVER) as http://HOST:PORT"
            ) from None

    def close(self) -> None:
        self.http.close()

    @contextmanager
    def _answers(self, what: str) -> Iterator[None]:
        """Reading an answer: an httpx or shape error of it as one of ours, naming the server."""
        try:
            yield
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the server at {self.http.base_url} ({exc})") from exc
        except NotOurAPI as exc:
            raise self._not_ours(what, str(exc)) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise self._not_ours(what, f"{type(exc).__name__}: {exc}") from None

    def _not_ours(self, what: str, why: str) -> NotOurAPI:
        return NotOurAPI(
            f"the server at {self.http.base_url} answered something that is not vitedit's API "
            f"({what}): {why}; is --server a vitedit server?"
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the JSON answer, or the error it stands for raised."""
        with self._answers(f"{method} {path}"):
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise api_error(response.status_code, body, response.text)
        if not response.content:
            return None  # 204: nothing
        try:
            return response.json()
        except ValueError:  # not JSON (an HTML page), or not UTF-8
            kind = response.headers.get("content-type", "no content type")
            raise self._not_ours(
                f"{method} {path}", f"not JSON ({kind}): {_show(response.content[:60])}"
            ) from None

    # ------------------------------------------------------------------ edits

    def submit_edit(
        self,
        images: list[Path],
        labels: list[str],
        model: str,
        holdout: list[Path] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """POST /v1/edits; ``options`` may hold method, rho, max_steps, seed, lr, the acceptance
        minima (min_sr, min_lr, min_retention) and any other method option."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        form: dict[str, Any] = {"label": labels, "model": model}
        for key in FORM_OPTIONS:
            if key in options:
                form[key] = str(options.pop(key))
        if options:
            form["options"] = json.dumps(options)
        if idempotency_key:
            check_header_text(idempotency_key, "the Idempotency-Key")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            files += [
                ("holdout", (p.name, stack.enter_context(open(p, "rb")))) for p in holdout or []
            ]
            data = self._call("POST", "/v1/edits", data=form, files=files, headers=headers)
        with self._answers("POST /v1/edits"):
            return _from_json(Job, data)

    def edit(self, job_id: str, wait_s: float = 0) -> Job:
        data = self._call(
            "GET", f"/v1/edits/{job_id}", params={"wait": wait_s}, timeout=wait_s + 30
        )
        with self._answers(f"GET /v1/edits/{job_id}"):
            return _from_json(Job, data)

    def _pages(self, path: str, items: str, cursor: str, params: dict[str, Any]) -> Iterator[Any]:
        """The pages of a listing, each a JSON object with its ``items``, followed by ``cursor``
        (sent back as ``after`` / ``before``) until a page has none: :class:`NotOurAPI` for a
        cursor seen before, a page that is empty but names a next one, or ``MAX_PAGES`` pages."""
        param = cursor.removeprefix("next_")
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            data = self._call("GET", path, params=params)
            with self._answers(f"GET {path}"):
                page = _field(data, items, list)
                after = data.get(cursor)
                if after is not None and not isinstance(after, str):
                    raise NotOurAPI(f"{cursor} is {_show(after)}, not a string")
                if after and after in seen:
                    raise NotOurAPI(f"{cursor} {_show(after)} came back: the pages go round")
                if after and not page:
                    raise NotOurAPI(f"an empty page names a next one ({cursor} {_show(after)})")
            yield data
            if not after:
                return
            seen.add(after)
            params = {**params, param: after}
        raise self._not_ours(f"GET {path}", f"more than {MAX_PAGES} pages")

    def jobs(self, limit: int = 20, page_size: int = 100) -> list[Job]:
        """The caller's newest ``limit`` edit jobs, newest first (without their reports)."""
        params: dict[str, Any] = {"limit": min(limit, page_size)}
        found: list[Job] = []
        pages = self._pages("/v1/edits", "edits", "next_before", params)
        for data in pages:
            with self._answers("GET /v1/edits"):
                found += [_from_json(Job, j) for j in data["edits"]]
            if len(found) >= limit:
                pages.close()
                break
        return found[:limit]

    def wait(
        self,
        job_id: str,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float = 3600,
    ) -> Job:
        """Long-poll until the job ends, calling ``on_update`` with each state seen."""
        deadline = time.monotonic() + timeout_s
        job = self.edit(job_id)
        while not job.done and time.monotonic() < deadline:
            if on_update:
                on_update(job)
            job = self.edit(job_id, wait_s=poll_s)
        if on_update:
            on_update(job)
        return job

    def cancel(self, job_id: str) -> Job:
        return _from_json(Job, self._call("POST", f"/v1/edits/{job_id}/cancel"))

    # ------------------------------------------------------------------ models and versions

    def models(self) -> list[Model]:
        data = self._call("GET", "/v1/models")
        with self._answers("GET /v1/models"):
            if not isinstance(data, list):
                raise NotOurAPI(f"a list of models was expected, got {_show(data)}")
            return [_model(m) for m in data]

    def register_model(
        self,
        name: str,
        backbone: Path,
        *,
        hypernetwork: Path | None = None,
        groups: Path | None = None,
        locality: Path | None = None,
        default_method: str | None = None,
        replace: bool = False,
        timeout_s: float = 600.0,
    ) -> Model:
        """POST /v1/models: the manifest and the weights it names, a hypernetwork folder, the
        benchmark folders (zipped here, in the paper's layout); the server loads it first."""
        try:
            manifest = json.loads(Path(backbone).read_text())
        except (OSError, ValueError) as exc:
            raise Invalid(f"cannot read the backbone manifest {backbone}: {exc}") from None
        if not isinstance(manifest, dict) or not manifest.get("weights"):
            raise Invalid(f"{backbone} names no weights file: register local safetensors weights")
        weights = Path(backbone).parent / manifest["weights"]
        for path in (
            weights,
            *([hypernetwork] if hypernetwork else []),
            *([groups, locality] if groups is not None and locality is not None else []),
        ):
            if not Path(path).exists():
                raise Invalid(f"{path} does not exist")
        form = {"name": name, "replace": "true" if replace else "false"}
        if default_method:
            form["default_method"] = default_method
        with ExitStack() as stack:

            def part(field: str, path: Path) -> tuple[str, tuple[str, Any]]:
                return field, (path.name, stack.enter_context(open(path, "rb")))

            files = [part("backbone", Path(backbone)), part("weights", weights)]
            if hypernetwork is not None:
                files += [
                    part("hypernet", Path(hypernetwork) / "hypernet.json"),
                    part("hypernet_weights", Path(hypernetwork) / "hypernet.safetensors"),
                ]
                anchors = Path(hypernetwork) / "spill-anchors.safetensors"  # --spill-input
                if anchors.is_file():
                    files.append(part("hypernet_anchors", anchors))
            if groups is not None and locality is not None:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                files.append(part("benchmark", _zip_benchmark(groups, locality, tmp / "b.zip")))
            data = self._call("POST", "/v1/models", files=files, data=form, timeout=timeout_s)
        with self._answers("POST /v1/models"):
            return _model(data)

    def register_model_from_store(
        self,
        name: str,
        source: str,
        *,
        default_method: str | None = None,
        replace: bool = False,
        timeout_s: float = 600.0,
    ) -> Model:
        """POST /v1/models naming a folder of the server's store (``incoming/...``) that holds
        the model's files: nothing but the form goes over HTTP."""
        form = {"name": name, "source": source, "replace": "true" if replace else "false"}
        if default_method:
            form["default_method"] = default_method
        data = self._call("POST", "/v1/models", data=form, timeout=timeout_s)
        with self._answers("POST /v1/models"):
            return _model(data)

    def remove_model(self, name: str, purge: bool = False) -> None:
        self._call("DELETE", f"/v1/models/{name}", params={"purge": purge})

    def versions(self, model: str, page_size: int = 1000) -> VersionList:
        """Every version, oldest first: the listing's pages, followed to the last."""
        path = f"/v1/models/{model}/versions"
        versions: list[VersionSummary] = []
        for data in self._pages(path, "versions", "next_after", {"limit": page_size}):
            with self._answers(f"GET {path}"):
                versions += [_from_json(VersionSummary, v) for v in data["versions"]]
                name = _field(data, "model", str)
                aliases = _field(data, "aliases", dict)
                if not _matches(aliases, dict[str, str]):
                    raise NotOurAPI(f"aliases {_show(aliases)} do not map names to versions")
        return VersionList(name, versions, aliases)

    def version(self, model: str, version: str) -> VersionDetail:
        path = f"/v1/models/{model}/versions/{version}"
        data = self._call("GET", path)
        with self._answers(f"GET {path}"):
            return _from_json(VersionDetail, data)

    def predict(self, model: str, version: str, images: list[Path]) -> Predictions:
        path = f"/v1/models/{model}/versions/{version}/predict"
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            data = self._call("POST", path, files=files)
        with self._answers(f"POST {path}"):
            found = _field(data, "predictions", list)
            predictions = [_from_json(Prediction, p) for p in found]
            return Predictions(
                _field(data, "model", str), _field(data, "version", str | None), predictions
            )

    def download(self, path: str, out: Path) -> str:
        """Stream a file to ``out`` (atomically), checking the server's X-Content-SHA256; on any
        failure nothing is left behind (no ``.part`` file)."""
        if out.is_dir():
            raise Invalid(f"{out} is a folder: name the file to write (or a new file in it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        digest = hashlib.sha256()
        try:
            with self._answers(f"GET {path}"), self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                    raise api_error(response.status_code, body, response.text)
                with open(tmp, "wb") as fh:
                    for chunk in _chunks(response):
                        digest.update(chunk)
                        fh.write(chunk)
                expected = response.headers.get("x-content-sha256")
            if expected and expected != digest.hexdigest():
                raise IntegrityError(
                    f"downloaded {path} has sha256 {digest.hexdigest()[:16]}..., "
                    f"the server announced {expected[:16]}...: retry"
                )
            tmp.replace(out)
        except BaseException:  # a server's error, a broken body, a full disk, Ctrl-C
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest()


def _zip_benchmark(groups: Path, locality: Path, out: Path) -> Path:
    """edit_groups/ and locality/ of the paper's layout, in one zip (stored: PNGs are compressed)."""
    with zipfile.ZipFile(out, "w") as zf:
        for folder, arc in ((Path(groups), "edit_groups"), (Path(locality), "locality")):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                zf.write(path, f"{arc}/{path.relative_to(folder).as_posix()}")
    return out


def _model(data: Any) -> Model:
    methods = {k: _from_json(Method, v) for k, v in _field(data, "methods", dict).items()}
    return _from_json(Model, {k: v for k, v in data.items() if k != "methods"}, methods=methods)


def _chunks(response: httpx.Response) -> Iterator[bytes]:
    yield from response.iter_bytes(1 << 20)
