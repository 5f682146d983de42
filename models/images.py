"""Image files: which suffixes count as images, opening one so a corrupt file fails early, and the
size limits of images sent to the service (checked from the header, before any decoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import DataError, TooLarge

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
"""The only formats Pillow may read a user's or a benchmark's image as (``Image.open(...,
formats=IMAGE_FORMATS)``), those of :data:`IMAGE_SUFFIXES`. Left to itself, Pillow tries every
plugin it has: an EPS file is handed to Ghostscript, a program run on what a user sent, and ICO,
PGM, PSD, FITS and thirty more formats no one sends a classifier are parsed by code that does not
need to see the network."""

ACCEPTED_FORMATS = "PNG, JPEG, BMP, WebP, GIF or TIFF"
""":data:`IMAGE_FORMATS` as messages name them."""

MAX_SIDE = 4096
"""Longest side accepted, in pixels: a 2 KB PNG of 1 x 1,000,000 pixels (under any pixel limit)
took a worker from 1.4 to 3.0 GB in the model transform, which scales its short side up."""

MAX_ASPECT = 20
"""Longest side over shortest side accepted."""

WORK_SIDE = 512
"""A large image is reduced (integer box filter; JPEG decoded at a reduced scale) while its shorter
side stays at least this: every model transform resizes far below it."""

_REDUCIBLE_AS = {"1": "L", "P": "RGBA"}
"""Modes ``Image.reduce`` refuses, and the mode to convert them to first."""

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
"""Pillow's modes of a 16-bit single-channel image (a 16-bit grey PNG or TIFF)."""


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
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            check_size(im.size, name)
            im.verify()
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return decode_reduced(im, name)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: not a readable image ({unreadable_reason(exc)})") from exc


def unreadable_reason(exc: Exception) -> str:
    """Why Pillow could not read a file, in words (its "cannot identify image file" names the
    file object or the server's path, neither of which a user sent). Pillow says that too of a
    file of a format outside :data:`IMAGE_FORMATS`, so the answer names the accepted ones."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not one of the accepted formats: {ACCEPTED_FORMATS}"
    return str(exc)


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
    image = eight_bit(image, name)
    factor = min(image.size) // WORK_SIDE
    if factor < 2:
        return image.copy()
    if image.mode in _REDUCIBLE_AS:
        image = image.convert(_REDUCIBLE_AS[image.mode])
    return image.reduce(factor)


def eight_bit(image: Image.Image, name: str) -> Image.Image:
    """A single-channel image of more than 8 bits as 8-bit grey ("L"); other images unchanged.

    Pillow's ``convert`` clips such pixels at 255 rather than scaling them, so a 16-bit grey PNG
    of a shirt reached the model nearly white (and was classified as a pullover). 16-bit pixels
    are scaled (0-65535 to 0-255). 32-bit integer or float pixels ("I", "F") carry no range of
    their own: kept as they are when within 0-255, refused otherwise, rather than guessed.
    (Pillow already reads 16-bit RGB and RGBA files as 8-bit.)"""
    if image.mode in _SIXTEEN_BIT:
        pixels = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(np.rint(pixels).astype(np.uint8))  # uint8, 2-D: "L"
    if image.mode in ("I", "F"):
        pixels = np.asarray(image)
        kind = "integer" if image.mode == "I" else "float"
        if not np.isfinite(pixels).all():  # Pillow's extrema skip NaN; convert makes it black
            raise DataError(f"{name} has 32-bit float pixels that are not numbers (NaN or inf)")
        low, high = pixels.min(), pixels.max()
        if low < 0 or high > 255:
            raise DataError(
                f"{name} has 32-bit {kind} pixels from {low:g} to {high:g}, a range this service "
                "cannot guess the scale of: save it with 8 bits a channel (0-255) or as a 16-bit PNG"
            )
        return image.convert("L")
    return image
