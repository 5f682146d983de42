"""``/v1/edits``: submit an edit (multipart), list them, follow one (long-poll), cancel it."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from models.errors import Invalid, NotFound
from models.store.store import Store
from service import validation as V
from service.deps import CallerDep, JobsDep, SettingsDep, StoreDep
from service.errors import responses
from service.params import KnownFormFields, link_next
from service.schemas import EditListPublic, EditPublic
from workers.client import JOB_ID, TERMINAL, JobClient, JobNotFound, JobView, new_job_id
from workers.payloads import EditPayload, JobImage
from workers.quotas import ActiveJobs

router = APIRouter(prefix="/v1/edits", tags=["edits"])

MIN_SR = "acceptance gate: least share of the edit images the new version must fix (SR)"
MIN_LR = "acceptance gate: least share of the locality set left unchanged (LR_vs_parent)"
MIN_RETENTION = "acceptance gate: least share of earlier versions' edit images still right"
UNIT: dict[str, Any] = {"minimum": 0, "maximum": 1}  # the acceptance minima's range, for /docs


def edit_public(view: JobView, store: Store, with_report: bool = True) -> EditPublic:
    """A job view, with the stored report once the job succeeded (unless ``with_report`` is
    False: a listing leaves the reports out)."""
    report = note = None
    gone = False
    if with_report and view.version and view.model:
        try:
            report = store.version(view.model, view.version).report
        except NotFound:  # its model was deleted (purge) since: the job stays readable
            gone = True
            note = (
                f"version {view.version} of {view.model} no longer exists: the model (or the "
                "version) was removed after this job ended; its patch and report are gone"
            )
    links = {"self": f"/v1/edits/{view.id}", "cancel": f"/v1/edits/{view.id}/cancel"}
    if view.version and not gone:
        links["version"] = f"/v1/models/{view.model}/versions/{view.version}"
        links["patch"] = f"{links['version']}/patch"
    return EditPublic(
        id=view.id,
        status=view.state.value,
        model=view.model,
        parent_version=view.parent,
        method=view.method,
        position=view.position,
        phase=view.phase,
        step=view.step,
        max_steps=view.max_steps,
        loss=view.loss,
        version=view.version,
        report=report,
        error=view.error,
        note=note,
        cancel_requested=view.cancel_requested,
        created_at=view.created_at,
        started_at=view.started_at,
        ended_at=view.ended_at,
        links=links,
    )


@router.post(
    "",
    status_code=202,
    response_model=EditPublic,
    dependencies=[KnownFormFields],
    responses=responses(404, 409),
    summary="Submit failure images and their target label; returns the queued job",
)
def create_edit(
    response: Response,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    jobs: JobsDep,
    images: Annotated[list[UploadFile], File(min_length=1, description="failure image(s) to edit")],
    label: Annotated[
        list[str], Form(min_length=1, description="target class index or name (one, or per image)")
    ],
    model: Annotated[str, Form(description="model, model@version, model@alias or model@latest")],
    holdout: Annotated[list[UploadFile] | None, File(description="held-out failures (GR)")] = None,
    method: Annotated[str | None, Form()] = None,
    rho: Annotated[float | None, Form()] = None,
    max_steps: Annotated[int | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    lr: Annotated[float | None, Form()] = None,
    options: Annotated[str | None, Form(description="other method options (JSON object)")] = None,
    # in [0, 1], checked by V.check_acceptance: Form(ge=0, le=1) answered "min_sr=nan" with
    # "should be less than or equal to 1"
    min_sr: Annotated[float, Form(description=MIN_SR, json_schema_extra=UNIT)] = 1.0,
    min_lr: Annotated[float | None, Form(description=MIN_LR, json_schema_extra=UNIT)] = None,
    min_retention: Annotated[
        float | None, Form(description=MIN_RETENTION, json_schema_extra=UNIT)
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="a retry with the same key and body replays the same job (e.g. a UUID); "
            "printable ASCII without spaces",
        ),
    ] = None,
) -> EditPublic:
    given = {
        k: v
        for k, v in dict(rho=rho, max_steps=max_steps, seed=seed, lr=lr).items()
        if v is not None
    }
    if idempotency_key is not None and not V.PRINTABLE_ASCII.fullmatch(idempotency_key):
        raise Invalid(
            "Idempotency-Key holds a character outside printable ASCII (a space, a control "
            "character or a letter such as 'ü'), which HTTP clients send differently: use "
            "letters, digits and punctuation only, e.g. a UUID"
        )
    accept = V.check_acceptance(min_sr=min_sr, min_lr=min_lr, min_retention=min_retention)
    checked = V.check_edit(
        store, settings, images, holdout or [], label, model, method, given, options, accept
    )
    store.check_parent(checked.model, checked.parent)  # a rejected version: 422, nothing queued
    job_id, new = (
        jobs.claim_idempotency_key(idempotency_key, checked.sha256())
        if idempotency_key
        else (new_job_id(), True)
    )
    if not new:
        response.headers["Idempotent-Replayed"] = "true"
        return _located(response, edit_public(_await_job(jobs, job_id), store))
    active = ActiveJobs(jobs.redis)
    try:  # the tenant's queued + running jobs: 429 at its limit
        active.reserve(caller.tenant, job_id, caller.limits.max_active_jobs)
        view = _enqueue(store, jobs, checked, job_id, caller.tenant)
    except BaseException:
        active.release(caller.tenant, job_id)
        if idempotency_key:
            jobs.release_idempotency_key(idempotency_key)
        raise
    return _located(response, edit_public(view, store))


def _enqueue(
    store: Store, jobs: JobClient, checked: V.CheckedEdit, job_id: str, owner: str
) -> JobView:
    """Write the images to the upload area, then queue the job (no upload left if that fails)."""
    upload, _ = store.new_upload()
    try:
        files = [
            JobImage(path=store.write_upload(upload, f"edit-{i:03d}", im.data), target=t)
            for i, (im, t) in enumerate(zip(checked.edits, checked.targets, strict=True))
        ]
        files += [
            JobImage(
                path=store.write_upload(upload, f"holdout-{i:03d}", im.data),
                target=checked.targets[0],
                role="holdout",
            )
            for i, im in enumerate(checked.holdouts)
        ]
        payload = EditPayload(
            model=checked.model,
            parent=checked.parent,
            upload=upload,
            images=files,
            method=checked.method,
            options=checked.options,
            accept=checked.accept,
            owner=owner,
        )
        return jobs.submit_edit(payload, job_id=job_id)
    except BaseException:
        store.remove_upload(upload)
        raise


def _located(response: Response, edit: EditPublic) -> EditPublic:
    response.headers["Location"] = f"/v1/edits/{edit.id}"
    return edit


def _await_job(jobs: JobClient, job_id: str, timeout_s: float = 5.0) -> JobView:
    """A replayed key's job: it may still be being enqueued by the first request."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return jobs.view(job_id)
        except JobNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@router.get(
    "",
    response_model=EditListPublic,
    responses=responses(404),
    summary="Your edit jobs, newest first, a page at a time",
)
def list_edits(
    store: StoreDep,
    jobs: JobsDep,
    request: Request,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    before: Annotated[
        str | None,
        Query(
            pattern=f"^{JOB_ID.pattern}$",
            description="start after this job (the previous page's next_before)",
        ),
    ] = None,
) -> EditListPublic:
    views, next_before = jobs.list_edits(limit, before)
    if next_before is not None:
        link_next(request, response, before=next_before, limit=limit)
    return EditListPublic(
        edits=[edit_public(v, store, with_report=False) for v in views], next_before=next_before
    )


@router.get(
    "/{job_id}",
    response_model=EditPublic,
    responses=responses(404),
    summary="Job status; ?wait=S long-polls",
)
async def read_edit(
    job_id: str,
    settings: SettingsDep,
    store: StoreDep,
    jobs: JobsDep,
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the job to end")] = 0,
) -> EditPublic:
    deadline = time.monotonic() + min(wait, settings.max_wait_s)
    view = await run_in_threadpool(jobs.view, job_id)
    while view.state not in TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        view = await run_in_threadpool(jobs.view, job_id)
    return await run_in_threadpool(edit_public, view, store)


@router.post(
    "/{job_id}/cancel",
    response_model=EditPublic,
    responses=responses(404, 409),
    summary="Cancel a queued job, or stop a running one at its next step or phase (409 once it is storing its version)",
)
def cancel_edit(job_id: str, store: StoreDep, jobs: JobsDep) -> EditPublic:
    return edit_public(jobs.cancel(job_id, drop_upload=store.remove_upload), store)
