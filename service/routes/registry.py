"""``/v1/models``: the registered models, their editors and options, aliases and latest version;
registering a model (``POST``, its files in the body or in a store folder) and removing one
(``DELETE``).

A registration is checked in two places: here, torch-free, what can be read without loading
(:mod:`service.model_upload`), then by a worker, which loads the model as it would for an edit
and refuses it with the reason (``workers.model_files.add_model``); the API waits for that
answer, so ``201`` means every worker can serve the model and ``422`` says why none could.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from models.errors import DataError, Forbidden
from models.store.manifest import ModelEntry
from models.store.remote import one_snapshot
from models.store.store import Store, check_new_name
from service.deps import CallerDep, JobsDep, SettingsDep, StoreDep
from service.errors import responses
from service.model_upload import BACKBONE_MANIFEST, write_model_files
from service.params import KnownFormFields, ModelName
from service.schemas import MethodPublic, ModelPublic
from service.settings import ApiSettings
from service.tenants import Caller
from service.validation import served_bounds, served_options
from workers.client import WorkersBusy
from workers.payloads import RegisterPayload

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(store: Store, entry: ModelEntry, settings: ApiSettings) -> ModelPublic:
    versions = store.versions(entry.name)
    return ModelPublic(
        name=entry.name,
        backbone={
            "name": entry.backbone_name,
            "timm_name": entry.timm_name,
            "weights_sha256": entry.weights_sha256,
        },
        num_classes=entry.num_classes,
        class_names=list(entry.class_names),
        default_method=entry.default_method,
        methods={
            k: MethodPublic(
                options=served_options(v, settings),  # max_steps within the server's cap
                needs_hypernetwork=v.needs_hypernetwork,
                description=v.description,
                bounds={k: b.to_json() for k, b in served_bounds(v, settings).items()},
            )
            for k, v in entry.methods.items()
        },
        hypernetwork_id=entry.hypernetwork_id,
        latest_version=store.latest(entry.name),  # accepted versions only
        aliases=store.aliases(entry.name),
        n_versions=len(versions),
    )


@router.get("", response_model=list[ModelPublic], summary="Registered models")
def list_models(store: StoreDep, settings: SettingsDep) -> list[ModelPublic]:
    return [model_public(store, entry, settings) for entry in store.models()]


@router.get(
    "/{model}", response_model=ModelPublic, responses=responses(404), summary="One registered model"
)
def read_model(model: ModelName, store: StoreDep, settings: SettingsDep) -> ModelPublic:
    return model_public(store, store.model(model), settings)


def require_admin(caller: Caller, settings: ApiSettings) -> None:
    """With API keys, only the tenants of ``VITEDIT_ADMIN_TENANTS`` change the registry."""
    admins = {t.strip() for t in settings.admin_tenants.split(",") if t.strip()}
    if caller.key_id is not None and caller.tenant not in admins:
        raise Forbidden(
            f"tenant {caller.tenant!r} may not register or remove models: the server's "
            "VITEDIT_ADMIN_TENANTS names who may"
        )


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    dependencies=[KnownFormFields],
    responses=responses(403, 504),
    summary="Register a model: backbone manifest + safetensors, optional hypernetwork, benchmark",
)
def create_model(
    response: Response,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    jobs: JobsDep,
    name: Annotated[str, Form(description="the model's name (letters, digits, . _ -)")],
    backbone: Annotated[
        UploadFile | None, File(description="backbone manifest (.json: timm_name, ...)")
    ] = None,
    weights: Annotated[
        UploadFile | None, File(description="the backbone's weights (.safetensors)")
    ] = None,
    hypernet: Annotated[UploadFile | None, File(description="hypernetwork manifest")] = None,
    hypernet_weights: Annotated[UploadFile | None, File(description="its .safetensors")] = None,
    hypernet_anchors: Annotated[
        UploadFile | None,
        File(description="a --spill-input hypernetwork's spill-anchors.safetensors"),
    ] = None,
    benchmark: Annotated[
        UploadFile | None, File(description="zip of edit_groups/ and locality/ (paper layout)")
    ] = None,
    source: Annotated[
        str | None,
        Form(
            description="instead of files: a folder of the store under incoming/ (e.g. "
            "incoming/my-vit, put there with `aws s3 cp` or a copy) holding backbone.json and "
            "its weights, optionally hypernet/ and benchmark/{edit_groups,locality}/",
            max_length=300,
        ),
    ] = None,
    default_method: Annotated[str | None, Form()] = None,
    replace: Annotated[bool, Form(description="replace a registered model's files")] = False,
) -> ModelPublic:
    require_admin(caller, settings)
    check_new_name(name, "model")  # not base/latest, nor shaped like a version id
    options = {"default_method": default_method, "replace": replace}
    if source is not None:
        parts = (backbone, weights, hypernet, hypernet_weights, hypernet_anchors, benchmark)
        if any(f is not None for f in parts):
            raise DataError("send the model's files or name a source folder, not both")
        if not store.source_has(source, BACKBONE_MANIFEST):
            raise DataError(
                f"the store has no {store.source_key(source)}/{BACKBONE_MANIFEST}: put the "
                "backbone manifest there, its weights beside it"
            )
        payload = RegisterPayload(model=name, source=store.source_key(source), **options)
        jobs.run_short(payload, settings.register_timeout_s)
        response.headers["Location"] = f"/v1/models/{name}"
        return _registered(store, name, settings)
    if backbone is None or weights is None:
        raise DataError(
            "send the backbone manifest ('backbone') and its weights ('weights'), or name a "
            "store folder with 'source'"
        )
    upload, folder = store.new_upload()
    try:
        files = write_model_files(
            folder,
            store.root,
            settings.max_model_bytes,
            backbone,
            weights,
            hypernet,
            hypernet_weights,
            benchmark,
            hypernet_anchors,
            image_limit=settings.max_image_bytes,
        )
        store.push_upload(upload)  # an S3 store: for a worker on another host
    except BaseException:
        store.remove_upload(upload)
        raise
    payload = RegisterPayload(
        model=name,
        upload=upload,
        backbone=files.backbone,
        hypernetwork=files.hypernetwork,
        groups=files.groups,
        locality=files.locality,
        **options,
    )
    try:  # the job's worker removes the upload when it ends (the housekeeping, if none ran it)
        jobs.run_short(payload, settings.register_timeout_s)
    except WorkersBusy:  # never enqueued
        store.remove_upload(upload)
        raise
    response.headers["Location"] = f"/v1/models/{name}"
    return _registered(store, name, settings)


def _registered(store: Store, name: str, settings: ApiSettings) -> ModelPublic:
    """The entry a worker just wrote: read afresh, not from this request's snapshot of an S3
    store's indexes (models/store/remote.py, one_snapshot)."""
    with one_snapshot():
        return model_public(store, store.model(name), settings)


@router.delete(
    "/{model}",
    status_code=204,
    responses=responses(403, 404),
    summary="Remove a model (and, with purge, its versions)",
)
def delete_model(
    model: ModelName,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    purge: Annotated[bool, Query(description="also delete the model's versions")] = False,
) -> Response:
    require_admin(caller, settings)
    store.unregister_model(model, purge=purge)
    return Response(status_code=204)
