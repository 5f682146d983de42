"""The work behind each job kind: edit, predict, materialise. Called by :mod:`workers.jobs`.

An edit: load the images, activate the parent version, run the editor (progress and cancel via
:class:`~workers.runtime.Progress`), evaluate before/after, then store the new version (the
cumulative patch over the base, the edit images, the report) atomically. A version that misses the
request's acceptance gate (minimum SR, LR, retention) is stored as ``rejected``, with the reason:
it never gets an alias, not even ``latest``, and its job ends ``rejected``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rq.job import Job
from safetensors.torch import save_file

from models.editing import get_editor, make_config, run_edit
from models.editing.registry import EditConfig, EditOutcome, EditTask
from models.errors import DataError, EditCanceled, EditDiverged
from models.images import open_image
from models.precision import autocast
from models.reports import ReportSets, TokenSet, build_report, peak_memory, predict_sets
from models.review import (
    MAX_RETENTION_VERSIONS,
    ReviewInputs,
    neuron_changes,
    read_front,
    thumbnail,
    write_review,
)
from models.sites import Patch
from models.store.drafts import refuse_rejected_parent
from models.store.manifest import ImageRecord, VersionManifest, utc_now
from models.store.store import PATCH_FILE, REJECTED, VersionDraft
from workers.payloads import (
    Acceptance,
    EditPayload,
    MaterialisePayload,
    PredictPayload,
    RegisterPayload,
)
from workers.runtime import Progress, Runtime
from workers.warm import LoadedModel, pixel_key

log = logging.getLogger(__name__)


@cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        base = version("vitedit")
    except PackageNotFoundError:
        base = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{base}+g{sha}" if sha else base


# --------------------------------------------------------------------------- edit


def edit(rt: Runtime, payload: EditPayload, job: Job | None) -> dict[str, Any]:
    """Run one edit job; returns ``{"version": ...}`` (with ``"rejected": reason`` when the
    version missed its acceptance gate) or ``{"canceled": True}``."""
    progress = Progress(rt.redis, job)
    with rt.running(job, payload.upload):
        try:
            return _edit(rt, payload, job, progress)
        except EditCanceled:
            log.info("job %s canceled during %s", job.id if job else "-", progress.current)
            if job is not None:
                job.meta.update(canceled=True, phase="canceled")
                job.save_meta()
            return {"canceled": True}
        finally:
            progress.close()  # the last phase's seconds go to the metrics


def _edit(rt: Runtime, payload: EditPayload, job: Job | None, progress: Progress) -> dict[str, Any]:
    progress.phase("loading")
    progress.check_cancel()
    loaded = rt.load(payload.model)
    info = loaded.entry.methods.get(payload.method)  # this model's defaults (registry)
    defaults = info.options if info else {}
    config = make_config(payload.method, **{**defaults, **payload.options})
    images = {im.path: open_image(rt.store.upload_path(im.path)) for im in payload.images}
    edits = [im for im in payload.images if im.role == "edit"]
    holdouts = [im for im in payload.images if im.role == "holdout"]
    x = loaded.backbone.preprocess([images[im.path] for im in edits])
    y = torch.tensor([im.target for im in edits], device=loaded.backbone.device)
    holdout = (
        TokenSet(
            loaded.tokens([images[im.path] for im in holdouts]),
            torch.tensor([im.target for im in holdouts]),
            [thumbnail(images[im.path]) for im in holdouts],
        )
        if holdouts
        else None
    )
    lineage = rt.store.lineage(payload.model, payload.parent)
    if lineage:  # the API refused a rejected parent; never rely on it alone
        refuse_rejected_parent(lineage[-1])
    edit_keys = {pixel_key(images[im.path]) for im in edits}
    thumbs = [thumbnail(images[im.path]) for im in edits]
    sets = rt.report_sets(
        loaded, TokenSet(loaded.split.prefix(x), y.cpu(), thumbs), edit_keys, holdout, lineage
    )
    progress.check_cancel()  # loading may take long: look again before the edit starts
    with (
        rt.activate(loaded, payload.parent),
        autocast(loaded.backbone.device, rt.settings.precision),
    ):
        task = EditTask.build(loaded.model, loaded.sites, x, y, loaded.hypernetwork, loaded.split)
        before = predict_sets(loaded.split, sets)
        needs_mask = get_editor(payload.method).needs_hypernetwork
        progress.phase("masking" if needs_mask else "optimizing")
        outcome = run_edit(payload.method, task, config, on_step=progress.on_step)
        require_finite_patch(outcome.patch, "the edit")  # never score a non-finite model
        changes = neuron_changes(loaded.sites, loaded.sites.params(loaded.model), outcome.patch)
        progress.phase("evaluating")
        progress.check_cancel()  # the steps may be over before a cancel arrives: look again
        after, cumulative = _evaluate_new(loaded, outcome.patch, sets)
    require_finite_patch(cumulative, "the new version")  # never store one either
    progress.phase("saving")  # closes "evaluating" in progress.seconds
    progress.check_cancel()
    facts = _edit_facts(payload, loaded, config, outcome, cumulative)
    facts["precision"] = rt.settings.precision
    report = build_report(
        sets, before, after, facts, progress.seconds, peak_memory(loaded.backbone.device)
    )
    report["acceptance"] = gate = check_acceptance(report, payload.accept)
    front, note = read_front(loaded.entry.benchmark.get("results"), loaded.entry.weights_sha256)
    names, retained = loaded.entry.class_names, _retention_images(rt, lineage)
    review = ReviewInputs(
        sets, before, after, report["metrics"], names, changes, retained, front, note
    )
    manifest = _save_version(
        rt, payload, job, loaded, config, cumulative, images, report, review, progress
    )
    if gate["reason"]:
        log.info("version %s of %s rejected: %s", manifest.version, payload.model, gate["reason"])
        return {"version": manifest.version, "model": payload.model, "rejected": gate["reason"]}
    return {"version": manifest.version, "model": payload.model}


def check_acceptance(report: dict[str, Any], accept: Acceptance) -> dict[str, Any]:
    """The request's gate against the report: the minima, ``passed`` and, if not, the reason."""
    metrics = report["metrics"]
    measured = {
        "min_sr": ("SR", metrics.get("SR")),
        "min_lr": ("LR_vs_parent", metrics.get("LR_vs_parent")),
        "min_retention": ("retention", report["retention"]["min"]),
    }
    misses = []
    for key, (name, value) in measured.items():
        minimum = getattr(accept, key)
        if minimum is None or (key == "min_retention" and value is None):  # nothing to retain
            continue
        if value is None:
            misses.append(f"{name} cannot be measured for this model (it has no locality set)")
        elif value < minimum:
            misses.append(f"{name} {value:.3f} < {key} {minimum:g}")
    reason = (
        "the edit missed its acceptance gate: "
        + "; ".join(misses)
        + ". Raise max_steps or lr, choose another method, or lower the minima"
        if misses
        else None
    )
    return {**accept.model_dump(), "passed": not misses, "reason": reason}


