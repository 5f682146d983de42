"""The drawings of the review page (:mod:`models.review`): image grids, mask heatmaps, the front.

matplotlib's object API on the Agg canvas (``Figure``, saved by the caller): no pyplot, no global
backend, no display; each function returns a Figure, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

GOOD, BAD = "#1a7f37", "#cf222e"  # caption colours: right, wrong
MAX_TILES = 24  # images drawn per figure; the page's counts cover every image


@dataclass(frozen=True)
class Tile:
    """One image of a grid, with its caption in green (right) or red (wrong)."""

    image: Image.Image
    caption: str
    colour: str


def tiles_figure(tiles: list[Tile], title: str, cols: int = 8) -> Figure | None:
    """A grid of captioned images (the first MAX_TILES), ``cols`` per row."""
    if not tiles:
        return None
    shown = tiles[:MAX_TILES]
    cols = min(cols, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(max(1.5 * cols, 4.5), 1.8 * rows + 0.4), layout="constrained")
    more = f" (the first {len(shown)} of {len(tiles)})" if len(tiles) > len(shown) else ""
    fig.suptitle(title + more, fontsize=9)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.set_axis_off()
    for ax, tile in zip(axes, shown, strict=False):
        grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if tile.image.mode == "L" else {}
        ax.imshow(np.asarray(tile.image), **grey)
        ax.set_title(tile.caption, fontsize=7, color=tile.colour)
    return fig


def _square(values: np.ndarray) -> np.ndarray:
    """(hidden,) -> a wide 2-D grid (row-major, NaN padded) that reads as a heatmap."""
    cols = math.ceil(math.sqrt(2 * len(values)))
    grid = np.full(math.ceil(len(values) / cols) * cols, np.nan, np.float32)
    grid[: len(values)] = values
    return grid.reshape(-1, cols)


def mask_figure(changes: dict[str, np.ndarray]) -> Figure | None:
    """Per site, two heatmaps (fc1 rows, fc2 columns) of |dW| per neuron, on one colour scale."""
    if not changes:
        return None
    fig = Figure(figsize=(8, 2.0 * len(changes) + 0.6), layout="constrained")
    axes = fig.subplots(len(changes), 2, squeeze=False)
    top = max(float(grid.max()) for grid in changes.values()) or 1.0
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#eeeeee")
    shown = None
    for (mlp, grid), row in zip(changes.items(), axes, strict=True):
        for values, ax, what in zip(grid, row, ("fc1 rows", "fc2 columns"), strict=True):
            shown = ax.imshow(_square(values), cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
            ax.set_title(
                f"{mlp} {what}: {int((values > 0).sum())} of {len(values)} changed", fontsize=8
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8, label="|ΔW| of the neuron's row / column")
    fig.suptitle("Mask: the neurons this edit changed, per site (one cell per neuron)", fontsize=9)
    return fig


def front_figure(
    methods: dict[str, list[dict[str, Any]]] | None, point: dict[str, float] | None
) -> Figure | None:
    """Each method's front (LR, GR points, 0..1) and this edit's point as a star."""
    if methods is None and point is None:
        return None
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, points in sorted((methods or {}).items()):
        if not points:
            continue
        lr, gr = zip(*sorted((p["lr"], p["gr"]) for p in points), strict=True)
        ax.plot(lr, gr, marker="o", ms=3, lw=1, label=name)
    if point is not None:
        star = {"marker": "*", "s": 240, "color": "black", "zorder": 5}
        ax.scatter([point["LR"]], [point["GR"]], label="this edit", **star)
    ax.set_xlabel("LR (locality): share of locality images unchanged")
    ax.set_ylabel("GR (generalization): held-out accuracy")
    ax.set_title(
        "This edit on the model's benchmark front"
        if methods
        else "This edit (no front registered)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
