"""The demo world: a small ViT trained here on Fashion-MNIST, and a benchmark derived from it.

It mirrors the paper's benchmark on a machine with no GPU, no hub and no ImageNet:
- natural groups: clean test images the backbone gets wrong, grouped by (true, predicted) class;
- shift groups: test images under style/lighting shifts never seen in training, failures only,
  grouped by (true class, shift);
- a sensitive locality set: correctly classified images whose top-1 minus top-2 probability gap
  is smallest (all below 0.05, topped up with the nearest ones up to ``locality_size``);
- a held-out test set, and a pool of unlabeled train images for CutMix meta-training.

Everything is regenerated from the seed by ``vitedit demo train`` then ``vitedit demo derive``.
"""

from __future__ import annotations

import gzip
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.backbones import Backbone, create_model, load_backbone
from models.errors import DataError
from models.store.manifest import BackboneManifest, sha256_file, write_json_atomic
from models.worlds.layout import (
    EditBenchmark,
    EditGroup,
    World,
    read_world_arrays,
    split_groups,
    to_pil,
)
from models.worlds.shifts import SHIFTS, apply_shift
from models.worlds.training import TrainConfig, predict_logits

log = logging.getLogger(__name__)

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

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
BACKBONE_MANIFEST = ASSETS / "backbone.json"
WORLD_FILE = ASSETS / "world.npz"
WORLD_MANIFEST = ASSETS / "world.json"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train statistics

LICENCE = (
    "Images derived from Fashion-MNIST (Zalando Research, https://github.com/zalandoresearch/"
    "fashion-mnist), distributed under the MIT licence: Copyright (c) 2017 Zalando SE. "
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and associated documentation files, to deal in the Software without restriction, subject to "
    "the copyright notice and this permission notice being included in all copies. THE SOFTWARE IS "
    "PROVIDED 'AS IS', WITHOUT WARRANTY OF ANY KIND."
)


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


def demo_manifest(
    weights: str | None = "backbone.safetensors", sha: str | None = None
) -> BackboneManifest:
    """The demo backbone: a timm VisionTransformer, 28 px grey input, patch 7 (17 tokens), depth 8."""
    return BackboneManifest(
        name="demo-vit",
        timm_name="vit_small_patch16_224",
        overrides=dict(
            img_size=28,
            patch_size=7,
            in_chans=1,
            embed_dim=128,
            depth=8,
            num_heads=4,
            mlp_ratio=4.0,
            num_classes=10,
        ),
        pretrained_cfg_overlay=dict(
            input_size=(1, 28, 28), mean=(MEAN,), std=(STD,), crop_pct=1.0, interpolation="bilinear"
        ),
        weights=weights,
        weights_sha256=sha,
        class_names=FASHION_MNIST_CLASSES,
        base_dir=str(ASSETS),
    )


def load_demo_backbone(device: torch.device | str = "cpu") -> Backbone:
    return load_backbone(BackboneManifest.read(BACKBONE_MANIFEST), device)


def normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), the backbone's eval normalisation."""
    return ((torch.tensor(x).float() / 255.0 - MEAN) / STD).unsqueeze(1)


# --------------------------------------------------------------------------- training


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random crop with 2 px padding; nothing photometric (shifts stay unseen)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=float(-MEAN / STD))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[..., dy : dy + 28, dx : dx + 28]


def train_backbone(
    cfg: TrainConfig, out_dir: Path = ASSETS, progress: Callable[[str], None] = log.info
) -> dict[str, float]:
    """Train the demo backbone from scratch on the Fashion-MNIST train split; write weights + manifest."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = read_fashion_mnist("train")
    x_test, y_test = read_fashion_mnist("t10k")
    xt, yt = normalise(x_train), torch.from_numpy(y_train)
    xv, yv = normalise(x_test), torch.from_numpy(y_test)
    model = create_model(demo_manifest(weights=None))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(xt) // cfg.batch_size
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    start, step = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(
                model(_augment(xt[idx], gen)), yt[idx], label_smoothing=cfg.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = (predict_logits(model, xv).argmax(1) == yv).float().mean().item()
        progress(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.3f}, test acc {acc:.4f}, "
            f"{time.perf_counter() - start:.0f} s"
        )
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(weights),
        metadata={"trained_on": "fashion-mnist train", "seed": str(cfg.seed)},
    )
    manifest = demo_manifest(sha=sha256_file(weights))
    extra = {"train_config": cfg.__dict__, "train_seconds": round(seconds, 1), "test_accuracy": acc}
    BackboneManifest(**{**manifest.__dict__, "extra": extra}).write(out_dir / "backbone.json")
    return {"test_accuracy": acc, "train_seconds": seconds}


# --------------------------------------------------------------------------- deriving the benchmark


@dataclass(frozen=True)
class DeriveConfig:
    seed: int = 0
    min_group: int = 10
    max_group: int = 30
    natural_groups: int = 8
    shift_groups_per_shift: int = 2
    locality_size: int = 500
    locality_gap: float = 0.05
    heldout_size: int = 2000
    pool_size: int = 6000


def _probs(backbone: Backbone, x: np.ndarray) -> torch.Tensor:
    return predict_logits(backbone.model, normalise(x).to(backbone.device)).softmax(-1).cpu()


def _groups_from_failures(
    y: np.ndarray,
    pred: np.ndarray,
    tag_of: Callable[[int], str],
    keep: int,
    cfg: DeriveConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Indices of failures grouped by (true label, tag); the ``keep`` largest with >= min_group."""
    wrong = np.flatnonzero(pred != y)
    buckets: dict[str, list[int]] = {}
    for i in wrong:
        buckets.setdefault(f"{y[i]}-{tag_of(int(i))}", []).append(int(i))
    big = sorted(
        (k for k, v in buckets.items() if len(v) >= cfg.min_group),
        key=lambda k: (-len(buckets[k]), k),
    )[:keep]
    out = {}
    for name in big:
        idx = np.array(buckets[name])
        if len(idx) > cfg.max_group:
            idx = np.sort(rng.choice(idx, cfg.max_group, replace=False))
        out[name] = idx
    return out


