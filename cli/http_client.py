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
import hashlib
import json
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from models.errors import STATUS, IntegrityError, Invalid, Unavailable, VitEditError, by_name

TERMINAL = {"succeeded", "failed", "rejected", "canceled"}
FORM_OPTIONS = ("method", "rho", "max_steps", "seed", "lr", "min_sr", "min_lr", "min_retention")
"""Options sent as form fields of their own; any other option goes in the ``options`` JSON."""

T = TypeVar("T")


def _from_json(cls: type[T], data: dict[str, Any], **nested: Any) -> T:
    """A dataclass from a JSON object: known fields only (a newer server may send more)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names}, **nested)


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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the JSON answer, or the error it stands for raised."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the server at {self.http.base_url} ({exc})") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise api_error(response.status_code, body, response.text)
        return response.json() if response.content else None  # 204: nothing

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
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            files += [
                ("holdout", (p.name, stack.enter_context(open(p, "rb")))) for p in holdout or []
            ]
            data = self._call("POST", "/v1/edits", data=form, files=files, headers=headers)
        return _from_json(Job, data)

    def edit(self, job_id: str, wait_s: float = 0) -> Job:
        data = self._call(
            "GET", f"/v1/edits/{job_id}", params={"wait": wait_s}, timeout=wait_s + 30
        )
        return _from_json(Job, data)

    def jobs(self, limit: int = 20, page_size: int = 100) -> list[Job]:
        """The caller's newest ``limit`` edit jobs, newest first (without their reports)."""
        params: dict[str, Any] = {"limit": min(limit, page_size)}
        found: list[Job] = []
        while len(found) < limit:
            data = self._call("GET", "/v1/edits", params=params)
            found += [_from_json(Job, j) for j in data["edits"]]
            after = data.get("next_before")
            if not after or after == params.get("before"):
                break
            params = {"limit": min(limit - len(found), page_size), "before": after}
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
        return [_model(m) for m in self._call("GET", "/v1/models")]

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
        return _model(data)

    def remove_model(self, name: str, purge: bool = False) -> None:
        self._call("DELETE", f"/v1/models/{name}", params={"purge": purge})

    def versions(self, model: str, page_size: int = 1000) -> VersionList:
        """Every version, oldest first: the listing's pages, followed to the last."""
        params: dict[str, Any] = {"limit": page_size}
        versions: list[VersionSummary] = []
        while True:
            data = self._call("GET", f"/v1/models/{model}/versions", params=params)
            versions += [_from_json(VersionSummary, v) for v in data["versions"]]
            after = data.get("next_after")
            if not after or after == params.get("after"):
                return VersionList(data["model"], versions, data["aliases"])
            params["after"] = after

    def version(self, model: str, version: str) -> VersionDetail:
        return _from_json(
            VersionDetail, self._call("GET", f"/v1/models/{model}/versions/{version}")
        )

    def predict(self, model: str, version: str, images: list[Path]) -> Predictions:
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            data = self._call("POST", f"/v1/models/{model}/versions/{version}/predict", files=files)
        predictions = [_from_json(Prediction, p) for p in data["predictions"]]
        return Predictions(data["model"], data["version"], predictions)

    def download(self, path: str, out: Path) -> str:
        """Stream a file to ``out`` (atomically), checking the server's X-Content-SHA256."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        digest = hashlib.sha256()
        try:
            with self.http.stream("GET", path) as response:
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
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"cannot reach the server at {self.http.base_url} ({exc})") from exc
        if expected and expected != digest.hexdigest():
            tmp.unlink(missing_ok=True)
            raise IntegrityError(
                f"downloaded {path} has sha256 {digest.hexdigest()[:16]}..., "
                f"the server announced {expected[:16]}...: retry"
            )
        tmp.replace(out)
        return digest.hexdigest()


def _zip_benchmark(groups: Path, locality: Path, out: Path) -> Path:
    """edit_groups/ and locality/ of the paper's layout, in one zip (stored: PNGs are compressed)."""
    with zipfile.ZipFile(out, "w") as zf:
        for folder, arc in ((Path(groups), "edit_groups"), (Path(locality), "locality")):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                zf.write(path, f"{arc}/{path.relative_to(folder).as_posix()}")
    return out


def _model(data: dict[str, Any]) -> Model:
    methods = {k: _from_json(Method, v) for k, v in data["methods"].items()}
    return _from_json(Model, {k: v for k, v in data.items() if k != "methods"}, methods=methods)


def _chunks(response: httpx.Response) -> Iterator[bytes]:
    yield from response.iter_bytes(1 << 20)
