"""Review figures of one edit: the PNGs a person looks at to judge a new version.

The worker calls :func:`write_review` at report time, while the version is still a draft: the
figures land in the version folder (``review/*.png``), so the store lists each with its sha256 in
the manifest like the patch, and the returned summary (counts, flips, the benchmark front) goes
into the manifest's ``review``. The API only serves the files and renders its page from that.

This module chooses and counts what each section shows; :mod:`models.review_figures` draws it
(Pillow grids; matplotlib's object API on the Agg canvas, no pyplot). Images are kept as small
copies (:func:`thumbnail`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from models.reports import ReportSets, TokenSet
from models.review_figures import BAD, GOOD, Tile, front_figure, mask_image, tiles_image
from models.sites import Patch, Sites

REVIEW_DIR = "review"  # the figures' folder inside a version folder
REVIEW_SCHEMA = 1
THUMB_SIDE = 96  # pixels: longest side of an image kept for the figures
MAX_RETENTION_VERSIONS = 6  # the most recent earlier versions drawn
DRAW_ERRORS = (ArithmeticError, LookupError, OSError, RuntimeError, TypeError, ValueError)
"""What a section may raise and still leave the edit stored (never a job timeout)."""

log = logging.getLogger(__name__)


def thumbnail(image: Image.Image, side: int = THUMB_SIDE) -> Image.Image:
    """A small copy (longest side <= ``side``) in L or RGB: enough to recognise, cheap to keep."""
    small = image.convert("L" if image.mode in ("1", "L", "I", "F", "I;16") else "RGB")
    small.thumbnail((side, side))
    return small


@dataclass(frozen=True)
class Front:
    """A model's benchmark front (``vitedit bench`` results.json): per method, its best points."""

    source: str
    methods: dict[str, list[dict[str, Any]]]  # method -> [{"lr", "gr", "knob"}], 0..1
    settings: dict[str, Any] = field(default_factory=dict)