def require_finite_patch(patch: Patch, what: str) -> None:
    """EditDiverged if any new weight of ``patch`` is NaN or inf."""
    bad = [k for k, (_, values) in patch.entries.items() if not bool(torch.isfinite(values).all())]
    if bad:
        raise EditDiverged(
            f"{what} holds non-finite weights (NaN or inf) in {bad}; nothing was stored. "
            "Lower lr or the method's penalty"
        )


def _evaluate_new(
    loaded: LoadedModel, patch: Patch, sets: ReportSets
) -> tuple[dict[str, torch.Tensor], Patch]:
    """Predictions of the new version and its patch over the base (cumulative over the lineage)."""
    backup: dict[str, torch.Tensor] = {}
    try:  # the shared model is restored even if apply is cut off (a job timeout)
        patch.apply(loaded.model, backup)
        after = predict_sets(loaded.split, sets)
        current = [p.detach() for p in loaded.sites.params(loaded.model)]
        return after, Patch.from_diff(loaded.sites, loaded.base_weights, current)
    finally:
        patch.revert(loaded.model, backup)


def _edit_facts(
    payload: EditPayload,
    loaded: LoadedModel,
    config: EditConfig,
    outcome: EditOutcome,
    cumulative: Patch,
) -> dict[str, Any]:
    return {
        "method": payload.method,
        "optimiser": {"name": "RMSprop", **asdict(config)},
        "steps": outcome.steps,
        "final_loss": round(outcome.loss, 6),
        "mask_entries": outcome.mask_entries,
        "n_entries": loaded.sites.n_entries,
        "edit_neurons": outcome.patch.n_neurons,
        "patch_neurons": cumulative.n_neurons,
        "sites": list(loaded.sites.mlps),
        "extra": {
            k: v for k, v in outcome.extra.items() if isinstance(v, int | float | str | bool)
        },
    }


def _save_version(
    rt: Runtime,
    payload: EditPayload,
    job: Job | None,
    loaded: LoadedModel,
    config: EditConfig,
    patch: Patch,
    images: dict[str, Image.Image],
    report: dict[str, Any],
    review: ReviewInputs,
    progress: Progress,
) -> VersionManifest:
    """Write the version's files into a draft and commit it, unless a cancel came first (the
    claim just before the commit decides: after it, a cancel is refused)."""
    entry, manifest = loaded.entry, loaded.backbone.manifest
    with rt.store.begin_version(payload.model) as draft:
        records = _write_images(draft, payload, images)
        figures = write_review(draft.dir, review)  # in the folder: listed with their sha256
        provenance = {
            "model": payload.model,
            "version": draft.version,
            "parent": payload.parent or "",
            "method": payload.method,
            "config": json.dumps(asdict(config), sort_keys=True),
            "backbone": manifest.name,
            "backbone_sha256": entry.weights_sha256,
            "hypernetwork": entry.hypernetwork_id or "",
            "code_version": code_version(),
        }
        patch.save(draft.dir / PATCH_FILE, metadata=provenance)
        progress.claim_publish()  # EditCanceled here discards the draft: nothing is stored
        return draft.commit(
            VersionManifest(
                version=draft.version,
                model=payload.model,
                parent=payload.parent,
                backbone={
                    "name": manifest.name,
                    "timm_name": manifest.timm_name,
                    "weights_sha256": entry.weights_sha256,
                },
                method=payload.method,
                config=asdict(config),
                hypernetwork=entry.hypernetwork_id
                if get_editor(payload.method).needs_hypernetwork
                else None,
                sites=loaded.sites.to_json(),
                patch=[],
                files={},
                images=records,
                report=report,
                created_at=utc_now(),
                code_version=code_version(),
                job_id=job.id if job else None,
                status=REJECTED if report["acceptance"]["reason"] else "accepted",
                reason=report["acceptance"]["reason"],
                review=figures,
                owner=payload.owner,
            )
        )


