"""Can a first-order estimate of spill on clean images make saliency's mask more local? (Q29)

``saliency`` ranks neuron entries by the norm of the edit loss's gradient ``g``. The edit's
RMSprop steps start along ``sign(g)`` elementwise, so to first order entry ``i``'s first step
lowers the edit loss by ``|g_i|_1`` and moves a clean image ``a``'s top-1 minus top-2 logit margin
by ``-<h_ai, sign g_i>`` (``h_a``: the margin's gradient at the unedited weights). This script
registers ``saliency-spill``, a mask for the benchmark only, whose ranking of the entries is

    |g_i|_1 / (S_i + mean S),   S_i = mean over anchors a of relu(<h_ai, sign g_i>) / margin_a

on the ``--anchors`` lowest-margin images (top-1 minus top-2 probability, as the meta-trainer's
anchors) of the world's CutMix pool: train images of the backbone, none of them in the locality
set. An entry that lowers no anchor's margin keeps its place in the L1 fix ranking; one that
lowers them as much as the mean entry has its score halved. It then runs ``vitedit bench`` with
the remaining arguments, so ``saliency-spill`` gets the harness, the seeds and the intervals of
every other method:

    .venv/bin/python scripts/spill_saliency.py --anchors 64 bench --world tiny-imagenet \\
        --split tuning --methods saliency-spill,saliency --edits-per-group 1 --out OUT

Not in the paper, and not a product method: the service has no clean images of a user's
backbone to read anchors from. It asks whether what the benchmark's locality set loses is
predictable from the edit's gradient and clean images at all, before a hypernetwork is asked to
learn it (docs/worlds.md, Q29).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from cli.main import main as vitedit
from cli.main import one_line_errors
from models.editing.optimize import frozen, masked_finetune, site_logits
from models.editing.registry import EditOutcome, EditTask, StepCallback, register
from models.editing.saliency import SaliencyConfig, edit_gradients
from models.sites import top_rho_mask

METHOD = "saliency-spill"
MAX_ANCHORS = 4096


@dataclasses.dataclass(frozen=True)
class CleanAnchors:
    """Clean images an edit should leave alone, with the classes of their margin."""

    images: torch.Tensor  # (A, C, H, W) model input
    top: torch.Tensor  # (A,) the backbone's top-1 class
    second: torch.Tensor  # (A,) its top-2 class
    margin: torch.Tensor  # (A,) top-1 minus top-2 logit, > 0

    @classmethod
    def lowest_margin(cls, model: torch.nn.Module, images: torch.Tensor, n: int) -> CleanAnchors:
        """The ``n`` of ``images`` with the smallest top-1 minus top-2 probability."""
        with torch.no_grad():
            logits = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
        top2 = logits.softmax(dim=-1).topk(2, dim=-1)
        keep = (top2.values[:, 0] - top2.values[:, 1]).argsort()[:n]
        top, second = top2.indices[keep, 0], top2.indices[keep, 1]
        rows = torch.arange(len(keep))
        margin = logits[keep][rows, top] - logits[keep][rows, second]
        return cls(images[keep], top, second, margin.clamp_min(1e-6))


def fix_and_spill(task: EditTask, anchors: CleanAnchors) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_entries,) twice: each entry's first-order fix ``|g_i|_1`` and spill ``S_i``."""
    grads = edit_gradients(task)
    mats = task.sites.matrices
    direction = [g.sign() for g in grads]
    fix = torch.cat([g.abs().sum(dim=1 - m.dim) for g, m in zip(grads, mats, strict=True)])
    device = task.tokens.device
    tokens = task.split.prefix(anchors.images.to(device))
    top, second = anchors.top.to(device), anchors.second.to(device)
    margin = anchors.margin.to(device)
    weights = [p.detach().clone().requires_grad_() for p in task.sites.params(task.model)]
    spill = torch.zeros_like(fix)
    with frozen(task.model), torch.enable_grad():
        for a in range(len(tokens)):  # one forward and backward per anchor: its margin's gradient
            logits = site_logits(dataclasses.replace(task, tokens=tokens[a : a + 1]))(weights)[0]
            h = torch.autograd.grad(logits[top[a]] - logits[second[a]], weights)
            pairs = zip(h, direction, mats, strict=True)
            dots = torch.cat([(ha * d).sum(dim=1 - m.dim) for ha, d, m in pairs])
            spill += dots.clamp_min(0.0) / margin[a]
    return fix, spill / len(tokens)


def spill_scores(fix: torch.Tensor, spill: torch.Tensor) -> torch.Tensor:
    """The ranking: fix per spill, the spill offset by its mean (no spill = the fix ranking)."""
    return fix / (spill + spill.mean().clamp_min(1e-12))


def register_method(anchors: CleanAnchors) -> None:
    """Register ``saliency-spill`` on ``anchors`` (once per process)."""

    @register(
        METHOD,
        SaliencyConfig,
        description="masked fine-tuning of the neurons with the most edit-loss descent per "
        "first-order margin loss on clean anchors (a benchmark probe, scripts/spill_saliency.py)",
    )
    def saliency_spill(
        task: EditTask, config: SaliencyConfig, on_step: StepCallback | None = None
    ) -> EditOutcome:
        scores = spill_scores(*fix_and_spill(task, anchors))
        masks = task.sites.split(top_rho_mask(scores, config.rho))
        return masked_finetune(task, config, masks=masks, on_step=on_step)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="spill_saliency.py [--anchors N] bench --world NAME [vitedit bench options]",
    )
    parser.add_argument("--anchors", type=int, default=64, help="clean anchors (default 64)")
    parser.add_argument("command", choices=["bench"])
    parser.add_argument("--world", required=True, choices=["demo", "tiny-imagenet"])
    args, rest = parser.parse_known_args()
    if not 1 <= args.anchors <= MAX_ANCHORS:
        raise SystemExit(f"--anchors {args.anchors}: give 1 to {MAX_ANCHORS}")
    from models.worlds.catalog import get_world

    torch.set_num_threads(1)  # the bench's own setting on a CPU; it sets its own again
    world = get_world(args.world)
    backbone = world.load_backbone("cpu")
    pool = world.to_input(world.load_world().pool)
    if args.anchors > len(pool):
        raise SystemExit(f"--anchors {args.anchors}: the pool holds only {len(pool)} images")
    register_method(CleanAnchors.lowest_margin(backbone.model, pool, args.anchors))
    return vitedit(["bench", "--world", args.world, *rest])


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
