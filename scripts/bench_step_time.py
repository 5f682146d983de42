"""Time one masked edit step against one full fine-tuning step, side by side (issue 2, item 8).

- masked edit step: the product loop (``masked_finetune``, 10% random mask): the frozen prefix is
  computed once per edit, each step runs the suffix forward + backward + RMSprop on the site
  matrices only;
- full fine-tuning step: forward from the images + backward + RMSprop over every parameter.

Models: the demo backbone (its shipped weights if present, else random init: timing does not depend
on the weights) and a randomly initialised ViT-B/16 (timm ``vit_base_patch16_224``) with blocks
7-9 edited. Times are medians over a few steps after warm-up.

    .venv/bin/python scripts/bench_step_time.py [--batches 1,4] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.editing.optimize import masked_finetune
from models.editing.random_mask import random_masks
from models.editing.registry import EditConfig, EditTask
from models.sites import Sites


def demo_model() -> tuple[str, nn.Module]:
    from models.backbones import create_model
    from models.worlds.demo import BACKBONE_MANIFEST, demo_manifest, load_demo_backbone

    if BACKBONE_MANIFEST.is_file():
        return "demo backbone (8 blocks, d128, 17 tokens), sites 4-6", load_demo_backbone().model
    model = create_model(demo_manifest(weights=None)).eval().requires_grad_(False)
    return "demo backbone, random init (8 blocks, d128), sites 4-6", model


def vit_b_model() -> tuple[str, nn.Module]:
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    model.eval().requires_grad_(False)
    return "ViT-B/16 random init (12 blocks, 197 tokens), sites 7-9", model


def masked_step_seconds(model: nn.Module, images: torch.Tensor, warmup: int, steps: int) -> float:
    """Median step time of the product's masked edit loop (prefix computed once, not timed)."""
    sites = Sites.for_model(model)
    targets = torch.zeros(len(images), dtype=torch.long)
    task = EditTask.build(model, sites, images, targets)
    stamps: list[float] = []
    config = EditConfig(lr=1e-9, max_steps=warmup + steps + 1, stop_loss=0.0)  # never stops early
    masked_finetune(
        task,
        config,
        masks=random_masks(sites, 0.1, seed=0),
        on_step=lambda step, total, loss: stamps.append(time.perf_counter()),
    )
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps[warmup:])


def full_step_seconds(model: nn.Module, images: torch.Tensor, warmup: int, steps: int) -> float:
    """Median step time of full fine-tuning: every parameter trained, full forward every step."""
    model = copy.deepcopy(model).requires_grad_(True)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-9)
    targets = torch.zeros(len(images), dtype=torch.long)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4", help="edit images per step, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of "
        f"{args.steps} steps after {args.warmup} warm-up\n"
    )
    print("| model | images | masked edit step (ms) | full fine-tuning step (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, model in (demo_model(), vit_b_model()):
        size = model.patch_embed.img_size
        for batch in (int(b) for b in args.batches.split(",")):
            images = torch.randn(batch, model.patch_embed.proj.in_channels, *size)
            masked = masked_step_seconds(model, images, args.warmup, args.steps)
            full = full_step_seconds(model, images, args.warmup, args.steps)
            print(
                f"| {label} | {batch} | {1000 * masked:.1f} | {1000 * full:.1f} | "
                f"{masked / full:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
