"""Can a first-order estimate of spill on clean images make saliency's mask more local? (Q29)

Registers ``saliency-spill``, a mask for the benchmark only: the top ``rho`` of neuron entries
ranked by first-order edit-loss descent per first-order margin loss on clean anchors,
``|g_i|_1 / (S_i + mean S)`` (``models/spill.py`` defines both terms). The anchors are the
``--anchors`` lowest-margin images (top-1 minus top-2 probability, the meta-trainer's rule) of
the world's CutMix pool: train images of the backbone, none of them in the locality set. It also
registers ``where2edit-spill``: the top ``rho`` of ``mix`` x the hypernetwork's rank + (1 - ``mix``)
x that ranking's (``where2edit-sal``'s rule with saliency-spill in saliency's place). It then
runs ``vitedit bench`` with the remaining arguments, so ``saliency-spill`` gets the harness, the
seeds and the intervals of every other method:

    .venv/bin/python scripts/spill_saliency.py --anchors 64 bench --world tiny-imagenet \\
        --split tuning --methods saliency-spill,saliency --edits-per-group 1 --out OUT

Not in the paper, and not a product method: the service has no clean images of a user's
backbone to read anchors from. It asks whether what the benchmark's locality set loses is
predictable from the edit's gradient and clean images at all (docs/worlds.md, Q29).
"""

from __future__ import annotations

import argparse
import sys

import torch

from cli.main import main as vitedit
from cli.main import one_line_errors
from models.editing.optimize import masked_finetune
from models.editing.registry import EditOutcome, EditTask, StepCallback, register
from models.editing.saliency import SaliencyConfig, edit_gradients
from models.editing.where2edit_saliency import Where2EditSaliencyConfig, hybrid_masks
from models.sites import top_rho_mask
from models.spill import (
    MAX_ANCHORS,
    CleanAnchors,
    SpillReference,
    SpillReferences,
    spill_ranking,
)

METHOD = "saliency-spill"
MIX = "where2edit-spill"


def register_methods(anchors: CleanAnchors) -> None:
    """Register ``saliency-spill`` and ``where2edit-spill`` on ``anchors`` (once per process).
    The anchors' margin gradients are taken at the first edit, on the bench's own model and
    sites, and kept."""
    references = SpillReferences(anchors.images)

    def reference(task: EditTask) -> SpillReference:
        return references.at(task.model, task.sites)

    @register(
        METHOD,
        SaliencyConfig,
        description="masked fine-tuning of the neurons with the most edit-loss descent per "
        "first-order margin loss on clean anchors (a benchmark probe, scripts/spill_saliency.py)",
    )
    def saliency_spill(
        task: EditTask, config: SaliencyConfig, on_step: StepCallback | None = None
    ) -> EditOutcome:
        scores = spill_ranking(edit_gradients(task), reference(task), task.sites)
        masks = task.sites.split(top_rho_mask(scores, config.rho))
        return masked_finetune(task, config, masks=masks, on_step=on_step)

    @register(
        MIX,
        Where2EditSaliencyConfig,
        needs_hypernetwork=True,
        description="masked fine-tuning of the neurons ranked by a mix of the hypernetwork's "
        "scores and saliency-spill's (a benchmark probe, scripts/spill_saliency.py)",
    )
    def where2edit_spill(
        task: EditTask, config: Where2EditSaliencyConfig, on_step: StepCallback | None = None
    ) -> EditOutcome:
        def spill(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return spill_ranking(grads, reference(task), task.sites)

        masks = hybrid_masks(task, config.rho, config.mix, spill)
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
    register_methods(CleanAnchors.lowest_margin(backbone.model, pool, args.anchors))
    return vitedit(["bench", "--world", args.world, *rest])


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
