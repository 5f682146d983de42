"""The CLI's tests run against the API fixtures of tests/service (a real redis-server and worker)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.redis_server import redis_url  # noqa: F401  (fixture)
from tests.service.conftest import served  # noqa: F401  (fixture)


@dataclass
class UserFiles:
    """A backbone handed over as a user would: manifest, paper-layout benchmark, images."""

    manifest: Path
    groups: Path
    locality: Path
    images: Path


@pytest.fixture
def demo_as_user(tmp_path: Path) -> UserFiles:
    """The demo ViT copied to a folder, its benchmark exported, 32 unlabeled pool images."""
    from models.worlds import demo

    folder = tmp_path / "my-vit"
    folder.mkdir()
    for name in ("backbone.json", "backbone.safetensors"):
        shutil.copy(demo.ASSETS / name, folder / name)
    world = demo.load_world()
    demo.export_world(world, tmp_path / "bench")
    images = tmp_path / "images"
    images.mkdir()
    for i, array in enumerate(world.pool[:32]):
        Image.fromarray(array).save(images / f"{i:03d}.png")
    bench = tmp_path / "bench"
    return UserFiles(folder / "backbone.json", bench / "edit_groups", bench / "locality", images)
