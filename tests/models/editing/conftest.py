"""Fixtures of the editor tests."""

from __future__ import annotations

import pytest
import torch

from models.backbones import Backbone
from models.editing.registry import EditTask
from models.hypernet.network import HypernetConfig, Hypernetwork, feature_dim
from models.sites import Sites


@pytest.fixture
def task(tiny_backbone: Backbone) -> EditTask:
    """Two images of the tiny ViT, targets that differ from its predictions, and a freshly
    initialised hypernetwork for its default sites."""
    model = tiny_backbone.model
    sites = Sites.for_model(model)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        targets = (model(images).argmax(1) + 3) % 10
    torch.manual_seed(0)
    hypernet = Hypernetwork(HypernetConfig.for_sites(feature_dim(model), sites)).eval()
    return EditTask.build(model, sites, images, targets, hypernetwork=hypernet)