def derive_world(
    backbone: Backbone, cfg: DeriveConfig = DeriveConfig(), out: Path = WORLD_FILE
) -> dict:
    """Derive groups, locality, held-out and pool from the trained backbone; write world.npz + json."""
    rng = np.random.default_rng(cfg.seed)
    x_test, y_test = read_fashion_mnist("t10k")
    x_train, _ = read_fashion_mnist("train")
    probs = _probs(backbone, x_test)
    pred = probs.argmax(-1).numpy()
    natural = _groups_from_failures(
        y_test, pred, lambda i: str(pred[i]), cfg.natural_groups, cfg, rng
    )
    groups = {name: x_test[idx] for name, idx in natural.items()}
    shift_acc = {}
    for k, shift in enumerate(SHIFTS):
        xs = apply_shift(shift, x_test, seed=cfg.seed + k)
        ps = _probs(backbone, xs).argmax(-1).numpy()
        shift_acc[shift] = float((ps == y_test).mean())
        shifted = _groups_from_failures(
            y_test, ps, lambda i, s=shift: s, cfg.shift_groups_per_shift, cfg, rng
        )
        groups |= {name: xs[idx] for name, idx in shifted.items()}
    # sensitive locality set: correct clean images with the smallest top-1 minus top-2 gap
    top2 = probs.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).numpy()
    correct = np.flatnonzero(pred == y_test)
    by_gap = correct[np.argsort(gap[correct], kind="stable")]
    n_sensitive = int((gap[correct] < cfg.locality_gap).sum())
    locality_idx = by_gap[: max(cfg.locality_size, n_sensitive)]
    used = np.concatenate([locality_idx, *natural.values()])
    rest = np.setdiff1d(np.arange(len(y_test)), used)
    heldout_idx = np.sort(rng.choice(rest, cfg.heldout_size, replace=False))
    pool_idx = np.sort(rng.choice(len(x_train), cfg.pool_size, replace=False))
    names = sorted(groups)
    arrays = {
        "group_images": np.concatenate([groups[n] for n in names]),
        "group_sizes": np.array([len(groups[n]) for n in names]),
        "group_names": np.array(names),
        "locality": x_test[locality_idx],
        "heldout_images": x_test[heldout_idx],
        "heldout_labels": y_test[heldout_idx],
        "pool": x_train[pool_idx],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    summary = {
        "seed": cfg.seed,
        "config": cfg.__dict__,
        "file": out.name,
        "sha256": sha256_file(out),
        "backbone_sha256": backbone.weights_sha256,
        "licence": LICENCE,
        "test_accuracy": float((pred == y_test).mean()),
        "shift_accuracy": shift_acc,
        "groups": {n: len(groups[n]) for n in names},
        "locality": {
            "size": len(locality_idx),
            "below_gap": n_sensitive,
            "gap": cfg.locality_gap,
            "max_gap_used": float(gap[locality_idx].max()),
        },
        "heldout": len(heldout_idx),
        "pool": len(pool_idx),
    }
    write_json_atomic(out.with_name("world.json"), summary)
    out.with_name("LICENSE-fashion-mnist.txt").write_text(LICENCE + "\n")
    return summary


def load_world(path: Path = WORLD_FILE) -> World:
    """Read the shipped demo benchmark (checks its sha256 against world.json)."""
    arrays = read_world_arrays(path)
    group_arrays = split_groups(arrays)
    groups = [EditGroup(n, int(n.split("-")[0]), to_pil(g)) for n, g in group_arrays.items()]
    return World(
        EditBenchmark(groups, to_pil(arrays["locality"])),
        arrays["heldout_images"],
        arrays["heldout_labels"],
        arrays["pool"],
        group_arrays,
        arrays["locality"],
    )


def export_world(world: World, out_dir: Path) -> None:
    """Write the benchmark in the paper's folder layout (PNG files) plus the licence notice."""
    for group in world.benchmark.groups:
        folder = out_dir / "edit_groups" / group.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(group.images):
            im.save(folder / f"{i:03d}.png")
    loc = out_dir / "locality"
    loc.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.benchmark.locality):
        im.save(loc / f"{i:04d}.png")
    (out_dir / "LICENSE-fashion-mnist.txt").write_text(LICENCE + "\n")
