"""``/v1/models/{model}/versions``: lineage, manifest + report, patch, merged weights, predict.

``{version}`` is a version id, an alias, ``latest`` or ``base`` (the unedited backbone; it has no
manifest or patch, but weights and predict work).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse

from models.errors import UnknownVersionError, quoted
from models.store.store import BASE, NAME_PATTERN, PATCH_FILE, Store
from service import validation as V
from service.deps import JobsDep, SettingsDep, StoreDep
from service.errors import responses
from service.params import KnownFormFields, ModelName, VersionRef, link_next
from service.schemas import PredictPublic, VersionDetailPublic, VersionListPublic, VersionPublic
from workers.payloads import MaterialisePayload, PredictPayload

router = APIRouter(prefix="/v1/models/{model}/versions", tags=["versions"])

SAFETENSORS = "application/octet-stream"
PAGE_DEFAULT, PAGE_MAX = 100, 1000


def _by_version(aliases: dict[str, str]) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    return by_version


def _resolve(store: Store, model: str, version: str) -> str:
    """A version id from an id, alias or 'latest' (404 for 'base' or a model without versions)."""
    resolved = _resolve_any(store, model, version)
    if resolved is None:
        raise UnknownVersionError(
            f"{model}@{version} is the base backbone: it has no manifest or "
            "patch (its weights and predict work)"
        )
    return resolved


def _resolve_any(store: Store, model: str, version: str) -> str | None:
    """A version id, or None for 'base'; 404 for an unknown model before anything is queued."""
    store.model(model)
    return store.resolve_version(model, version)


@router.get(
    "",
    response_model=VersionListPublic,
    responses=responses(404),
    summary="The versions, oldest first, a page at a time, with their parents",
)
def list_versions(
    model: ModelName,
    store: StoreDep,
    request: Request,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="versions per page")] = PAGE_DEFAULT,
    after: Annotated[
        str | None,
        Query(
            pattern=NAME_PATTERN,
            description="start after this version id (the previous page's next_after)",
        ),
    ] = None,
) -> VersionListPublic:
    manifests = store.versions(model)
    start = 0
    if after is not None:
        ids = [m.version for m in manifests]
        if after not in ids:
            raise UnknownVersionError(
                f"after={quoted(after)} is not a version of {model}: pass a version id, "
                "e.g. the next_after of the previous page"
            )
        start = ids.index(after) + 1
    page = manifests[start : start + limit]
    more = start + limit < len(manifests)
    next_after = page[-1].version if more and page else None
    if next_after is not None:
        link_next(request, response, after=next_after, limit=limit)
    aliases = store.aliases(model)
    by_version = _by_version(aliases)
    versions = [
        VersionPublic(
            version=m.version,
            parent=m.parent,
            method=m.method,
            created_at=m.created_at,
            aliases=by_version.get(m.version, []),
            metrics=m.report.get("metrics", {}),
            status=m.status,
            reason=m.reason,
        )
        for m in page
    ]
    return VersionListPublic(model=model, versions=versions, aliases=aliases, next_after=next_after)


@router.get(
    "/{version}",
    response_model=VersionDetailPublic,
    responses=responses(404),
    summary="A version's manifest (with its report) and lineage",
)
def read_version(model: ModelName, version: VersionRef, store: StoreDep) -> VersionDetailPublic:
    resolved = _resolve(store, model, version)
    manifest = store.version(model, resolved)
    base = f"/v1/models/{model}/versions/{resolved}"
    return VersionDetailPublic(
        model=model,
        version=resolved,
        lineage=[m.version for m in store.lineage(model, resolved)],
        aliases=_by_version(store.aliases(model)).get(resolved, []),
        manifest=manifest.to_json(),
        links={name: f"{base}/{name}" for name in ("patch", "weights", "predict")},
    )


@router.head("/{version}/patch", include_in_schema=False)  # size and sha256, no body
@router.get(
    "/{version}/patch",
    response_class=FileResponse,
    responses=responses(404),
    summary="The sparse patch (safetensors), cumulative over the base backbone",
)
def download_patch(model: ModelName, version: VersionRef, store: StoreDep) -> FileResponse:
    resolved = _resolve(store, model, version)
    path = store.version_file(model, resolved, PATCH_FILE)  # sha256 checked
    sha = store.version(model, resolved).files[PATCH_FILE]
    return FileResponse(
        path,
        media_type=SAFETENSORS,
        filename=f"{model}-{resolved}.patch.safetensors",
        headers={"X-Content-SHA256": sha},
    )


@router.head("/{version}/weights", include_in_schema=False)  # size and sha256, no body
@router.get(
    "/{version}/weights",
    response_class=FileResponse,
    responses=responses(404, 504),
    summary="Full merged weights (safetensors), materialised by a worker on first request",
)
def download_weights(
    model: ModelName, version: VersionRef, store: StoreDep, jobs: JobsDep, settings: SettingsDep
) -> FileResponse:
    resolved = _resolve_any(store, model, version)
    cached = store.cached_weights(model, resolved)
    if cached is None:
        jobs.run_short(
            MaterialisePayload(model=model, version=resolved), settings.materialise_timeout_s
        )
        cached = store.cached_weights(model, resolved)
        if cached is None:
            raise UnknownVersionError(f"the worker did not materialise {model}@{version}; retry")
    path, sha = cached
    return FileResponse(
        path,
        media_type=SAFETENSORS,
        filename=f"{model}-{resolved or BASE}.safetensors",
        headers={"X-Content-SHA256": sha},
    )


@router.post(
    "/{version}/predict",
    response_model=PredictPublic,
    dependencies=[KnownFormFields],
    responses=responses(404, 504),
    summary="Classify uploaded images with this version",
)
def predict(
    model: ModelName,
    version: VersionRef,
    store: StoreDep,
    jobs: JobsDep,
    settings: SettingsDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="images to classify")],
    top_k: Annotated[int, Query(ge=1, le=100)] = 3,
) -> PredictPublic:
    resolved = _resolve_any(store, model, version)
    checked = V.check_images(images, settings, "predict")
    upload, _ = store.new_upload()
    try:
        paths = [
            store.write_upload(upload, f"predict-{i:03d}", im.data) for i, im in enumerate(checked)
        ]
        result = jobs.run_short(
            PredictPayload(model=model, version=resolved, upload=upload, images=paths, top_k=top_k),
            settings.predict_timeout_s,
        )
    finally:
        store.remove_upload(upload)
    return PredictPublic.model_validate(result)
