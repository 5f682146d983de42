"""Every error vitedit raises on purpose, as one tree. Torch-free, so the API and the CLI import it.

Four kinds under :class:`VitEditError` say what the caller can do about an error:

    VitEditError        a fault of ours or of the store (HTTP 500): report it
    ├── NotFound        no such model, version, alias or job (404)
    ├── Invalid         the request or a file is wrong: fix it and send again (422)
    │   └── TooLarge    too many bytes, pixels or images (413)
    ├── Conflict        the request clashes with the current state (409)
    ├── Unavailable     try again later: the queue or the workers are down or busy (503)
    │   ├── Timeout     a short job did not finish in time (504)
    │   └── RateLimited too many requests or queued jobs for this key (429)
    └── Unauthorized    no valid API key (401)

:data:`STATUS` is the one status table: the API answers with it (``service/errors.py``) and the
HTTP client maps an answer's status back to the kind (``cli/http_client.py``). Every message says
what went wrong *and* what to do about it.
"""

from __future__ import annotations


class VitEditError(Exception):
    """Base class of every error vitedit raises on purpose.

    ``status`` and ``detail`` are set on errors the HTTP client re-raises from a server's answer.
    """

    status: int | None = None
    detail: str | None = None


class NotFound(VitEditError):
    """The named model, version, alias or job does not exist (or its record expired)."""


class Invalid(VitEditError):
    """The request, an option or a file is wrong; the message says how to fix it."""


class TooLarge(Invalid):
    """An upload, an image or the number of images exceeds a configured limit."""


class Conflict(VitEditError):
    """The request clashes with the current state (a reused key, a job that already ended)."""


class Unavailable(VitEditError):
    """A dependency (the queue, the workers) is down or busy: retry later."""


class Timeout(Unavailable):
    """Work the request waits for did not finish in time."""


class RateLimited(Unavailable):
    """Too many requests or queued jobs for this key: retry after a while."""


class Unauthorized(VitEditError):
    """The server needs an API key and the request has no valid one."""


class Forbidden(VitEditError):
    """The API key is valid but may not do this (e.g. register models: an admin tenant's)."""


STATUS: dict[type[VitEditError], int] = {
    VitEditError: 500,
    NotFound: 404,
    Invalid: 422,
    TooLarge: 413,
    Conflict: 409,
    Unavailable: 503,
    Timeout: 504,
    RateLimited: 429,
    Unauthorized: 401,
    Forbidden: 403,
}
"""The HTTP status of each kind; an error takes the status of its nearest kind."""


def quoted(text: str, limit: int = 60) -> str:
    """``text`` as a message shows it: its repr, or its first ``limit`` characters and its length.

    Error messages quote what the caller sent so they can find it, but a label, an option or an id
    of many thousand characters would be echoed whole into the answer and every log line.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def status_of(error: type[BaseException]) -> int:
    """The status of an error class: that of the nearest kind among its bases (500 if none)."""
    for cls in error.__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


# --------------------------------------------------------------------------- the named errors


class UnknownBackboneError(Invalid):
    """The timm model name (or backbone manifest) does not name a model we can build."""


class WeightsMismatchError(Invalid):
    """A weights file does not fit the model it is loaded into (missing, extra, mis-shaped keys)."""


class ManifestError(VitEditError):
    """A manifest is missing, malformed, or of an unsupported schema version."""


class IntegrityError(VitEditError):
    """A file's sha256 differs from the one its manifest records."""


class SiteError(Invalid):
    """The requested editable sites do not exist in the model (no timm Mlp there)."""


class PatchError(VitEditError):
    """A patch does not fit the model or the sites it is applied to."""


class UnknownMethodError(Invalid):
    """No editor is registered under that name."""


class EditConfigError(Invalid):
    """An editor option is out of range or of the wrong type."""


class EditDiverged(Invalid):
    """The optimiser produced a non-finite loss, logit or weight: the options are too strong."""


class HypernetworkMismatchError(Invalid):
    """A hypernetwork was trained for another backbone or another set of sites."""


class MaskScoresNotFinite(VitEditError):
    """A hypernetwork scored neurons NaN or inf: no mask can be picked (its weights are bad)."""


class DataError(Invalid):
    """An image or a dataset folder cannot be read, or a label is unknown."""


class EditCanceled(VitEditError):
    """The edit was canceled by its caller between two optimiser steps."""


class UnknownModelError(NotFound):
    """No model of that name is registered in the store."""


class UnknownVersionError(NotFound):
    """The model has no version (or alias) of that name."""


class StoreError(Invalid):
    """The store refused an operation (an existing version, a reserved alias, a bad name)."""


class MetaTrainingUnhealthy(Invalid):
    """Meta-training stopped itself: its masks collapsed or its mask search does not learn."""


class StoreWriteError(Unavailable):
    """The store's disk refused a write (full, read-only, permissions): nothing was published."""


class StoreUnavailable(Unavailable):
    """The remote store (S3) could not be reached or refused our credentials."""


class ModelUnavailable(Unavailable):
    """A registered model failed to load on the workers (damaged or missing files)."""


def by_name(name: str | None) -> type[VitEditError] | None:
    """The error class of this module named ``name`` (what an API answer's ``error`` holds)."""
    found = globals().get(name or "")
    if isinstance(found, type) and issubclass(found, VitEditError):
        return found
    return None
