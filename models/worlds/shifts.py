"""Photometric and style shifts no backbone of ours trains on: the source of the shift groups.

Each shift maps float images in [0, 255], shape (N, H, W) grey or (N, H, W, 3) colour, to shifted
images of the same shape; geometry scales with the image side, so a 28-px and a 32-px world get
the same shift. They stand in for the paper's AI-generated groups (oil painting, stage light).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _spatial(x: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Multiply (N, H, W[, C]) images by a (N, H, W) light map."""
    return x * (light[..., None] if x.ndim == 4 else light)


def _spotlight(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stage light: a bright Gaussian spot at a random place, the rest in the dark."""
    side = x.shape[1]
    yy, xx = np.mgrid[0:side, 0:side]
    cy, cx = rng.uniform(6 * side / 28, 22 * side / 28, size=(2, len(x), 1, 1))
    sigma = 7.0 * side / 28
    light = 0.12 + 0.88 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return _spatial(x, light)


def _sketch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sketch style: the gradient magnitude of the image (outlines only, no fill)."""
    gy, gx = np.gradient(x.astype(np.float32), axis=(1, 2))
    mag = np.hypot(gx, gy)
    peak = mag.max(axis=tuple(range(1, x.ndim)), keepdims=True)
    return 255.0 * mag / np.maximum(peak, 1.0)


SHIFTS: dict[str, Shift] = {
    "invert": lambda x, rng: 255.0 - x,  # negative film
    "lowlight": lambda x, rng: x * 0.3,  # dim lighting
    "spotlight": _spotlight,
    "sketch": _sketch,
}


def apply_shift(name: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 images -> the same images under shift ``name`` (uint8, deterministic from ``seed``)."""
    rng = np.random.default_rng(seed)
    return np.clip(SHIFTS[name](x.astype(np.float32), rng), 0, 255).round().astype(np.uint8)
