"""The paper's benchmark folder layout: edit groups and a locality set, whatever their source.

The paper's layout (what users bring):

    edit_groups/<true>-<tag>/*.png   one folder per error group; <true> is the true class index
                                     (e.g. ``609-586``: true 609, predicted 586; ``3-invert``)
    locality/**/*.png                sensitive images; their labels are not needed
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import DataError, TooLarge
from models.images import list_images, open_image

_GROUP_NAME = re.compile(r"^(\d+)(?:[-_].*)?$")


@dataclass
class EditGroup:
    """Failure images sharing one true label (the paper's error group)."""

    name: str
    label: int
    images: list[Image.Image] = field(repr=False)
    split: str = "all"  # "tuning" or "test" in a world whose groups are split in halves


@dataclass
class EditBenchmark:
    """Edit groups + a sensitive locality set, whatever their source."""

    groups: list[EditGroup]
    locality: list[Image.Image] = field(repr=False)

    def describe(self) -> str:
        sizes = ", ".join(f"{g.name}:{len(g.images)}" for g in self.groups)
        return f"{len(self.groups)} groups ({sizes}); locality {len(self.locality)} images"

    @property
    def splits(self) -> list[str]:
        return sorted({g.split for g in self.groups})

    def select(self, split: str) -> EditBenchmark:
        """Only the groups of one half ("tuning" or "test"); "all" keeps every group."""
        if split == "all":
            return self
        groups = [g for g in self.groups if g.split == split]
        if not groups:
            raise DataError(f"this benchmark has no {split!r} groups; its splits: {self.splits}")
        return EditBenchmark(groups, self.locality)


@dataclass
class World:
    """A built-in world's benchmark, decoded: groups, locality, held-out set and CutMix pool."""

    benchmark: EditBenchmark
    heldout_images: np.ndarray  # uint8 (N, H, W[, 3]), clean images not used elsewhere
    heldout_labels: np.ndarray  # int64 (N,)
    pool: np.ndarray  # uint8 (M, H, W[, 3]), unlabeled train images for CutMix meta-training
    group_arrays: dict[str, np.ndarray]  # group name -> uint8 (n, H, W[, 3])
    locality_array: np.ndarray  # uint8 (L, H, W[, 3])


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
        images = [open_image(p, f"{folder.name}/{p.name}") for p in list_images(folder)]
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
    return [open_image(p, f"{Path(root).name}/{p.relative_to(root)}") for p in paths]


MAX_SERVED_IMAGES = 5_000
"""Images (edit groups + locality) a served model's benchmark may hold: a worker keeps the
locality set's model inputs in memory (600 KB each at 224 px) and evaluates all of it after every
edit. The paper's kind of locality set is a few hundred of the most sensitive images."""


def read_benchmark(
    groups_dir: Path, locality_dir: Path, max_images: int | None = None
) -> EditBenchmark:
    """The paper's folder layout; with ``max_images`` (a served model's: MAX_SERVED_IMAGES) the
    images are counted before any is decoded, and more is TooLarge."""
    if max_images is not None:
        count = sum(len(list_images(Path(d))) for d in (groups_dir, locality_dir))
        if count > max_images:
            raise TooLarge(
                f"the benchmark holds {count} images (edit groups + locality); a served model's "
                f"may hold at most {max_images}: keep the locality set to the few hundred most "
                "sensitive images"
            )
    return EditBenchmark(read_edit_groups(groups_dir), read_locality(locality_dir))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 (N, H, W) grey or (N, H, W, 3) colour arrays -> PIL images."""
    return [Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB") for a in images]


def read_world_arrays(path: Path, entry: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a world's ``world.npz`` (or of another file of the world, whose sha256
    ``world.json`` records under ``entry``), after checking its sha256 against ``world.json``."""
    from models.errors import IntegrityError
    from models.store.manifest import read_json, sha256_file

    manifest = read_json(path.with_name("world.json"))
    section = (manifest.get(entry) or {}) if entry else manifest
    recorded = section.get("sha256")
    actual = sha256_file(path)
    if recorded != actual:
        raise IntegrityError(
            f"{path} has sha256 {actual[:16]}..., world.json says {str(recorded)[:16]}..."
        )
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def split_groups(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Group name -> its images, from the concatenated ``group_images`` and ``group_sizes``."""
    bounds = np.cumsum([0, *arrays["group_sizes"]])
    return {
        str(n): arrays["group_images"][a:b]
        for n, a, b in zip(arrays["group_names"], bounds[:-1], bounds[1:], strict=True)
    }