def _retention_images(rt: Runtime, lineage: list[VersionManifest]) -> dict[str, list[Image.Image]]:
    """Thumbnails of the edit images of the last earlier versions (those the review draws)."""
    return {
        m.version: [
            thumbnail(open_image(rt.store.version_file(m.model, m.version, r.file)))
            for r in m.edit_images
        ]
        for m in lineage[-MAX_RETENTION_VERSIONS:]
    }


def _write_images(
    draft: VersionDraft, payload: EditPayload, images: dict[str, Image.Image]
) -> list[ImageRecord]:
    """Keep the request's images with the version (as PNG): retention re-checks the edit ones."""
    (draft.dir / "images").mkdir()
    records, counts = [], {"edit": 0, "holdout": 0}
    for im in payload.images:
        name = f"images/{im.role}-{counts[im.role]:03d}.png"
        counts[im.role] += 1
        images[im.path].save(draft.dir / name, format="PNG")
        records.append(ImageRecord(file=name, target=im.target, role=im.role))
    return records


# --------------------------------------------------------------------------- predict, materialise


def predict(rt: Runtime, payload: PredictPayload, job: Job | None) -> dict[str, Any]:
    """Top-k classes of each uploaded image under a version."""
    with rt.running(job, payload.upload):
        loaded = rt.load(payload.model)
        images = [open_image(rt.store.upload_path(p)) for p in payload.images]
        names = loaded.entry.class_names
        with rt.activate(loaded, payload.version), torch.no_grad():
            probs = loaded.model(loaded.backbone.preprocess(images)).softmax(-1).cpu()
        top = probs.topk(min(payload.top_k, probs.shape[-1]), dim=-1)
        out = []
        for values, labels in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            ranked = [
                {
                    "label": lab,
                    "class_name": names[lab] if lab < len(names) else str(lab),
                    "probability": round(p, 6),
                }
                for p, lab in zip(values, labels, strict=True)
            ]
            out.append({**ranked[0], "top": ranked})
        return {"model": payload.model, "version": payload.version, "predictions": out}


def materialise(rt: Runtime, payload: MaterialisePayload, job: Job | None) -> dict[str, Any]:
    """Write the merged full weights of a version into the store cache (once)."""
    with rt.running(job, None):
        cached = rt.store.cached_weights(payload.model, payload.version)
        if cached is None:
            loaded = rt.load(payload.model)
            with rt.activate(loaded, payload.version):
                state = {
                    k: v.detach().to("cpu", copy=True).contiguous()  # copy: restored after
                    for k, v in loaded.model.state_dict().items()
                }
            meta = {
                "format": "vitedit.merged/1",
                "model": payload.model,
                "version": payload.version or "base",
                "backbone_sha256": loaded.entry.weights_sha256,
            }
            cached = rt.store.put_cached_weights(
                payload.model,
                payload.version,
                lambda path: save_file(state, str(path), metadata=meta),
            )
        path, sha = cached
        return {
            "path": str(path.relative_to(rt.store.root)),
            "sha256": sha,
            "size": path.stat().st_size,
        }


# --------------------------------------------------------------------------- register


def register(rt: Runtime, payload: RegisterPayload, job: Job | None) -> dict[str, Any]:
    """Load the uploaded model as a worker would, then copy it into the store and register it
    (``workers.model_files.add_model``: a model that does not load is refused with the reason)."""
    from workers.model_files import add_model, source_files

    def path(key: str | None) -> Path | None:
        return rt.store.upload_path(key) if key is not None else None

    with rt.running(job, payload.upload):
        if payload.source is not None:  # the layout of an upload, in a folder of the store
            files = source_files(rt.store, payload.source)
        elif payload.backbone is not None:
            files = {
                "backbone": rt.store.upload_path(payload.backbone),
                "hypernetwork": path(payload.hypernetwork),
                "groups": path(payload.groups),
                "locality": path(payload.locality),
            }
        else:
            raise DataError("a registration names its files: an upload or a source folder")
        # one registration of a name at a time, on every host: add_model holds the store's
        # lock (a lock file, and a lease in the bucket of an S3 store); a second one waits,
        # then finds the name taken (or replaces it), or after a minute gets a Conflict
        entry = add_model(
            rt.store,
            payload.model,
            default_method=payload.default_method,
            replace=payload.replace,
            **files,
        )
        return {"model": entry.name, "weights_sha256": entry.weights_sha256}
