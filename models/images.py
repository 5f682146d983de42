"""Image files: which suffixes count as images, opening one so a corrupt file fails early, and the
size limits of images sent to the service (checked from the header, before any decoding)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.errors import DataError, TooLarge

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}

MAX_SIDE = 4096
"""Longest side accepted, in pixels: a 2 KB PNG of 1 x 1,000,000 pixels (under any pixel limit)
took a worker from 1.4 to 3.0 GB in the model transform, which scales its short side up."""

MAX_ASPECT = 20
"""Longest side over shortest side accepted."""

WORK_SIDE = 512
"""A large image is reduced (integer box filter; JPEG decoded at a reduced scale) while its shorter
side stays at least this: every model transform resizes far below it."""

_REDUCIBLE_AS = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}
"""Modes ``Image.reduce`` refuses, and the mode to convert them to first."""


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder, recursively, in a stable order."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def open_image(path: Path, name: str | None = None) -> Image.Image:
    """Decode an image file fully, so a corrupt file fails here (naming it), not later: its size
    checked from the header first (:func:`check_size`), reduced when large
    (:func:`decode_reduced`). Every image the service or a benchmark folder reads comes through
    here, so no file decodes to more than a few MB (a benchmark zip of camera photos, or of PNGs
    of 9,000 x 9,000 pixels that compress to a few KB, no longer fills a worker's memory).
    ``name``: how errors call the file (default its file name)."""
    name = name or path.name
    try:
        with Image.open(path) as im:
            check_size(im.size, name)
            im.verify()
        with Image.open(path) as im:
            return decode_reduced(im, name)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from exc


def check_size(size: tuple[int, int], name: str) -> None:
    """TooLarge (a side over MAX_SIDE) or DataError (aspect ratio over MAX_ASPECT)."""
    width, height = size
    if max(width, height) > MAX_SIDE:
        raise TooLarge(
            f"{name} is {width}x{height} pixels; each side may be at most {MAX_SIDE}: downscale it"
        )
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise DataError(
            f"{name} is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT}:1; "
            "crop it around the object"
        )


def decode_reduced(image: Image.Image, name: str) -> Image.Image:
    """Decode an opened image whose size passes :func:`check_size`, reduced while its shorter side
    stays >= WORK_SIDE (cheaply: JPEG decodes at a reduced scale, others by integer box filter)."""
    check_size(image.size, name)
    factor = min(image.size) // WORK_SIDE
    if factor >= 2:
        image.draft(image.mode, (image.width // factor, image.height // factor))  # JPEG only
    image.load()
    factor = min(image.size) // WORK_SIDE
    if factor < 2:
        return image.copy()
    if image.mode in _REDUCIBLE_AS:
        image = image.convert(_REDUCIBLE_AS[image.mode])
    return image.reduce(factor)
