"""Checks of an edit or predict request, torch-free: images with Pillow, labels against the
model's class names, options against the editors recorded in the model's registry entry.

Everything here runs before anything is written or enqueued: a bad request leaves no trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from models.bounds import Bound, shown
from models.errors import DataError, EditConfigError, TooLarge, UnknownMethodError, quoted
from models.images import (
    ACCEPTED_FORMATS,
    IMAGE_FORMATS,
    check_size,
    decode_reduced,
    unreadable_reason,
)
from models.store.manifest import MethodInfo, ModelEntry
from models.store.store import Store
from service.settings import ApiSettings
from workers.payloads import Acceptance

# what an API key or an Idempotency-Key may hold: printable ASCII without spaces (header bytes:
# clients send other characters differently, so such a key could not be matched)
PRINTABLE_ASCII = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class CheckedImage:
    filename: str
    data: bytes


def check_image(upload: UploadFile, settings: ApiSettings) -> CheckedImage:
    """Read one uploaded file and make sure Pillow can decode it fully."""
    name = upload.filename or "upload"
    if len(name) > 100:  # a file name is the client's text: echoed in messages, kept short
        name = quoted(name)
    data = upload.file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise TooLarge(
            f"{name} is larger than {settings.max_image_bytes} bytes; send a smaller image"
        )
    if not data:
        raise DataError(f"{name} is empty; send an image file ({ACCEPTED_FORMATS})")
    # No warnings.catch_warnings() here: it swaps the process-wide filters, which is not
    # thread-safe on the request threads. A header past Pillow's own limit only warns (up to 2x)
    # or raises DecompressionBombError; check_size refuses it either way (at most 4096 a side).
    try:
        with Image.open(
            io.BytesIO(data), formats=IMAGE_FORMATS
        ) as im:  # the header only: nothing decoded yet
            check_size(im.size, name)
            pixels = im.size[0] * im.size[1]
            if pixels > settings.max_image_pixels:
                raise TooLarge(
                    f"{name} has {pixels} pixels, more than the {settings.max_image_pixels} allowed"
                )
            im.verify()
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            decode_reduced(im, name)  # decodes it all (a large JPEG at a reduced scale)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:  # also a format outside IMAGE_FORMATS (EPS, ICO, ...)
        raise DataError(f"{name} is not a readable image ({unreadable_reason(exc)})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{name} is not a readable image ({unreadable_reason(exc)}); send a "
            f"{ACCEPTED_FORMATS} file"
        ) from exc
    return CheckedImage(name, data)


def check_images(uploads: list[UploadFile], settings: ApiSettings, role: str) -> list[CheckedImage]:
    if len(uploads) > settings.max_images:
        raise TooLarge(f"{len(uploads)} {role} images; at most {settings.max_images} per request")
    return [check_image(u, settings) for u in uploads]


def check_labels(labels: list[str], n_images: int, entry: ModelEntry) -> list[int]:
    """One label for all images, or one per image; each a class index or a class name."""
    if not labels:
        raise DataError("give the target label: a class index or a class name ('label' field)")
    if len(labels) not in (1, n_images):
        raise DataError(
            f"{len(labels)} labels for {n_images} images: give one label for all, or one per image"
        )
    targets = [entry.label_index(label) for label in labels]
    return targets * n_images if len(targets) == 1 else targets


def check_method(entry: ModelEntry, method: str | None) -> str:
    method = method or entry.default_method
    info = entry.methods.get(method)
    if info is None:
        raise UnknownMethodError(
            f"unknown method {quoted(method)} for model {entry.name!r}; choose one "
            f"of {sorted(entry.methods)}"
        )
    if info.needs_hypernetwork and not entry.hypernetwork:
        usable = sorted(m for m, i in entry.methods.items() if not i.needs_hypernetwork)
        raise EditConfigError(
            f"method {method!r} needs a hypernetwork, and model {entry.name!r} "
            f"has none registered; choose one of {usable}"
        )
    return method


def check_options(
    entry: ModelEntry, method: str, given: dict[str, Any], settings: ApiSettings
) -> dict[str, Any]:
    """Options checked against the method's bounds (the spec its editor config exports at
    registration, :mod:`models.bounds`), so the API refuses what the worker would refuse."""
    info = entry.methods[method]
    unknown = sorted(set(given) - set(info.options))
    if unknown:
        raise EditConfigError(
            f"method {method!r} has no option(s) [{', '.join(quoted(k) for k in unknown[:10])}"
            f"{f', ... ({len(unknown)} in all)' if len(unknown) > 10 else ''}]; it takes "
            f"{sorted(info.options)}"
        )
    bounds = served_bounds(info, settings)
    clean = {}
    for key, value in given.items():
        if key in bounds:
            clean[key] = bounds[key].check(key, value)
        else:  # an option without a bound (or an entry registered before bounds): its type
            clean[key] = _same_type(key, value, info.options[key])
    served = served_options(info, settings)
    for key, value in served.items():  # a default this server caps travels with the job
        if key not in clean and value != info.options[key]:
            clean[key] = value
    return clean


def served_options(info: MethodInfo, settings: ApiSettings) -> dict[str, Any]:
    """A method's option defaults as this server applies them, and as ``GET /v1/models``
    advertises them: the model's own (its manifest's ``extra.edit_defaults`` may set
    ``max_steps`` up to the editor's 10,000), each within :func:`served_bounds`. An edit that
    leaves ``max_steps`` out runs at most ``VITEDIT_MAX_STEPS_LIMIT`` steps, as one that sends
    more is refused."""
    bounds = served_bounds(info, settings)
    options = dict(info.options)
    steps, bound = options.get("max_steps"), bounds.get("max_steps")
    if isinstance(steps, int) and bound is not None and steps > bound.high:
        options["max_steps"] = int(bound.high)
    return options


def served_bounds(info: MethodInfo, settings: ApiSettings) -> dict[str, Bound]:
    """A method's option bounds as this server enforces them, and as ``GET /v1/models``
    advertises them: the editor's own (recorded at registration), with ``max_steps`` capped at
    the server's ``VITEDIT_MAX_STEPS_LIMIT`` (the editor allows 10,000; a server 2,000 by
    default). One function for both, so the advertised range is the enforced one."""
    bounds = {k: Bound.from_json(v) for k, v in info.bounds.items()}
    steps = bounds.get("max_steps")
    if steps is not None and steps.high > settings.max_steps_limit:
        bounds["max_steps"] = dataclasses.replace(steps, high=settings.max_steps_limit)
    return bounds


def _same_type(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind in (int, float) and not isinstance(value, bool):
        return Bound(kind.__name__, -math.inf, math.inf).check(key, value)
    if isinstance(value, kind):
        return value
    raise EditConfigError(f"option {key}={shown(value)} must be a {kind.__name__}")


def parse_options_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        data = json.loads(text)
    # ValueError: not JSON, or an integer of more digits than int() takes; RecursionError:
    # nested too deep
    except (ValueError, RecursionError) as exc:
        raise EditConfigError(
            f"'options' must be a JSON object, e.g. {{\"c\": 0.01}} ({exc})"
        ) from exc
    if not isinstance(data, dict):
        raise EditConfigError("'options' must be a JSON object, e.g. {\"c\": 0.01}")
    return data


def check_acceptance(**minima: float | None) -> Acceptance:
    """The acceptance gate's minima (``min_sr``, ``min_lr``, ``min_retention``), each a finite
    number in [0, 1] or None (not checked)."""
    for name, value in minima.items():
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise EditConfigError(
                f"{name}={value!r} must be a finite number in [0, 1] (a share of images)"
            )
    return Acceptance(**minima)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CheckedEdit:
    """An edit request that passed every check: what the job will do, nothing written yet."""

    requested: str  # the model reference as the client sent it (e.g. "demo-vit@latest")
    model: str
    parent: str | None
    method: str
    options: dict[str, Any]
    edits: list[CheckedImage]
    targets: list[int]
    holdouts: list[CheckedImage]
    accept: Acceptance

    def sha256(self) -> str:
        """What makes two requests 'the same' for Idempotency-Key: what the client sent (the
        model reference as written, not what ``@latest`` resolves to now), but file names."""
        head = [self.requested, self.method, self.options, self.targets]
        head.append(self.accept.model_dump())
        digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        for im in [*self.edits, None, *self.holdouts]:
            digest.update(hashlib.sha256(im.data).digest() if im else b"|")
        return digest.hexdigest()


def check_edit(
    store: Store,
    settings: ApiSettings,
    images: list[UploadFile],
    holdout: list[UploadFile],
    labels: list[str],
    model: str,
    method: str | None,
    given: dict[str, Any],
    options_json: str | None,
    accept: Acceptance,
) -> CheckedEdit:
    """Check a POST /v1/edits request (model, images, labels, method, options) as a whole."""
    ref = store.resolve(model)
    entry = store.model(ref.model)
    edits = check_images(images, settings, "edit")
    holdouts = check_images(holdout, settings, "holdout")
    if len(edits) + len(holdouts) > settings.max_images:
        raise TooLarge(f"at most {settings.max_images} images per request")
    targets = check_labels(labels, len(edits), entry)
    if len(set(targets)) > 1 and holdouts:
        raise DataError("holdout images need one target label shared by all edit images")
    chosen = check_method(entry, method)
    options = check_options(entry, chosen, {**parse_options_json(options_json), **given}, settings)
    if accept.min_lr is not None and not entry.benchmark:
        raise EditConfigError(
            f"min_lr needs a locality set, and model {entry.name!r} has none registered; "
            "leave min_lr out"
        )
    return CheckedEdit(
        model, ref.model, ref.version, chosen, options, edits, targets, holdouts, accept
    )
