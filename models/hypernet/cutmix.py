"""CutMix pseudo-edit episodes (docs/method.md section 3): unlabeled images -> (x, x~, f(x)).

An episode pastes a box of a second image x' into x at the same position. The box is aligned to
the patch grid and lies fully inside the image; the target is the frozen backbone's own
prediction on the clean x: no label is needed, and any image folder of the backbone's domain works.

Box size scaling rule: the paper uses 3 to 8 patches a side on a 14-patch grid (224 px, patch 16),
i.e. 3/14 to 8/14 of the side. For a grid of g patches we keep those fractions::

    lo = max(1, round(g * 3 / 14)),   hi = min(g - 1, ceil(g * 8 / 14)),   hi >= lo

which gives 3-8 at g = 14, 1-3 at g = 4 (28 px, patch 7), 2-4 at g = 7. Height and width are
drawn independently; the top-left corner uniformly among the positions that keep the box inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import nn

from models.errors import DataError
from models.images import list_images, open_image

REFERENCE_GRID = 14  # 224 px / patch 16: the grid the paper's 3-8 patch range refers to
REFERENCE_RANGE = (3, 8)


def box_range(grid: int, reference: tuple[int, int] = REFERENCE_RANGE) -> tuple[int, int]:
    """Smallest and largest box side, in patches, for a grid of ``grid`` patches a side."""
    lo = max(1, round(grid * reference[0] / REFERENCE_GRID))
    hi = max(lo, min(grid - 1, math.ceil(grid * reference[1] / REFERENCE_GRID)))
    return min(lo, grid), min(hi, grid)


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(patch side in px, grid side in patches) of a timm ViT with square patches and images.

    A token's side in pixels is the image side over the grid side: for a plain ViT that is its
    ``patch_size``; for a hybrid (convolutional stem) ``patch_size`` counts feature-map cells.
    """
    embed = model.patch_embed
    image, grid = embed.img_size, embed.grid_size
    if image[0] != image[1] or grid[0] != grid[1] or image[0] % grid[0]:
        raise ValueError(
            f"CutMix boxes need a square image split into square patches, got {image} and {grid}"
        )
    return int(image[0]) // int(grid[0]), int(grid[0])


def sample_boxes(
    n: int, grid: int, gen: torch.Generator, sides: tuple[int, int] | None = None
) -> torch.Tensor:
    """(n, 4) long boxes (top, left, height, width) in patch units, fully inside the grid."""
    lo, hi = sides or box_range(grid)
    hw = torch.randint(lo, hi + 1, (n, 2), generator=gen)
    top_left = (torch.rand(n, 2, generator=gen) * (grid - hw + 1)).long()  # in [0, grid - side]
    return torch.cat([top_left, hw], dim=1)


def paste(x: torch.Tensor, x2: torch.Tensor, boxes: torch.Tensor, patch: int) -> torch.Tensor:
    """x with the box of x2 pasted at the same position: (N, C, H, W) each, boxes in patches."""
    out = x.clone()
    for i, (top, left, h, w) in enumerate((boxes * patch).tolist()):
        out[i, :, top : top + h, left : left + w] = x2[i, :, top : top + h, left : left + w]
    return out


class ImagePool(Protocol):
    """Unlabeled images of the backbone's domain, preprocessed on demand."""

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TensorPool:
    """A pool held in memory as a preprocessed (N, C, H, W) tensor."""

    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]


@dataclass
class FolderPool:
    """A pool read from an image folder (recursively), one batch at a time."""

    paths: list[Path]
    transform: Callable[[Image.Image], torch.Tensor]

    @classmethod
    def from_folder(
        cls, folder: Path, transform: Callable[[Image.Image], torch.Tensor]
    ) -> FolderPool:
        paths = list_images(Path(folder))
        if len(paths) < 2:
            raise DataError(f"{folder} holds {len(paths)} image(s); CutMix needs at least 2")
        return cls(paths, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(open_image(self.paths[i])) for i in indices.tolist()])


@dataclass
class Episodes:
    """A batch of B pseudo-edits."""

    clean: torch.Tensor  # (B, C, H, W) the images x
    mixed: torch.Tensor  # (B, C, H, W) x~ = x with a box of x' pasted in
    clean_logits: torch.Tensor  # (B, num_classes) the frozen backbone on x
    boxes: torch.Tensor  # (B, 4) top, left, height, width in patches
    # natural failures only (FailureSampler with predictions): per episode another failure of
    # the same true and predicted class, what a benchmark group's generalization images are;
    # ``has_sibling`` (B,) False where the failure is its group's only one (its sibling is itself)
    siblings: torch.Tensor | None = None  # (B, C, H, W)
    has_sibling: torch.Tensor | None = None  # (B,) bool

    @property
    def targets(self) -> torch.Tensor:
        """The edit targets: the backbone's prediction on the clean images."""
        return self.clean_logits.argmax(dim=-1)


class CutMixSampler:
    """Draws episode batches from a pool with its own seeded generator (saved in checkpoints)."""

    def __init__(
        self,
        model: nn.Module,
        pool: ImagePool,
        seed: int = 0,
        sides: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(pool) < 2:
            raise DataError(f"the CutMix pool holds {len(pool)} image(s); it needs at least 2")
        self.model, self.pool, self.device = model, pool, torch.device(device)
        self.patch, self.grid = patch_grid(model)
        self.sides = sides or box_range(self.grid)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def sample(self, batch: int) -> Episodes:
        idx = self._pairs(batch)
        x, x2 = self.pool.get(idx[:, 0]), self.pool.get(idx[:, 1])
        boxes = sample_boxes(batch, self.grid, self.generator, self.sides)
        x, x2 = x.to(self.device), x2.to(self.device)
        return Episodes(x, paste(x, x2, boxes, self.patch), self.model(x), boxes)

    def _pairs(self, batch: int) -> torch.Tensor:
        """(batch, 2) pool indices with x != x' in every pair."""
        first = torch.randint(len(self.pool), (batch,), generator=self.generator)
        offset = torch.randint(1, len(self.pool), (batch,), generator=self.generator)
        return torch.stack([first, (first + offset) % len(self.pool)], dim=1)
