"""How much the meta-training regression can gain by reading a ranking, by how the ranking is fed.

A ``--gradient-input`` or ``--spill-input`` hypernetwork adds ``gate * rank`` to its logits z,
rank in [-1, 1] (models/hypernet/network.py; ``--rank-feature tail`` reads the second feature
below instead, shifted by -1, which the fit's a absorbs, and with q at i / n
rather than (i + 0.5) / n), and the regression fits sigmoid(score_scale * z)
to sigmoid(score_scale * (+1 on the target mask's entries, -1 elsewhere)) by BCE, weighed by
``regression_weight`` (models/hypernet/metatrain.py). With edit targets the target mask is the
top ``edit_rho`` of a ranking; the spill candidate's, for one, is the top of the very ranking a
``--spill-input`` network reads. This fits the best z = a + g * f(q) (q: an entry's quantile in
that ranking) for a few features f, to a batch of targets of which a share ``--share`` are the
ranking's top ``edit_rho`` and the rest the top ``edit_rho`` of one unrelated random ranking,
and prints the weighted BCE each reaches, beside a perfect fit's and a constant guess's. Per
entry the network's logit is linear in the feature it reads, so a feature whose best fit stays
near the constant guess gives the regression almost nothing to pull its gate by. No backbone, no
data: seconds on one thread.

    .venv/bin/python scripts/rank_input_fit.py [--rho 0.02] [--share 1,0.5] [--entries 10000]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from cli.args import numbers
from models.hypernet.metatrain import MetaTrainConfig
from models.hypernet.network import HypernetConfig

FIT_STEPS = 2000
# bounds that keep a run to a few minutes at most (100,000 entries, one share: about 16 s)
MAX_ENTRIES = 100_000
MAX_SHARES = 8


shares_list = numbers("shares")


def features(q: torch.Tensor, rho: float) -> dict[str, torch.Tensor]:
    """What a network could read of an entry at quantile q (0 lowest, 1 highest) of a ranking."""
    return {
        "its rank in [-1, 1] (what the networks read)": 2 * q - 1,
        "-log(1 - q) (a tail that grows at the top)": -torch.log1p(-q),
        f"1 on the ranking's top {rho:g}, else 0": (q > 1 - rho).float(),
    }


def weighted_bce(scores: torch.Tensor, target: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """BCE of (2, n) scores to (2, n) targets, row i weighed by ``share[i]`` (the share of the
    batch's targets that row stands for), averaged over entries."""
    return (share[:, None] * F.binary_cross_entropy(scores, target, reduction="none")).sum(0).mean()


def best_bce(
    feature: torch.Tensor, target: torch.Tensor, share: torch.Tensor, scale: float
) -> tuple[float, float]:
    """The lowest weighted BCE of sigmoid(scale * (a + g * feature)) to ``target``, and that g."""
    a = torch.zeros((), requires_grad=True)
    g = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([a, g], lr=0.05)
    for _ in range(FIT_STEPS):
        loss = weighted_bce(torch.sigmoid(scale * (a + g * feature)), target, share)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss = weighted_bce(torch.sigmoid(scale * (a + g * feature)), target, share)
    return loss.item(), g.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rho", type=float, default=MetaTrainConfig.edit_rho)
    parser.add_argument(
        "--share",
        type=shares_list,
        default=shares_list("1,0.5"),
        help="comma-separated shares of targets that are the read ranking's top rho",
    )
    parser.add_argument("--entries", type=int, default=10000, help="entries per target mask")
    args = parser.parse_args()
    if not 0 < args.rho < 1:
        raise SystemExit(f"--rho {args.rho:g}: give a share of entries in (0, 1)")
    if not all(0 <= s <= 1 for s in args.share) or len(args.share) > MAX_SHARES:
        raise SystemExit(f"--share {args.share}: give 1 to {MAX_SHARES} shares in [0, 1]")
    if not round(args.rho * args.entries) >= 1 or args.entries > MAX_ENTRIES:
        raise SystemExit(f"--entries {args.entries}: give 1/rho to {MAX_ENTRIES:,}")
    scale = HypernetConfig.score_scale
    weight = MetaTrainConfig.regression_weight
    n = args.entries
    q = (torch.arange(n) + 0.5) / n
    top = q > 1 - args.rho
    gen = torch.Generator().manual_seed(0)
    other = torch.zeros(n, dtype=torch.bool)
    other[torch.randperm(n, generator=gen)[: int(top.sum())]] = True  # an unrelated top rho
    print(
        f"targets: the top {args.rho:g} of {n:,} entries, at sigmoid({scale:g} x +-1); "
        f"BCE x {weight:g} (the regression's weight)\n"
    )
    print("| share of targets that are the read ranking's top | fed as | best BCE | its gate |")
    print("|---:|---|---:|---:|")
    masks = torch.stack([top, other]).float()  # the read ranking's top rho; an unrelated one
    target = torch.sigmoid(scale * (2 * masks - 1))
    for share in args.share:
        rows = torch.tensor([share, 1 - share])
        perfect = weighted_bce(target, target, rows).item()
        mean = (rows[:, None] * target).sum(0).mean()  # the best constant: the targets' mean
        constant = weighted_bce(mean.expand_as(target), target, rows).item()
        print(f"| {share:g} | a perfect fit | {weight * perfect:.4f} | |")
        print(f"| {share:g} | a constant guess | {weight * constant:.4f} | |")
        for name, f in features(q, args.rho).items():
            bce, g = best_bce(f.expand_as(target), target, rows, scale)
            print(f"| {share:g} | {name} | {weight * bce:.4f} | {g:+.3f} |")


if __name__ == "__main__":
    sys.exit(main())
