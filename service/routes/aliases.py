"""``/v1/models/{model}/aliases/{alias}``: point an alias (e.g. ``prod``) at a version, or drop it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import StoreDep
from service.schemas import AliasCreate, AliasPublic

router = APIRouter(prefix="/v1/models/{model}/aliases", tags=["aliases"])


@router.put("/{alias}", response_model=AliasPublic, summary="Point an alias at a version")
def put_alias(model: str, alias: str, body: AliasCreate, store: StoreDep) -> AliasPublic:
    store.set_alias(model, alias, body.version)
    return AliasPublic(model=model, alias=alias, version=store.aliases(model)[alias])


@router.delete("/{alias}", status_code=204, response_class=Response, summary="Remove an alias")
def delete_alias(model: str, alias: str, store: StoreDep) -> Response:
    store.delete_alias(model, alias)
    return Response(status_code=204)
