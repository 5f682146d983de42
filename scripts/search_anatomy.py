"""What sets the searched masks the hypernetwork regresses onto: the episode, or the random start?

Meta-training (docs/method.md section 3) starts each episode's mask search from fresh logits
s0 ~ U(-1, 1) and takes ``outer_steps`` of RMSprop on them; the hypernetwork then regresses onto
sigmoid(3 s). This probe runs the search twice on the same episodes from two independent starts
and prints, at the densities the edit reads (its top rho) and at the search's own (s > 0):

- how alike the two searches' masks of the same episode are (IoU), against two episodes' masks
  of the same search: a target the start decides is noise to the regression;
- the rank correlation of the final logits with the start s0 and with the episode's own
  per-neuron gradient norm at W0 (KL saliency, what the first outer step reads);
- how binary the regression targets are (share of sigmoid(3 s) below 0.05 or above 0.95).

    .venv/bin/python scripts/search_anatomy.py --world tiny-imagenet --failures F.npz \
        [--sparsity 1] [--batches 25] [--outer-optimiser rmsprop]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from cli.main import one_line_errors
from models.forward import SplitForward
from models.hypernet.episodes import BatchedEpisodes
from models.hypernet.failures import FailureSampler, FailureSet
from models.hypernet.metatrain import MetaTrainConfig, jaccard, search_masks
from models.sites import Sites, top_rho_mask
from models.worlds.catalog import get_world

RHOS = (0.1, 0.01)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (B, n) as floats (ties broken by position; the scores here are continuous)."""
    return x.argsort(dim=1).argsort(dim=1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the rank correlation of two (B, n) tensors."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean().item()


def iou_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean IoU of matching rows of two (B, n) boolean masks."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float().clamp(min=1)
    return (inter / union).mean().item()


def top(x: torch.Tensor, rho: float) -> torch.Tensor:
    return torch.stack([top_rho_mask(row, rho) for row in x])


def kl_saliency(batch: BatchedEpisodes, sites: Sites) -> torch.Tensor:
    """(B, n_entries) per-neuron norm of each episode's loss gradient at W0 (Sites order)."""
    grads = batch.grads(batch.zeros())
    pairs = zip(grads, sites.matrices, strict=True)
    return torch.cat([g.dense().norm(dim=2 - m.dim) for g, m in pairs], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="tiny-imagenet", choices=["demo", "tiny-imagenet"])
    parser.add_argument("--failures", type=Path, required=True, help="vitedit hypernet failures")
    parser.add_argument("--sparsity", type=float, default=1.0)
    parser.add_argument("--inner-lr", type=float, default=3e-4)
    parser.add_argument("--inner-optimiser", default="rmsprop")
    parser.add_argument("--inner-steps", type=int, default=5, help="K")
    parser.add_argument("--outer-optimiser", default="rmsprop")
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--search-start", default="uniform", choices=["uniform", "zero"])
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batches < 1:
        raise SystemExit(f"error: --batches must be at least 1, got {args.batches}")
    try:  # a bad setting is refused before any work
        cfg = MetaTrainConfig(
            sparsity=args.sparsity,
            inner_lr=args.inner_lr,
            inner_optimiser=args.inner_optimiser,
            inner_steps=args.inner_steps,
            outer_optimiser=args.outer_optimiser,
            outer_lr=args.outer_lr,
            search_start=args.search_start,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    torch.set_num_threads(1)
    world = get_world(args.world)
    backbone = world.load_backbone("cpu")
    sites = Sites.for_model(backbone.model)
    data = FailureSet.load(args.failures)
    sampler = FailureSampler(
        backbone.model,
        torch.from_numpy(data.images),
        torch.from_numpy(data.labels),
        cfg.temperature,
        seed=args.seed,
        transform=lambda x: world.to_input(x.numpy()),
    )
    split = SplitForward(backbone.model, sites)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for _ in range(args.batches):
        episodes = sampler.sample(cfg.batch)
        batch = BatchedEpisodes(split, sites, episodes, cfg.temperature)
        starts = [torch.rand(cfg.batch, sites.n_entries, generator=gen) * 2 - 1 for _ in "ab"]
        if cfg.search_start == "zero":  # both searches then coincide: their overlaps read 1
            starts = [torch.zeros_like(s0) for s0 in starts]
        s_a, s_b = (search_masks(batch, s0, cfg).s for s0 in starts)
        saliency = kl_saliency(batch, sites)
        add("density (s > 0)", (s_a > 0).float().mean().item())
        add("IoU s > 0: same episode, two starts", iou_rows(s_a > 0, s_b > 0))
        add("IoU s > 0: two episodes, one start", jaccard(s_a > 0))
        for rho in RHOS:
            ta, tb = top(s_a, rho), top(s_b, rho)
            add(f"IoU top {rho:g}: same episode, two starts", iou_rows(ta, tb))
            add(f"IoU top {rho:g}: two episodes, one start", jaccard(ta))
            add(f"IoU top {rho:g}: search vs KL saliency", iou_rows(ta, top(saliency, rho)))
        move_a, move_b = s_a - starts[0], s_b - starts[1]  # what the episode added to the start
        for rho in RHOS:
            ta, tb = top(move_a, rho), top(move_b, rho)
            add(f"IoU top {rho:g} of s - s0: same episode, two starts", iou_rows(ta, tb))
            add(f"IoU top {rho:g} of s - s0: two episodes, one start", jaccard(ta))
        add("rank corr. s - s0, two starts", spearman(move_a, move_b))
        add("rank corr. s - s0 vs KL saliency", spearman(move_a, saliency))
        if cfg.search_start == "uniform":  # a zero start has no order to keep
            add("rank corr. final s vs start s0", spearman(s_a, starts[0]))
        add("99th percentile of abs(s - s0)", move_a.abs().flatten().quantile(0.99).item())
        add("rank corr. final s vs KL saliency", spearman(s_a, saliency))
        add("rank corr. final s, two starts", spearman(s_a, s_b))
        target = torch.sigmoid(3 * s_a)
        add("targets < 0.05 or > 0.95", ((target < 0.05) | (target > 0.95)).float().mean().item())
    shown = (
        "sparsity",
        "inner_lr",
        "inner_optimiser",
        "inner_steps",
        "outer_optimiser",
        "outer_lr",
        "search_start",
    )
    setting = {k: v for k, v in dataclasses.asdict(cfg).items() if k in shown}
    print(json.dumps({**setting, "batches": args.batches}))
    print("| measure | mean over batches |")
    print("|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {sum(values) / len(values):.3f} |")


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
