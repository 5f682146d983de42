"""Can a first-order estimate of spill on clean images make saliency's mask more local? (Q29)

Registers ``saliency-spill``, a mask for the benchmark only: the top ``rho`` of neuron entries
ranked by first-order edit-loss descent per first-order margin loss on clean anchors,
``|g_i|_1 / (S_i + mean S)`` (``models/spill.py`` defines both terms). The anchors are the
``--anchors`` lowest-margin images (top-1 minus top-2 probability, the meta-trainer's rule) of
the world's CutMix pool: train images of the backbone, none of them in the locality set. It then
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
from models.sites import top_rho_mask
from models.spill import (
    MAX_ANCHORS,
    CleanAnchors,
    SpillReference,
    entry_fix,
    entry_spill,
    spill_scores,
)

METHOD = "saliency-spill"


def fix_and_spill(task: EditTask, reference: SpillReference) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_entries,) twice: each entry's first-order fix ``|g_i|_1`` and spill ``S_i``."""
    grads = edit_gradients(task)
    return entry_fix(grads, task.sites), entry_spill(grads, reference, task.sites)


def register_method(anchors: CleanAnchors) -> None:
    """Register ``saliency-spill`` on ``anchors`` (once per process). The anchors' margin
    gradients are taken at the first edit, on the bench's own model and sites, and kept."""
    references: dict[tuple[int, tuple[str, ...]], SpillReference] = {}

    @register(
        METHOD,
        SaliencyConfig,
        description="masked fine-tuning of the neurons with the most edit-loss descent per "
        "first-order margin loss on clean anchors (a benchmark probe, scripts/spill_saliency.py)",
    )
    def saliency_spill(
        task: EditTask, config: SaliencyConfig, on_step: StepCallback | None = None
    ) -> EditOutcome:
        key = (id(task.model), task.sites.mlps)
        if key not in references:
            references[key] = SpillReference.at(task.model, task.sites, anchors)
        scores = spill_scores(*fix_and_spill(task, references[key]))
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
