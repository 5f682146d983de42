"""The built-in worlds by name: what ``--world NAME`` means to the bench, meta-training and serve.

A world is a backbone trained here, its benchmark file and its hypernetwork, all shipped under
``models/assets/<name>/``. ``demo`` (Fashion-MNIST, 10 classes) is the fast default;
``tiny-imagenet`` (200 ImageNet classes) is shaped like the paper's benchmark and splits its
groups into a tuning and a test half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.backbones import Backbone
from models.errors import DataError
from models.hypernet.network import MANIFEST_FILE, Hypernetwork, recorded_sites
from models.sites import Sites
from models.worlds import demo, tiny_imagenet, tiny_imagenet_benchmark
from models.worlds.layout import EditBenchmark, World


@dataclass(frozen=True)
class BuiltinWorld:
    name: str
    assets: Path
    load_backbone: Callable[[torch.device | str], Backbone]
    load_world: Callable[..., World]
    to_input: Callable[[np.ndarray], torch.Tensor]  # uint8 images -> normalised model input
    report_split: str  # the groups figures are reported on ("all": the world has no halves)
    locality_rules: tuple[str, ...] = ()  # locality sets load_world(locality=...) offers

    def benchmark(self, split: str | None = None, locality: str | None = None) -> EditBenchmark:
        """The benchmark's ``split`` groups (default: the reported half) with its ``locality``
        set (default: the world's own; tiny-imagenet's "reference" set: docs/worlds.md)."""
        if locality is not None and locality not in self.locality_rules:
            has = f"the locality sets {list(self.locality_rules)}" if self.locality_rules else "one"
            raise DataError(f"world {self.name!r} has no locality set {locality!r}; it has {has}")
        world = self.load_world(**({"locality": locality} if locality else {}))
        return world.benchmark.select(split or self.report_split)

    @property
    def hypernet_dir(self) -> Path:
        return self.assets / "hypernet"

    @property
    def available(self) -> bool:
        return (self.assets / "backbone.json").is_file() and (self.assets / "world.json").is_file()


WORLDS: dict[str, BuiltinWorld] = {
    "demo": BuiltinWorld(
        "demo", demo.ASSETS, demo.load_demo_backbone, demo.load_world, demo.normalise, "all"
    ),
    "tiny-imagenet": BuiltinWorld(
        "tiny-imagenet",
        tiny_imagenet.ASSETS,
        tiny_imagenet.load_tiny_imagenet_backbone,
        tiny_imagenet_benchmark.load_world,
        lambda x: tiny_imagenet.to_input(torch.from_numpy(x)),
        "test",
        tiny_imagenet_benchmark.LOCALITY_RULES,
    ),
}


def get_world(name: str) -> BuiltinWorld:
    if name not in WORLDS:
        raise DataError(f"unknown world {name!r}; built-in worlds: {sorted(WORLDS)}")
    world = WORLDS[name]
    if not world.available:
        raise DataError(
            f"world {name!r} is not built: {world.assets} lacks backbone.json or world.json; "
            f"build it with 'vitedit world build {name}'"
        )
    return world


def open_world(
    name: str,
    split: str | None = None,
    hypernet_dir: Path | None = None,
    locality: str | None = None,
) -> tuple[Backbone, EditBenchmark, Hypernetwork | None, Sites]:
    """(backbone, the benchmark's ``split`` groups with its ``locality`` set, hypernetwork or
    None, the sites to edit) for the probe scripts: the hypernetwork's sites when there is one,
    else the default sites."""
    world = get_world(name)
    backbone = world.load_backbone("cpu")
    benchmark = world.benchmark(split, locality)
    directory = hypernet_dir or world.hypernet_dir
    if not (directory / MANIFEST_FILE).is_file():
        return backbone, benchmark, None, Sites.for_model(backbone.model)
    hypernet = Hypernetwork.load(directory, backbone)
    return backbone, benchmark, hypernet, recorded_sites(directory)
