"""``/v1/models/{model}/versions/{version}/review``: a version's review page and its figures.

The page is HTML rendered from the manifest (:mod:`service.review_page`); each figure is a PNG the
worker wrote into the version folder before publishing it, served after its sha256 is checked
against the manifest, like the patch. ``base`` has no edit to review: 404, saying so.

With API keys a browser cannot send the key for the page's images, so ``?inline=true`` embeds
them (``data:`` URIs, each sha256-checked): one authenticated request, one self-contained file,
e.g. ``vitedit review my-vit@prod --out review.html``.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse

from models.errors import UnknownVersionError
from models.store.store import Store
from service.deps import StoreDep
from service.errors import responses
from service.params import ModelName, VersionRef
from service.review_page import ReviewPage

router = APIRouter(prefix="/v1/models/{model}/versions", tags=["versions"])

INLINE = "embed the figures in the page (one self-contained file: for servers with API keys)"

FIGURE_PATTERN = r"^[a-z][a-z_]{0,63}\.png$"


def _resolve(store: Store, model: str, version: str) -> str:
    """A version id from an id, alias or 'latest'; 404 for 'base', which has no edit."""
    store.model(model)
    resolved = store.resolve_version(model, version)
    if resolved is None:
        raise UnknownVersionError(
            f"{model}@{version} is the base backbone: it has no edit to review. Open the review "
            f"of one of its versions (GET /v1/models/{model}/versions lists them)"
        )
    return resolved


PAGE_RESPONSE = {200: {"description": "the page", "content": {"text/html": {"schema": {}}}}}
"""The page is HTML; its errors stay JSON (so the route keeps the default response class)."""


@router.get(
    "/{version}/review",
    responses={**PAGE_RESPONSE, **responses(404)},
    summary="The version's review page (HTML): edits, held-out failures, locality flips, "
    "retention, mask heatmaps, its point on the benchmark front",
)
def review_page(
    model: ModelName,
    version: VersionRef,
    store: StoreDep,
    inline: Annotated[bool, Query(description=INLINE)] = False,
) -> HTMLResponse:
    resolved = _resolve(store, model, version)
    manifest = store.version(model, resolved)
    base = f"/v1/models/{model}/versions"

    def url(name: str) -> str:
        if not inline:
            return f"{base}/{resolved}/review/{name}.png"  # the resolved id: immutable
        data = store.version_file(model, resolved, manifest.review["figures"][name]).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode()

    page = ReviewPage(manifest, store.model(model).class_names, base, url)
    return HTMLResponse(page.render())


@router.get(
    "/{version}/review/{figure}",
    response_class=FileResponse,
    responses={200: {"description": "the figure", "content": {"image/png": {}}}, **responses(404)},
    summary="One figure of the review page (PNG, sha256 checked)",
)
def review_figure(
    model: ModelName,
    version: VersionRef,
    figure: Annotated[str, PathParam(pattern=FIGURE_PATTERN, description="e.g. edits.png")],
    store: StoreDep,
) -> FileResponse:
    resolved = _resolve(store, model, version)
    manifest = store.version(model, resolved)
    file = manifest.review.get("figures", {}).get(figure.removesuffix(".png"))
    if file is None:
        raise UnknownVersionError(
            f"{model}@{resolved} has no review figure {figure!r}; it has "
            f"{sorted(manifest.review.get('figures', {}))}"
        )
    path = store.version_file(model, resolved, file)  # sha256 checked
    return FileResponse(
        path,
        media_type="image/png",
        headers={
            "X-Content-SHA256": manifest.files[file],
            "Cache-Control": "private, max-age=86400",
        },
    )
