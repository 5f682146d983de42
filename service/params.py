"""Path parameters of the ``/v1`` routes that name a model or a version: the store's name rule
is their pattern, so the OpenAPI schema says which names exist at all, and a name outside it is
a 422 from the router before the store is asked."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam

from models.store.store import NAME_PATTERN

NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

ModelName = Annotated[str, PathParam(pattern=NAME_PATTERN, description=f"a model: {NAME_RULE}")]
VersionRef = Annotated[
    str,
    PathParam(
        pattern=NAME_PATTERN,
        description=f"a version id, an alias, 'latest' or 'base' ({NAME_RULE})",
    ),
]
