"""Does the hypernetwork read the failure? How much its masks change from one edit image to
another, against the gradient-saliency masks of the same images.

For every image of every group (a world's report split by default), the top-``rho`` mask of
``where2edit`` (the hypernetwork's scores for that image alone) and of ``saliency`` (per-neuron
gradient norms of that image's CE to its group's label). Prints, per kind, the mean IoU of two
masks of the same group, of two different groups, and the share of entries every mask holds;
then the IoU of the two kinds' masks on the same image, and the rank correlation of the
hypernetwork's scores with the image's gradient norms (for a ``--gradient-input`` or
``--spill-input`` network, also how much each input's part of its logits weighs against the
heads', and how far it lifts the logits of that input's own top ``rho``). A hypernetwork whose
masks are nearly the same for every failure ranks neurons once for all (a static mask), whatever
image it is shown. ``--against DIR`` (repeatable): the IoU of its masks with another
hypernetwork's of the same backbone on the same images (how far two meta-training runs ended
apart); a ``--spill-input`` network's masks are also compared with the top ``rho`` of the spill
ranking it reads (``saliency-spill``'s mask on its anchors).

    .venv/bin/python scripts/mask_diversity.py --world tiny-imagenet [--hypernet DIR] [--rho 0.1] \
        [--against DIR ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cli.bench import add_world_arguments, open_probe_world
from cli.main import one_line_errors
from models.editing.registry import EditTask
from models.editing.saliency import edit_gradients, entry_norms
from models.editing.where2edit import learned_inputs, learned_scores
from models.forward import SplitForward
from models.hypernet.metatrain import rank_correlation
from models.hypernet.network import Hypernetwork, cls_features, target_features
from models.sites import top_rho_mask


def pairwise_iou(masks: torch.Tensor, groups: torch.Tensor) -> tuple[float, float]:
    """Mean IoU over pairs of (N, E) boolean masks: (same group, different groups)."""
    m = masks.float()
    inter = m @ m.T
    union = m.sum(1, keepdim=True) + m.sum(1) - inter
    iou = inter / union.clamp(min=1)
    same = groups[:, None] == groups[None, :]
    off_diagonal = ~torch.eye(len(m), dtype=torch.bool)
    return iou[same & off_diagonal].mean().item(), iou[~same].mean().item()


def same_image_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the IoU of two (N, E) boolean masks, row by row."""
    a, b = a.float(), b.float()
    return ((a * b).sum(1) / ((a + b) > 0).float().sum(1).clamp(min=1)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        help="another hypernetwork folder of the same backbone and sites (repeatable)",
    )
    add_world_arguments(parser, "tiny-imagenet")
    args = parser.parse_args()
    backbone, bench, hypernet, sites = open_probe_world(args)
    others = [Hypernetwork.load(d, backbone, sites) for d in args.against]
    split = SplitForward(backbone.model, sites)
    masks: dict[str, list[torch.Tensor]] = {"where2edit": [], "saliency": []}
    theirs: list[list[torch.Tensor]] = [[] for _ in others]
    spill_masks: list[torch.Tensor] = []
    group_of, follows = [], []
    weight: dict[str, list[float]] = {}
    lift: dict[str, list[float]] = {}  # each input's term on its ranking's top rho, over its mean
    heads_std: list[float] = []
    for gi, group in enumerate(bench.groups):
        images = backbone.preprocess(group.images)
        tokens = split.prefix(images)
        for i in range(len(images)):
            x = images[i : i + 1]
            task = EditTask(
                backbone.model, sites, split, x, torch.tensor([group.label]), tokens[i : i + 1]
            )
            grads = edit_gradients(task)
            norms = entry_norms(grads, sites)
            gradient, spill = learned_inputs(hypernet, task, grads)  # read once, used twice
            scores = hypernet.mask_scores(backbone.model, x, task.targets, gradient, spill)
            masks["where2edit"].append(top_rho_mask(scores, args.rho))
            masks["saliency"].append(top_rho_mask(norms, args.rho))
            if spill is not None:
                spill_masks.append(top_rho_mask(spill, args.rho))
            for other, kept in zip(others, theirs, strict=True):
                kept.append(top_rho_mask(learned_scores(other, task, grads), args.rho))
            follows.append(rank_correlation(scores[None], norms[None]))
            with torch.no_grad():  # how much each input's part weighs against the heads'
                terms = hypernet.logit_terms(
                    cls_features(backbone.model, x),
                    target_features(backbone.model, task.targets),
                    None if gradient is None else gradient[None],
                    None if spill is None else spill[None],
                )
            head = terms.pop("heads")
            heads_std.append(head.std().item())
            read = {"gradient": gradient, "spill": spill}  # the ranking behind each term
            for name, term in terms.items():
                weight.setdefault(name, []).append((term.std() / head.std()).item())
                top = top_rho_mask(read[name], args.rho)
                lift.setdefault(name, []).append((term[0, top].mean() - term.mean()).item())
            group_of.append(gi)
    groups = torch.tensor(group_of)
    print(f"{len(bench.groups)} groups, {len(groups)} images, rho {args.rho}\n")
    print("| mask | IoU same group | IoU other groups | entries in every mask | in none |")
    print("|---|---:|---:|---:|---:|")
    stacked = {k: torch.stack(v) for k, v in masks.items()}
    for kind, m in stacked.items():
        same, other = pairwise_iou(m, groups)
        every = m.all(0).float().mean().item() / args.rho
        none = (~m.any(0)).float().mean().item()
        print(f"| {kind} | {same:.3f} | {other:.3f} | {every:.1%} of a mask | {none:.1%} |")
    mine = stacked["where2edit"]
    iou = same_image_iou(mine, stacked["saliency"])
    print(f"\nwhere2edit vs saliency on the same image: mean IoU {iou:.3f}")
    if spill_masks:
        iou = same_image_iou(mine, torch.stack(spill_masks))
        print(f"where2edit vs the spill ranking it reads on the same image: mean IoU {iou:.3f}")
    for path, kept in zip(args.against, theirs, strict=True):
        iou = same_image_iou(mine, torch.stack(kept))
        print(f"where2edit vs {path} on the same image: mean IoU {iou:.3f}")
    print(
        "rank correlation of where2edit's scores with the image's gradient norms (saliency's): "
        f"mean {sum(follows) / len(follows):.3f}"
    )
    for name, shares in weight.items():  # a --gradient-input or --spill-input network
        print(
            f"the {name} input's part of its logits (gate x rank), std over entries as a share "
            f"of the heads' part: mean {sum(shares) / len(shares):.3f}"
        )
    for name, lifts in lift.items():
        print(
            f"the {name} input lifts the logits of its ranking's top {args.rho:g} by "
            f"{sum(lifts) / len(lifts):+.3f} over their mean (the heads' part: std "
            f"{sum(heads_std) / len(heads_std):.3f}; the regression's targets sit at z = +-1)"
        )


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