def read_front(path: str | Path | None, weights_sha256: str) -> tuple[Front | None, str]:
    """The front of a bench results file and a note for the page: its source, or why none.
    The file is named by its name alone: the page and the manifest go to clients, and the
    folder is this host's (a store, a checkout), nothing a client can use."""
    alone = "this edit's point is shown alone"
    if not path:
        return None, f"no benchmark results are registered for this model: {alone}"
    try:
        data = json.loads(Path(path).read_text())
        measured_on = data["backbone"]["sha256"]
        methods = {
            name: [
                {"lr": float(p["lr"]), "gr": float(p["gr"]), "knob": p.get("knob")}
                for p in method["front"]
            ]
            for name, method in data["methods"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, (
            f"the registered benchmark results {Path(path).name} are unreadable "
            f"({type(exc).__name__}): {alone}"
        )
    if measured_on != weights_sha256:
        return None, (
            f"the registered benchmark results {Path(path).name} were measured on other base weights "
            f"({str(measured_on)[:12]}...): {alone}"
        )
    settings = data.get("settings") or {}
    used = ", ".join(
        f"{k} {settings[k]}" for k in ("lr", "max_steps", "stop_loss") if k in settings
    )
    note = (
        f"fronts measured by `vitedit bench` ({Path(path).name}): each point averages many "
        f"single-image edits made from the base model{f' ({used})' if used else ''}; "
        "this edit is one point, its LR against its parent"
    )
    return Front(Path(path).name, methods, settings), note


def neuron_changes(sites: Sites, parent: list[torch.Tensor], patch: Patch) -> dict[str, np.ndarray]:
    """|dW| of each neuron under ``patch`` over the parent's site weights: {mlp: (2, hidden)},
    row 0 the fc1 rows, row 1 the fc2 columns, 0 where the edit left a neuron alone."""
    out = {
        mlp: np.zeros((2, h), np.float32) for mlp, h in zip(sites.mlps, sites.hidden, strict=True)
    }
    for i, (matrix, weight) in enumerate(zip(sites.matrices, parent, strict=True)):
        if matrix.param not in patch.entries:
            continue
        idx, values = patch.entries[matrix.param]
        old = weight.detach().index_select(matrix.dim, idx.to(weight.device)).cpu()
        norms = (values.float() - old.float()).norm(dim=1 - matrix.dim)
        out[sites.mlps[i // 2]][i % 2, idx.numpy()] = norms.numpy()
    return out


@dataclass
class ReviewInputs:
    """What the figures show: the report's sets (with thumbnails) and predictions, and more."""

    sets: ReportSets  # each TokenSet's ``images`` holds the thumbnails
    before: dict[str, torch.Tensor]  # predictions of the parent (models.reports.predict_sets)
    after: dict[str, torch.Tensor]  # predictions of the new version
    metrics: dict[str, Any]  # the report's metrics (GR, LR_vs_parent, ...)
    class_names: tuple[str, ...]
    changes: dict[str, np.ndarray]  # neuron_changes()
    retention_images: dict[str, list[Image.Image]] = field(default_factory=dict)
    front: Front | None = None
    front_note: str = ""


def write_review(version_dir: Path, inputs: ReviewInputs) -> dict[str, Any]:
    """Write ``review/*.png`` into a (draft) version folder; returns the manifest's summary.

    A section that fails to draw is left out, its error in ``summary["errors"]``: a broken figure
    costs its section of the page, never the edit (a job timeout still goes through).
    """
    start = time.perf_counter()
    folder = version_dir / REVIEW_DIR
    folder.mkdir()
    summary: dict[str, Any] = {"schema": REVIEW_SCHEMA, "figures": {}}
    for part in (_edits, _holdout, _locality, _retention, _mask, _front):
        key = part.__name__.lstrip("_")
        try:
            summary[key], figures = part(inputs)
            for name, fig in figures.items():
                if fig is not None:
                    _save(fig, folder / f"{name}.png")
                    summary["figures"][name] = f"{REVIEW_DIR}/{name}.png"
        except DRAW_ERRORS as exc:
            log.exception("review section %s could not be drawn", key)
            summary.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _save(drawing: Figure | Image.Image, path: Path) -> None:
    try:
        if isinstance(drawing, Image.Image):
            drawing.save(path, format="PNG")
        else:
            drawing.savefig(path, format="png", dpi=100)
    except BaseException:
        path.unlink(missing_ok=True)  # no half figure in the version folder
        raise


Part = tuple[Any, dict[str, Figure | Image.Image | None]]  # (numbers, drawings by name)


def _name(names: tuple[str, ...], label: int | torch.Tensor) -> str:
    label = int(label)
    text = names[label] if 0 <= label < len(names) else str(label)
    return text if len(text) <= 14 else text[:13] + "…"


def _pick(
    ts: TokenSet | None, indices: list[int], caption: Callable[[int], str], good: torch.Tensor
) -> list[Tile]:
    """Tiles of some images of a set (none when the set kept no thumbnails)."""
    images = (ts.images if ts is not None else None) or []
    if len(images) < len(indices):
        return []
    return [Tile(images[i], caption(i), GOOD if bool(good[i]) else BAD) for i in indices]


def _edits(inputs: ReviewInputs) -> Part:
    ts, name = inputs.sets.edit, partial(_name, inputs.class_names)
    t, b, a = ts.targets, inputs.before["edit"], inputs.after["edit"]
    tiles = _pick(
        ts,
        list(range(len(t))),
        lambda i: f"target {name(t[i])}\nbefore {name(b[i])}\nafter {name(a[i])}",
        a == t,
    )
    return {"images": len(t)}, {"edits": tiles_image(tiles, "Edit images")}


def _holdout(inputs: ReviewInputs) -> Part:
    ts, name = inputs.sets.holdout, partial(_name, inputs.class_names)
    if ts is None:
        return {"source": None, "images": 0}, {}
    t, b, a = ts.targets, inputs.before["holdout"], inputs.after["holdout"]
    failed = b != t
    groups = {
        "fixed": failed & (a == t),
        "not_fixed": failed & (a != t),
        "broken": ~failed & (a != t),
    }
    numbers = {
        "source": inputs.sets.holdout_source,
        "images": len(t),
        "failures": int(failed.sum()),
    }
    numbers |= {k: int(v.sum()) for k, v in groups.items()}
    figures = {}
    for key, title in (("fixed", "fixed"), ("not_fixed", "not fixed")):
        chosen = groups[key].nonzero().flatten().tolist()
        tiles = _pick(ts, chosen, lambda i: f"{name(t[i])}\n{name(b[i])} → {name(a[i])}", a == t)
        figures[f"holdout_{key}"] = tiles_image(
            tiles, f"Held-out failures {title} (label, then before → after)"
        )
    return numbers, figures


def _locality(inputs: ReviewInputs) -> Part:
    ts, name = inputs.sets.locality, partial(_name, inputs.class_names)
    if ts is None:
        return {"images": 0, "flipped": 0, "flips": []}, {}
    old, new = inputs.before["locality"], inputs.after["locality"]
    flipped = (old != new).nonzero().flatten().tolist()
    pairs = Counter((int(old[i]), int(new[i])) for i in flipped)
    flips = [{"old": o, "new": w, "count": c} for (o, w), c in pairs.most_common()]
    tiles = _pick(ts, flipped, lambda i: f"{name(old[i])}\n→ {name(new[i])}", old == new)
    title = "Locality images that flipped (old → new class)"
    numbers = {"images": len(old), "flipped": len(flipped), "flips": flips}
    return numbers, {"locality": tiles_image(tiles, title)}


def _retention(inputs: ReviewInputs) -> Part:
    name, numbers, tiles = partial(_name, inputs.class_names), {}, []
    drawn = list(inputs.sets.retention)[-MAX_RETENTION_VERSIONS:]
    for version, ts in inputs.sets.retention.items():
        t, now = ts.targets, inputs.after[f"retention:{version}"]
        numbers[version] = {"images": len(now), "kept": int((now == t).sum())}
        if version in drawn:
            shown = TokenSet(ts.tokens, t, inputs.retention_images.get(version))
            captions = [
                f"{version[-6:]}: {name(x)}\nnow {name(y)}" for x, y in zip(t, now, strict=True)
            ]
            tiles += _pick(shown, list(range(len(t))), captions.__getitem__, now == t)
    title = "Edit images of earlier versions, under this one"
    return numbers, {"retention": tiles_image(tiles, title)}


def _mask(inputs: ReviewInputs) -> Part:
    numbers = {
        mlp: {
            "hidden": grid.shape[1],
            "fc1": int((grid[0] > 0).sum()),
            "fc2": int((grid[1] > 0).sum()),
        }
        for mlp, grid in inputs.changes.items()
    }
    return numbers, {"mask": mask_image(inputs.changes)}


def _front(inputs: ReviewInputs) -> Part:
    gr, lr = inputs.metrics.get("GR"), inputs.metrics.get("LR_vs_parent")
    point = {"LR": lr, "GR": gr} if gr is not None and lr is not None else None
    front = inputs.front
    numbers = {
        "source": front.source if front else None,
        "note": inputs.front_note,
        "point": point,
        "methods": front.methods if front else {},
    }
    return numbers, {"front": front_figure(front.methods if front else None, point)}
