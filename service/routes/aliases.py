"""``/v1/models/{model}/aliases/{alias}``: point an alias (e.g. ``prod``) at a version, or drop it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from models.store.store import NAME_PATTERN
from service.deps import StoreDep
from service.errors import responses
from service.params import ModelName
from service.schemas import AliasCreate, AliasPublic

router = APIRouter(prefix="/v1/models/{model}/aliases", tags=["aliases"])


AliasName = Annotated[
    str, PathParam(pattern=NAME_PATTERN, description="1-64 letters, digits, '.', '_' or '-'")
]


@router.put(
    "/{alias}",
    response_model=AliasPublic,
    responses=responses(404),
    summary="Point an alias at a version",
)
def put_alias(
    model: ModelName, alias: AliasName, body: AliasCreate, store: StoreDep
) -> AliasPublic:
    store.set_alias(model, alias, body.version)
    return AliasPublic(model=model, alias=alias, version=store.aliases(model)[alias])


@router.delete(
    "/{alias}",
    status_code=204,
    response_class=Response,
    responses=responses(404),
    summary="Remove an alias",
)
def delete_alias(model: ModelName, alias: AliasName, store: StoreDep) -> Response:
    store.delete_alias(model, alias)
    return Response(status_code=204)
