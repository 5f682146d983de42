"""One registered model, loaded once per worker and kept warm: backbone, sites, hypernetwork,
the prefix tokens of its benchmark; and the check that its shared weights are still the base's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.backbones import Backbone, load_backbone
from models.errors import IntegrityError
from models.evaluation import predictions
from models.forward import SplitForward
from models.reports import TokenSet
from models.review import thumbnail
from models.sites import Sites
from models.store.manifest import ModelEntry

log = logging.getLogger(__name__)

MAX_BENCHMARK_HOLDOUT = 512  # benchmark images used for GR when the request brings none


def pixel_key(image: Image.Image) -> str:
    """Identity of an image's pixels: finds a benchmark image that a user submits for editing."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BenchmarkGroup:
    """One registered benchmark group, ready for GR: label, prefix tokens, pixel keys."""

    label: int
    tokens: torch.Tensor  # (N, T, D)
    keys: tuple[str, ...]  # pixel_key of each image
    thumbs: tuple[Image.Image, ...] = ()  # for the review figures (models.review.thumbnail)


@dataclass
class LoadedModel:
    """One registered model, loaded once per worker and shared by all its jobs."""

    entry: ModelEntry
    backbone: Backbone
    sites: Sites
    split: SplitForward
    hypernetwork: Any
    base_weights: list[torch.Tensor]  # the site matrices of the base backbone
    locality: TokenSet | None
    locality_root_preds: torch.Tensor | None
    groups: list[BenchmarkGroup]

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """Prefix tokens (N, T, D) of PIL images, preprocessed in batches of the split's size."""
        batch = self.split.batch_size
        chunks = [
            self.split.prefix(self.backbone.preprocess(images[i : i + batch]))
            for i in range(0, len(images), batch)
        ]
        return torch.cat(chunks)


@dataclass(frozen=True)
class Unloadable:
    """A model that failed to load: the registry entry tried, why, and when (monotonic)."""

    entry: ModelEntry
    reason: str
    at: float


def restore_base(loaded: LoadedModel) -> bool:
    """Check the warm model's site weights against the base copy; restore them if they differ.

    Every job leaves the sites as it found them (try/finally); this catches what slipped through
    (a revert cut off by a job timeout) before the next job runs on it. Returns True if restored.
    """
    params = loaded.sites.params(loaded.model)
    changed = [
        m.param
        for m, p, b in zip(loaded.sites.matrices, params, loaded.base_weights, strict=True)
        if not torch.equal(p, b)
    ]
    if not changed:
        return False
    log.error(
        "warm model %s was left modified in %s: restoring its base", loaded.entry.name, changed
    )
    with torch.no_grad():
        for p, b in zip(params, loaded.base_weights, strict=True):
            p.copy_(b)
    return True


def load_model(entry: ModelEntry, device: torch.device, batch_size: int = 256) -> LoadedModel:
    """Backbone (sha256 checked), sites, hypernetwork and benchmark tokens of one model;
    ``batch_size`` images per forward pass of its evaluation and token sets."""
    start = time.perf_counter()
    backbone = load_backbone(entry.backbone_manifest(), device)
    if backbone.weights_sha256 != entry.weights_sha256:
        raise IntegrityError(
            f"backbone of {entry.name} has sha256 "
            f"{backbone.weights_sha256[:16]}..., the registry says "
            f"{entry.weights_sha256[:16]}..."
        )
    hypernetwork = None
    if entry.hypernetwork:
        from models.hypernet.network import Hypernetwork, recorded_sites

        hypernetwork = Hypernetwork.load(entry.hypernetwork, backbone)
        sites = recorded_sites(entry.hypernetwork)
    else:
        sites = Sites.for_model(backbone.model, entry.blocks)
    split = SplitForward(backbone.model, sites, batch_size)
    base = [p.detach().clone() for p in sites.params(backbone.model)]
    loaded = LoadedModel(entry, backbone, sites, split, hypernetwork, base, None, None, [])
    _load_benchmark(loaded)
    log.info(
        "model %s ready in %.1f s on %s (sites %s, hypernetwork %s)",
        entry.name,
        time.perf_counter() - start,
        device,
        list(sites.mlps),
        bool(hypernetwork),
    )
    return loaded


def _load_benchmark(loaded: LoadedModel) -> None:
    bench = loaded.entry.benchmark
    if bench.get("kind") == "demo":
        from models.worlds.demo import load_world

        benchmark = load_world().benchmark
    elif bench.get("kind") == "world":
        from models.worlds.catalog import get_world

        benchmark = get_world(bench["world"]).load_world().benchmark
    elif bench.get("kind") == "folders":
        from models.worlds.layout import MAX_SERVED_IMAGES, read_benchmark

        benchmark = read_benchmark(bench["groups"], bench["locality"], MAX_SERVED_IMAGES)
    else:
        return
    loaded.locality = TokenSet(
        loaded.tokens(benchmark.locality), images=[thumbnail(im) for im in benchmark.locality]
    )
    loaded.locality_root_preds = predictions(loaded.split, loaded.locality.tokens).cpu()
    loaded.groups = [
        BenchmarkGroup(
            g.label,
            loaded.tokens(g.images),
            tuple(pixel_key(im) for im in g.images),
            tuple(thumbnail(im) for im in g.images),
        )
        for g in benchmark.groups
    ]


def benchmark_holdout(
    groups: list[BenchmarkGroup], labels: set[int], exclude: set[str]
) -> TokenSet | None:
    """The registered groups of these labels, without the edit images themselves (capped)."""
    tokens, targets, thumbs = [], [], []
    for group in groups:
        if group.label in labels:
            keep = torch.tensor([k not in exclude for k in group.keys], dtype=torch.bool)
            tokens.append(group.tokens[keep.to(group.tokens.device)])
            targets.append(torch.full((int(keep.sum()),), group.label))
            thumbs += [im for im, kept in zip(group.thumbs, keep.tolist(), strict=False) if kept]
    if not tokens or not sum(len(t) for t in tokens):
        return None
    return TokenSet(
        torch.cat(tokens)[:MAX_BENCHMARK_HOLDOUT],
        torch.cat(targets)[:MAX_BENCHMARK_HOLDOUT],
        thumbs[:MAX_BENCHMARK_HOLDOUT],
    )
