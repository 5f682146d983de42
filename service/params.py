"""Parameters shared by the ``/v1`` routes.

Path parameters that name a model or a version: the store's name rule is their pattern, so the
OpenAPI schema says which names exist at all, and a name outside it is a 422 from the router
before the store is asked. Multipart routes refuse form fields they do not take."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

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


async def reject_unknown_form_fields(request: Request) -> None:
    """A form field the route does not take is a 422 naming the fields it does take.

    FastAPI ignores extra multipart fields, so a typo (``max_step=5``, ``rh0=0.1``) would run the
    edit on defaults and look like it worked. The route's own body parameters are the allowed
    names; the form was parsed (and cached on the request) before dependencies run.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.dependant.body_params:
        return
    known = {field.alias for field in route.dependant.body_params}
    unknown = sorted(set((await request.form()).keys()) - known)
    if unknown:
        takes = f"this endpoint takes the form fields {', '.join(sorted(known))}"
        if query := sorted(field.alias for field in route.dependant.query_params):
            takes += f" and the query parameters {', '.join(query)}"
        raise RequestValidationError(
            [
                {
                    "loc": ("body", name),
                    "msg": f"unknown field; {takes}",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


KnownFormFields = Depends(reject_unknown_form_fields)
"""``dependencies=[KnownFormFields]`` on a multipart route: see :func:`reject_unknown_form_fields`."""


def link_next(request: Request, response: Response, **params: object) -> None:
    """A ``Link: <url>; rel="next"`` header: this request's URL with ``params`` for the next page."""
    url = request.url.include_query_params(**params)
    response.headers["Link"] = f'<{url}>; rel="next"'
