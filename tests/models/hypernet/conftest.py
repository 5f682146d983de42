"""Fixtures shared by the meta-training tests."""

from __future__ import annotations

import pytest

from models.hypernet.cutmix import TensorPool


@pytest.fixture(scope="session")
def demo_pool() -> TensorPool:
    """64 images of the demo world's unlabeled CutMix pool, as the backbone's input."""
    from models.worlds.catalog import get_world

    world = get_world("demo")
    return TensorPool(world.to_input(world.load_world().pool[:64]))
