"""Image files: which suffixes count as images, and opening one so a corrupt file fails early."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder, recursively, in a stable order."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def open_image(path: Path) -> Image.Image:
    """Open an image file fully, so a corrupt file fails here (naming it), not later."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
