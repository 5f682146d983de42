"""The drawings of the review page (:mod:`models.review`): image grids, mask heatmaps, the front.

Grids are drawn with Pillow; heatmaps and the front with matplotlib's object API on the Agg canvas
(``Figure``: no pyplot, no global backend, no display). Each function returns the drawing (saved
by the caller), or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

GOOD, BAD = "#1a7f37", "#cf222e"  # caption colours: right, wrong
MAX_TILES = 24  # images drawn per figure; the page's counts cover every image
CELL = (150, 112)  # pixels of one grid cell: width, image height
CAPTION = 44  # pixels above each image: three lines of caption
TITLE = 30  # pixels above the grid
PANEL_WIDTH = 360  # pixels a mask heatmap is scaled up to, about


@dataclass(frozen=True)
class Tile:
    """One image of a grid, with its caption in green (right) or red (wrong)."""

    image: Image.Image
    caption: str
    colour: str


def tiles_image(tiles: list[Tile], title: str, cols: int = 8) -> Image.Image | None:
    """A grid of captioned images (the first MAX_TILES), ``cols`` per row, drawn with Pillow.

    Not matplotlib: a grid of 24 axes took 3-6 s to lay out and draw on our shared 2-core
    machine, this takes about 0.1 s (the same DejaVu font as the other figures).
    """
    if not tiles:
        return None
    shown = tiles[:MAX_TILES]
    cols = min(cols, len(shown))
    rows = math.ceil(len(shown) / cols)
    cell_w, cell_h = CELL[0], CELL[1] + CAPTION
    width = max(cols * cell_w, 450)
    canvas = Image.new("RGB", (width, TITLE + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(shown):
        x0, y0 = (i % cols) * cell_w, TITLE + (i // cols) * cell_h
        pixels = _fit(tile.image)
        canvas.paste(pixels, (x0 + (cell_w - pixels.width) // 2, y0 + CAPTION))
        at = (x0 + cell_w // 2, y0 + CAPTION - 3)  # bottom centre of the caption
        style = {"font": _font(10), "anchor": "md", "align": "center"}
        draw.multiline_text(at, tile.caption, fill=tile.colour, **style)
    more = f" (the first {len(shown)} of {len(tiles)})" if len(tiles) > len(shown) else ""
    draw.text((width // 2, TITLE // 2), title + more, fill="black", font=_font(13), anchor="mm")
    return canvas


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _fit(image: Image.Image) -> Image.Image:
    """An RGB copy scaled to fit one cell (by an integer factor when enlarging: crisp pixels)."""
    side = max(image.size)
    scale = max(1, CELL[1] // side) if side <= CELL[1] else CELL[1] / side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.NEAREST)


def _square(values: np.ndarray) -> np.ndarray:
    """(hidden,) -> a wide 2-D grid (row-major, NaN padded) that reads as a heatmap."""
    cols = math.ceil(math.sqrt(2 * len(values)))
    grid = np.full(math.ceil(len(values) / cols) * cols, np.nan, np.float32)
    grid[: len(values)] = values
    return grid.reshape(-1, cols)


def mask_image(changes: dict[str, np.ndarray]) -> Image.Image | None:
    """Per site, two heatmaps (fc1 rows, fc2 columns) of |dW| per neuron on one colour scale,
    one cell per neuron (grey: padding), and the scale's bar; drawn with Pillow."""
    if not changes:
        return None
    top = max(float(grid.max()) for grid in changes.values()) or 1.0
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#eeeeee")
    panels = []
    for mlp, grid in changes.items():
        for values, what in zip(grid, ("fc1 rows", "fc2 columns"), strict=True):
            cells = np.ma.masked_invalid(_square(values) / top)
            pixels = Image.fromarray((cmap(cells)[..., :3] * 255).astype(np.uint8))
            scale = max(2, PANEL_WIDTH // pixels.width)
            heat = pixels.resize(
                (pixels.width * scale, pixels.height * scale), Image.Resampling.NEAREST
            )
            panels.append(
                (f"{mlp} {what}: {int((values > 0).sum())} of {len(values)} changed", heat)
            )
    panel_w = max(heat.width for _, heat in panels) + 20
    panel_h = max(heat.height for _, heat in panels) + 24  # + its title
    rows = math.ceil(len(panels) / 2)
    canvas = Image.new("RGB", (2 * panel_w + 110, TITLE + rows * panel_h + 10), "white")
    draw = ImageDraw.Draw(canvas)
    title = "Mask: the neurons this edit changed, per site (one cell per neuron)"
    draw.text((canvas.width // 2, TITLE // 2), title, fill="black", font=_font(13), anchor="mm")
    for i, (caption, heat) in enumerate(panels):
        x0, y0 = 10 + (i % 2) * panel_w, TITLE + (i // 2) * panel_h
        draw.text((x0, y0 + 2), caption, fill="black", font=_font(11))
        canvas.paste(heat, (x0, y0 + 20))
    bar = (cmap(np.linspace(1.0, 0.0, 200))[None, :, :3] * 255).astype(np.uint8)
    strip = Image.fromarray(bar.transpose(1, 0, 2)).resize((14, 200))
    x, y = 2 * panel_w + 20, TITLE + 20
    canvas.paste(strip, (x, y))
    draw.text((x + 18, y), f"{top:.3g}", fill="black", font=_font(10), anchor="lt")
    draw.text((x + 18, y + 200), "0", fill="black", font=_font(10), anchor="lb")
    draw.text((x - 4, y + 214), "|ΔW| of a neuron's\nrow / column", fill="black", font=_font(10))
    return canvas


def front_figure(
    methods: dict[str, list[dict[str, Any]]] | None, point: dict[str, float] | None
) -> Figure | None:
    """Each method's front (LR, GR points, 0..1) and this edit's point as a star."""
    if methods is None and point is None:
        return None
    fig = Figure(figsize=(6.5, 4.5))  # a fixed layout: the constrained one doubles the time
    ax = fig.add_axes((0.11, 0.11, 0.86, 0.82))
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
