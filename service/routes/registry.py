"""``/v1/models``: the registered models, their editors and options, aliases and latest version."""

from __future__ import annotations

from fastapi import APIRouter

from models.store.manifest import ModelEntry
from models.store.store import Store
from service.deps import StoreDep
from service.errors import responses
from service.params import ModelName
from service.schemas import MethodPublic, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(store: Store, entry: ModelEntry) -> ModelPublic:
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
                options=v.options,
                needs_hypernetwork=v.needs_hypernetwork,
                description=v.description,
                bounds=v.bounds,
            )
            for k, v in entry.methods.items()
        },
        hypernetwork_id=entry.hypernetwork_id,
        latest_version=store.latest(entry.name),  # accepted versions only
        aliases=store.aliases(entry.name),
        n_versions=len(versions),
    )


@router.get("", response_model=list[ModelPublic], summary="Registered models")
def list_models(store: StoreDep) -> list[ModelPublic]:
    return [model_public(store, entry) for entry in store.models()]


@router.get(
    "/{model}", response_model=ModelPublic, responses=responses(404), summary="One registered model"
)
def read_model(model: ModelName, store: StoreDep) -> ModelPublic:
    return model_public(store, store.model(model))
