"""CutMix pseudo-edits: patch-aligned boxes inside the image, same position, backbone targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbones import Backbone
from models.errors import DataError
from models.hypernet.cutmix import (
    CutMixSampler,
    FolderPool,
    TensorPool,
    box_range,
    paste,
    patch_grid,
    sample_boxes,
)


@pytest.mark.parametrize(
    ("grid", "expected"), [(14, (3, 8)), (4, (1, 3)), (7, (2, 4)), (2, (1, 1))]
)
def test_box_range_keeps_the_papers_fraction_of_the_side(grid, expected):
    assert box_range(grid) == expected


def test_sampled_boxes_fit_the_grid_and_the_side_range():
    boxes = sample_boxes(2000, 14, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert h.min() == 3 and h.max() == 8 and w.min() == 3 and w.max() == 8
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 14).all() and (left + w <= 14).all()
    assert len(set(top.tolist())) == 14 - 3 + 1  # every feasible row position is reachable


def test_paste_copies_exactly_the_patch_aligned_box_at_the_same_position():
    x, x2 = torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)
    boxes = torch.tensor([[1, 2, 2, 1]])  # top 1, left 2, 2 patches high, 1 wide (patch 7)
    mixed = paste(x, x2, boxes, patch=7)
    changed = mixed[0, 0].nonzero()
    assert changed[:, 0].min() == 7 and changed[:, 0].max() == 20
    assert changed[:, 1].min() == 14 and changed[:, 1].max() == 20
    assert len(changed) == 14 * 7 and torch.count_nonzero(x) == 0


def test_patch_grid_counts_pixels_for_plain_and_convolutional_stems():
    import timm

    plain = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    hybrid = timm.create_model(  # 7x7/2 conv + 2x max-pool, then 2x2 cells of the 8x8 map
        "vit_tiny_r_s16_p8_224", img_size=32, patch_size=2, embed_dim=32, depth=1, num_heads=2
    )
    assert patch_grid(plain) == (8, 4)
    assert patch_grid(hybrid) == (8, 4)  # its patch_size (2) counts feature cells, not pixels


def test_sampler_targets_are_the_backbones_predictions_on_the_clean_images(tiny_backbone: Backbone):
    pool = TensorPool(torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    episodes = CutMixSampler(tiny_backbone.model, pool, seed=3).sample(5)
    with torch.no_grad():
        assert torch.equal(episodes.targets, tiny_backbone.model(episodes.clean).argmax(-1))
    outside = episodes.mixed == episodes.clean
    patch, _ = patch_grid(tiny_backbone.model)
    for i, (top, left, h, w) in enumerate((episodes.boxes * patch).tolist()):
        outside[i, :, top : top + h, left : left + w] = True
    assert outside.all()  # nothing changed outside the box


def test_sampler_is_reproducible_from_its_seed_and_never_pairs_an_image_with_itself(tiny_backbone):
    pool = TensorPool(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 28, 28).clone())
    a = CutMixSampler(tiny_backbone.model, pool, seed=7).sample(50)
    b = CutMixSampler(tiny_backbone.model, pool, seed=7).sample(50)
    assert torch.equal(a.mixed, b.mixed) and torch.equal(a.boxes, b.boxes)
    assert (a.mixed != a.clean).flatten(1).any(dim=1).all()  # x' always differs from x


def test_folder_pool_reads_unlabeled_images_with_the_backbone_transform(tiny_backbone, tmp_path):
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    pool = FolderPool.from_folder(tmp_path, tiny_backbone.transform)
    assert len(pool) == 3
    assert pool.get(torch.tensor([2, 0])).shape == (2, 1, 28, 28)


def test_a_pool_needs_two_images(tiny_backbone, tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        FolderPool.from_folder(tmp_path, tiny_backbone.transform)
    with pytest.raises(DataError, match="at least 2"):
        CutMixSampler(tiny_backbone.model, TensorPool(torch.zeros(1, 1, 28, 28)))
