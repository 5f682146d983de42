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
from models.data import FASHION_MNIST_CLASSES, EditBenchmark, EditGroup, read_fashion_mnist, to_pil
from models.store.manifest import BackboneManifest, read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets" / "demo"
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


def demo_manifest(weights: str | None = "backbone.safetensors", sha: str | None = None) -> BackboneManifest:
    """The demo backbone: a timm VisionTransformer, 28 px grey input, patch 7 (17 tokens), depth 8."""
    return BackboneManifest(
        name="demo-vit",
        timm_name="vit_small_patch16_224",
        overrides=dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=8,
                       num_heads=4, mlp_ratio=4.0, num_classes=10),
        pretrained_cfg_overlay=dict(input_size=(1, 28, 28), mean=(MEAN,), std=(STD,),
                                    crop_pct=1.0, interpolation="bilinear"),
        weights=weights,
        weights_sha256=sha,
        class_names=FASHION_MNIST_CLASSES,
        base_dir=str(ASSETS),
    )


def load_demo_backbone(device: torch.device | str = "cpu") -> Backbone:
    return load_backbone(BackboneManifest.read(BACKBONE_MANIFEST), device)


def normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), the backbone's eval normalisation."""
    return ((torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0 - MEAN) / STD).unsqueeze(1)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random crop with 2 px padding; nothing photometric (shifts stay unseen)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=float(-MEAN / STD))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[..., dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def train_backbone(cfg: TrainConfig, out_dir: Path = ASSETS,
                   progress: Callable[[str], None] = log.info) -> dict[str, float]:
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
            loss = F.cross_entropy(model(_augment(xt[idx], gen)), yt[idx],
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = (predict_logits(model, xv).argmax(1) == yv).float().mean().item()
        progress(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.3f}, test acc {acc:.4f}, "
                 f"{time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"trained_on": "fashion-mnist train", "seed": str(cfg.seed)})
    manifest = demo_manifest(sha=sha256_file(weights))
    extra = {"train_config": cfg.__dict__, "train_seconds": round(seconds, 1), "test_accuracy": acc}
    BackboneManifest(**{**manifest.__dict__, "extra": extra}).write(out_dir / "backbone.json")
    return {"test_accuracy": acc, "train_seconds": seconds}
