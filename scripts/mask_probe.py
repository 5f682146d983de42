"""How good can *any* mask be on the demo world? where2edit against gradient-saliency masks.

Every mask here is fed to the same masked RMSprop edit (the backbone's shared optimiser setting)
at the same ``rho``, and scored like the benchmark (SR / GR / LR on the same sampled edits):

- ``random``: a uniformly random mask (the paper's ablation);
- ``where2edit``: the hypernetwork's scores for the edit image;
- ``saliency``: per-neuron gradient norm of the edit image's CE to its target (fc1 row /
  fc2 column norms; the ``saliency`` editor): a training-free "where", no hypernetwork;
- ``oracle``: the same gradient norms on the *whole group* (its held-out images included), so it
  sees what GR will measure. Not a method (it uses the test images): an upper reference for what
  choosing neurons can buy on this benchmark.

    .venv/bin/python scripts/mask_probe.py [--rhos 0.1,0.05] [--edits 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from cli.args import numbers
from cli.bench import add_world_arguments, open_probe_world
from cli.main import one_line_errors
from models.editing.optimize import masked_finetune
from models.editing.registry import EditTask, make_config, run_edit
from models.editing.saliency import gradient_scores
from models.sites import top_rho_mask
from models.worlds.bench import edit_defaults, edit_seed, evaluation_set, sample_edits

KINDS = ("random", "where2edit", "saliency", "oracle")


def oracle_scores(backbone, sites, split, images, evalset) -> list[torch.Tensor]:
    """Per group: gradient norms of the CE of all its images (held-out ones included) to y."""
    scores = []
    for x, g in zip(images, evalset.groups, strict=True):
        targets = torch.full((len(x),), g.label)
        scores.append(gradient_scores(EditTask(backbone.model, sites, split, x, targets, g.tokens)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rhos", type=numbers("rhos"), default="0.1,0.05")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--edits", type=int, default=4, help="edit images per group")
    parser.add_argument("--seed", type=int, default=0)
    add_world_arguments(parser)
    args = parser.parse_args()
    backbone, bench, hypernet, sites = open_probe_world(args)
    images, evalset = evaluation_set(backbone, sites, bench.groups, bench.locality)
    split = evalset.split
    edits = sample_edits([len(x) for x in images], args.edits, args.seed)
    defaults = edit_defaults(backbone)
    print(f"{len(images)} groups x {args.edits} edits; sites {list(sites.mlps)}; {defaults}\n")
    print("| mask | rho | SR % | GR % | LR % | steps |")
    print("|---|---:|---:|---:|---:|---:|")
    oracle = oracle_scores(backbone, sites, split, images, evalset)
    for rho in args.rhos:
        for kind in args.kinds.split(","):
            method = "random" if kind == "oracle" else kind  # oracle: masks given below
            config = make_config(method, rho=rho, seed=args.seed, **defaults)
            per_group, steps = [], []
            for gi, g in enumerate(evalset.groups):
                x, target = images[gi], torch.tensor([g.label])
                scores = []
                for i in edits[gi]:
                    task = EditTask(
                        backbone.model,
                        sites,
                        split,
                        x[i : i + 1],
                        target,
                        g.tokens[i : i + 1],
                        hypernet,
                    )
                    seeded = dataclasses.replace(config, seed=edit_seed(args.seed, g.name, i))
                    if kind == "oracle":
                        masks = sites.split(top_rho_mask(oracle[gi], rho))
                        outcome = masked_finetune(task, seeded, masks=masks)
                    else:  # the registered editor itself (random: a fresh mask per edit)
                        outcome = run_edit(kind, task, seeded)
                    steps.append(outcome.steps)
                    s = evalset.score(outcome.patch, gi, [i])
                    scores.append((s.sr, s.gr, s.lr))
                per_group.append(np.mean(scores, axis=0))
            sr, gr, lr = 100 * np.mean(per_group, axis=0)
            print(
                f"| {kind} | {rho:g} | {sr:.1f} | {gr:.1f} | {lr:.1f} | {np.mean(steps):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
