"""Data: Fashion-MNIST reader, the paper's benchmark folder layout, and the shipped demo benchmark.

The paper's layout (what users bring):

    edit_groups/<true>-<tag>/*.png   one folder per error group; <true> is the true class index
                                     (e.g. ``609-586``: true 609, predicted 586; ``3-invert``)
    locality/**/*.png                sensitive images; their labels are not needed
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_GROUP_NAME = re.compile(r"^(\d+)(?:[-_].*)?$")


def read_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the 'train' or 't10k' split."""
    images = root / f"{split}-images-idx3-ubyte.gz"
    labels = root / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise DataError(
            f"{images} is missing: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) to regenerate the demo world"
        )
    with gzip.open(images) as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


@dataclass
class EditGroup:
    """Failure images sharing one true label (the paper's error group)."""

    name: str
    label: int
    images: list[Image.Image] = field(repr=False)


@dataclass
class EditBenchmark:
    """Edit groups + a sensitive locality set, whatever their source."""

    groups: list[EditGroup]
    locality: list[Image.Image] = field(repr=False)

    def describe(self) -> str:
        sizes = ", ".join(f"{g.name}:{len(g.images)}" for g in self.groups)
        return f"{len(self.groups)} groups ({sizes}); locality {len(self.locality)} images"


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


def read_edit_groups(root: Path, min_size: int = 2) -> list[EditGroup]:
    """Read ``root/<true>-<tag>/*`` folders; groups smaller than ``min_size`` are an error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"edit-groups folder {root} does not exist")
    groups = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _GROUP_NAME.match(folder.name)
        if not match:
            raise DataError(
                f"group folder {folder.name!r} must start with the true class index, "
                "like '609-586' (true 609, predicted 586) or '3-invert'"
            )
        images = [open_image(p) for p in list_images(folder)]
        if len(images) < min_size:
            raise DataError(f"group {folder.name} has {len(images)} images; need >= {min_size}")
        groups.append(EditGroup(folder.name, int(match.group(1)), images))
    if not groups:
        raise DataError(f"{root} holds no group folders")
    return groups


def read_locality(root: Path) -> list[Image.Image]:
    paths = list_images(Path(root))
    if not paths:
        raise DataError(f"locality folder {root} holds no images")
    return [open_image(p) for p in paths]


def read_benchmark(groups_dir: Path, locality_dir: Path) -> EditBenchmark:
    return EditBenchmark(read_edit_groups(groups_dir), read_locality(locality_dir))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 (N, H, W) greyscale arrays -> PIL images."""
    return [Image.fromarray(a, mode="L") for a in images]
