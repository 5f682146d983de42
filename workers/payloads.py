"""Job payloads: what the API puts on the queue, as plain JSON (pydantic, torch-free).

Images never travel through Redis: the API writes them to the store's upload area and the payload
carries their paths (relative to the store root). Every payload names a model and a *resolved*
version id, so an alias that moves after submission does not change what the job does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.store.manifest import DEFAULT_TENANT
from models.store.store import NAME_PATTERN

JOB_FUNCS = {
    "edit": "workers.jobs.edit",
    "predict": "workers.jobs.predict",
    "materialise": "workers.jobs.materialise",
    "register": "workers.jobs.register",
}
"""Job kind -> the dotted path RQ imports in the worker (the API never imports it)."""


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobImage(_Payload):
    path: str  # relative to the store root, under uploads/
    target: int = Field(ge=0)
    role: Literal["edit", "holdout"] = "edit"


class Acceptance(_Payload):
    """The gate a new version must pass to be accepted (else it is stored as rejected).

    ``min_sr``: share of the edit images fixed (SR); ``min_lr``: share of the locality set whose
    prediction the edit left unchanged (LR_vs_parent); ``min_retention``: share of each earlier
    version's edit images still right. None = not checked.
    """

    min_sr: float = Field(default=1.0, ge=0, le=1)
    min_lr: float | None = Field(default=None, ge=0, le=1)
    min_retention: float | None = Field(default=None, ge=0, le=1)


class EditPayload(_Payload):
    """Edit ``images`` (role edit) towards their targets, starting from ``parent`` (None = base)."""

    kind: Literal["edit"] = "edit"
    model: str
    parent: str | None = None
    upload: str  # upload id: its folder is removed when the job ends
    images: list[JobImage] = Field(min_length=1)
    method: str
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)
    accept: Acceptance = Field(default_factory=Acceptance)
    owner: str = Field(default=DEFAULT_TENANT, pattern=NAME_PATTERN)  # the tenant: version's owner

    @model_validator(mode="after")
    def _has_edit_images(self) -> EditPayload:
        if not any(im.role == "edit" for im in self.images):
            raise ValueError("an edit needs at least one image with role 'edit'")
        return self

    @property
    def max_steps(self) -> int | None:
        value = self.options.get("max_steps")
        return int(value) if value is not None else None


class PredictPayload(_Payload):
    """Classify uploaded images with a version (None = the base backbone)."""

    kind: Literal["predict"] = "predict"
    model: str
    version: str | None = None
    upload: str
    images: list[str] = Field(min_length=1)
    top_k: int = Field(default=3, ge=1, le=100)


class MaterialisePayload(_Payload):
    """Write the merged full weights of a version into the store's cache."""

    kind: Literal["materialise"] = "materialise"
    model: str
    version: str | None = None


class RegisterPayload(_Payload):
    """Check and register the model whose files the API wrote to upload ``upload``, or that a
    user put in the store folder ``source`` (``incoming/...``: backbone.json and its weights,
    optional hypernet/ and benchmark/{edit_groups,locality}/): a worker loads it
    (``workers.model_files.add_model``) and refuses it with the reason if it fails. Paths are
    relative to the store root."""

    kind: Literal["register"] = "register"
    model: str = Field(pattern=NAME_PATTERN)
    upload: str | None = None
    source: str | None = None
    backbone: str | None = None  # the manifest, its weights beside it (with upload)
    hypernetwork: str | None = None  # a folder: hypernet.json + hypernet.safetensors
    groups: str | None = None  # benchmark folders in the paper's layout
    locality: str | None = None
    default_method: str | None = None
    replace: bool = False


Payload = EditPayload | PredictPayload | MaterialisePayload | RegisterPayload
