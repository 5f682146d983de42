"""Request and response bodies of the API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.store.store import NAME_PATTERN

JobStatus = Literal["queued", "running", "succeeded", "failed", "rejected", "canceled"]


class ErrorPublic(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what went wrong, and what to do about it")
    error: str = Field(description="the error's name, e.g. NotFound, Invalid, EditConfigError")
    errors: list[dict[str, Any]] | None = Field(
        None, description="per-field problems, when FastAPI could not parse the request"
    )


class EditPublic(BaseModel):
    """An edit job as the user sees it."""

    id: str
    status: JobStatus
    model: str | None = None
    parent_version: str | None = Field(None, description="the version edited (None = base)")
    method: str | None = None
    position: int | None = Field(None, description="jobs ahead of this one while queued (0 = next)")
    phase: str | None = Field(None, description="loading, masking, optimizing, evaluating, saving")
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    version: str | None = Field(
        None, description="the new version, once succeeded (or rejected: stored, no alias)"
    )
    report: dict[str, Any] | None = None
    error: str | None = Field(None, description="why it failed or was rejected, and what to do")
    note: str | None = Field(
        None, description="e.g. that the job's version was removed (its model deleted) since"
    )
    cancel_requested: bool = False
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


class EditListPublic(BaseModel):
    """One page of the caller's edit jobs, newest first (reports left out: follow links.self)."""

    edits: list[EditPublic]
    next_before: str | None = Field(
        None,
        description="more jobs follow: pass this as ?before= for the next page (the Link "
        "header's rel=next names the same URL); null on the last page",
    )


class MethodPublic(BaseModel):
    options: dict[str, Any] = Field(description="option name -> this model's default")
    needs_hypernetwork: bool
    description: str
    bounds: dict[str, Any] = Field(
        default_factory=dict,
        description="option name -> {kind, low, high, low_open, high_open}: the accepted range",
    )


class ModelPublic(BaseModel):
    name: str
    backbone: dict[str, Any]
    num_classes: int
    class_names: list[str]
    default_method: str
    methods: dict[str, MethodPublic]
    hypernetwork_id: str | None
    latest_version: str | None
    aliases: dict[str, str]
    n_versions: int


class VersionPublic(BaseModel):
    """One version in a lineage listing."""

    version: str
    parent: str | None
    method: str
    created_at: str
    aliases: list[str]
    metrics: dict[str, Any]
    status: Literal["accepted", "rejected"] = "accepted"
    reason: str | None = Field(None, description="why a rejected version missed its gate")


class VersionListPublic(BaseModel):
    """One page of a model's versions, oldest first; ``next_after`` continues it."""

    model: str
    versions: list[VersionPublic]
    aliases: dict[str, str]
    next_after: str | None = Field(
        None,
        description="more versions follow: pass this as ?after= for the next page "
        "(the Link header's rel=next names the same URL); null on the last page",
    )


class VersionDetailPublic(BaseModel):
    """A version's manifest (with its report) and its lineage from the base."""

    model: str
    version: str
    lineage: list[str] = Field(description="version ids from the first edit over the base to this")
    aliases: list[str]
    manifest: dict[str, Any]
    links: dict[str, str]


class AliasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is a 422, not an alias to nothing

    version: str = Field(
        pattern=NAME_PATTERN, description="a version id, another alias, or 'latest'"
    )


class AliasPublic(BaseModel):
    model: str
    alias: str
    version: str


class PredictionPublic(BaseModel):
    label: int
    class_name: str
    probability: float
    top: list[dict[str, Any]]


class PredictPublic(BaseModel):
    model: str
    version: str | None
    predictions: list[PredictionPublic]


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    store: bool | None = None  # False: the store's S3 bucket is unreachable (detail says why)
    workers: list[str] | None = None
    # models a live worker failed to load -> why (their jobs fail until they are fixed)
    unavailable_models: dict[str, str] | None = None
    detail: str | None = None
