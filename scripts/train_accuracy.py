"""Top-1 of a Tiny-ImageNet backbone on its own training images and on val: how much it overfits.

    .venv/bin/python scripts/train_accuracy.py --root tiny-imagenet-200/ [--backbone DIR] [--work W]

``--backbone`` is a folder with ``backbone.json`` (default: the shipped one); the training images
are 10,000 drawn (seed 0) from the 400 per class the backbone trained on (``--train-per-class``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.backbones import load_backbone
from models.store.manifest import BackboneManifest
from models.worlds import tiny_imagenet as tin
from models.worlds.training import predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the dataset folder")
    parser.add_argument("--backbone", type=Path, default=tin.ASSETS)
    parser.add_argument(
        "--work", type=Path, default=Path.home() / ".cache/vitedit/worlds/tiny-imagenet"
    )
    parser.add_argument("--train-per-class", type=int, default=tin.TRAIN_PER_CLASS)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = tin.load_cached(args.root, args.work)
    idx = tin.train_indices(data["y_train"], args.train_per_class, 0)
    sub = np.random.default_rng(0).choice(idx, min(args.images, len(idx)), replace=False)
    backbone = load_backbone(BackboneManifest.read(args.backbone / "backbone.json"))
    for name, x, y in (
        (f"train ({len(sub)} of {len(idx)})", data["x_train"][sub], data["y_train"][sub]),
        ("val", data["x_val"], data["y_val"]),
    ):
        logits = predict_logits(backbone.model, tin.to_input(torch.from_numpy(x)))
        print(f"{name}: top-1 {(logits.argmax(1).numpy() == y).mean():.4f}")


if __name__ == "__main__":
    main()
