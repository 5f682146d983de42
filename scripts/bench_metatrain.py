"""Meta-training speed: the per-episode reference loop vs the batched loop, side by side.

    .venv/bin/python scripts/bench_metatrain.py [--iterations 3] [--threads 2]

Both loops start from the same seed, so they see the same episodes and initial mask logits; the
script prints episodes/s for each, the speed-up, and the largest relative difference between their
outer losses (the same maths must give the same numbers up to float summation order).
Uses the shipped demo backbone and its CutMix pool when present, else a random-init model of
the same shape on random images (timings are the same; the losses are not meaningful).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from models.backbones import load_backbone
from models.hypernet.cutmix import TensorPool
from models.hypernet.metatrain import MetaTrainConfig, MetaTrainer, build_hypernetwork
from models.sites import Sites
from models.worlds import demo as demo_world


def demo_setup() -> tuple[object, TensorPool, str]:
    if demo_world.BACKBONE_MANIFEST.is_file() and demo_world.WORLD_FILE.is_file():
        pool = TensorPool(demo_world.normalise(demo_world.load_world().pool))
        return demo_world.load_demo_backbone(), pool, "demo backbone, demo CutMix pool"
    torch.manual_seed(0)
    backbone = load_backbone(demo_world.demo_manifest(weights=None))
    pool = TensorPool(torch.randn(512, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    return backbone, pool, "random-init demo-shaped model, random images"


def run(
    impl: str, backbone: object, pool: TensorPool, cfg: MetaTrainConfig, iterations: int
) -> tuple[float, list[float], list[float]]:
    """(episodes/s, outer loss J per iteration, final-step KL per iteration) after one warm-up."""
    sites = Sites.for_model(backbone.model)
    hypernet = build_hypernetwork(backbone.model, sites, cfg.seed)
    trainer = MetaTrainer(backbone, sites, pool, hypernet, cfg, impl=impl)
    trainer.step()  # warm-up (allocations, first-call overheads); same for both loops
    losses, kls = [], []
    start = time.perf_counter()
    for _ in range(iterations):
        log = trainer.step()
        losses.append(log["outer_loss_last"])
        kls.append(log["kl_last"])
    return iterations * cfg.batch / (time.perf_counter() - start), losses, kls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per loop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inner-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, pool, what = demo_setup()
    cfg = MetaTrainConfig(inner_lr=args.inner_lr)
    print(
        f"{what}; B={cfg.batch} S={cfg.outer_steps} K={cfg.inner_steps}, "
        f"{args.iterations} timed iterations, {args.threads} threads",
        flush=True,
    )
    print(f"{'loop':<10} {'episodes/s':>11} {'outer loss J (last step, mean)':>32} {'KL':>10}")
    results = {}
    for impl in ("reference", "batched"):
        results[impl] = speed, losses, kls = run(impl, backbone, pool, cfg, args.iterations)
        loss, kl = sum(losses) / len(losses), sum(kls) / len(kls)
        print(f"{impl:<10} {speed:>11.2f} {loss:>32.6f} {kl:>10.6f}", flush=True)
    ref, fast = results["reference"], results["batched"]
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref[1], fast[1], strict=True))
    print(f"speed-up {fast[0] / ref[0]:.2f}x; largest relative outer-loss difference {rel:.2e}")


if __name__ == "__main__":
    main()
