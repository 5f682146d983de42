"""Where do an edit's locality flips go? A diagnostic of the demo benchmark's LR.

LR counts the sensitive locality images (correct, low top-1 minus top-2 margin) whose top-1
changes. This splits those flips by destination and by margin, per method:

- "to target": the image now predicts the edit's target label y, i.e. it sits on the boundary the
  edit was asked to move (collateral no mask can avoid without also giving up GR);
- "y in top-2": the image's base top-2 already contained y;
- "elsewhere": flips to a class other than y: damage unrelated to the requested fix, which
  is what choosing *where* to edit should reduce.

    .venv/bin/python scripts/locality_probe.py [--edits 4] [--methods ft,random,where2edit,ft-l1]
        [--rho 0.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from cli.bench import add_world_arguments, open_probe_world
from cli.main import one_line_errors
from models.editing.registry import EditTask, get_editor, make_config, run_edit
from models.evaluation import patched_logits
from models.worlds.bench import edit_defaults, evaluation_set, sample_edits

KNOBS = {"ft-l1": {"c": 0.005}}  # the masked methods take --rho instead
MARGINS = (0.05, 0.1, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ft,random,where2edit,ft-l1")
    parser.add_argument("--edits", type=int, default=4, help="edit images per group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rho", type=float, default=0.1, help="the masked methods' density (default 0.1)"
    )
    add_world_arguments(parser)
    args = parser.parse_args()
    make_config("random", rho=args.rho)  # a rho out of (0, 1] is refused before any work
    backbone, bench, hypernet, sites = open_probe_world(args)
    images, evalset = evaluation_set(backbone, sites, bench.groups, bench.locality)
    split = evalset.split
    base = split.logits(evalset.locality_tokens).softmax(-1)
    top2 = base.topk(2, dim=-1)
    margin = (top2.values[:, 0] - top2.values[:, 1]).numpy()
    bucket = np.digitize(margin, MARGINS[:-1])
    print(
        f"locality set: {len(margin)} images; margin < 0.05: {(bucket == 0).sum()}, "
        f"0.05-0.1: {(bucket == 1).sum()}, >= 0.1: {(bucket == 2).sum()}; "
        f"{len(np.unique(top2.indices[:, 0].numpy()))} base classes; "
        f"masked methods at rho {args.rho:g}\n"
    )
    edits = sample_edits([len(x) for x in images], args.edits, args.seed)
    defaults = edit_defaults(backbone)
    print(
        "| method | flipped % | to target % | y in base top-2 % | elsewhere % "
        "| flipped elsewhere, % of the set | flip rate by margin <0.05 / 0.05-0.1 / >=0.1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for method in args.methods.split(","):
        takes_rho = "rho" in {f.name for f in dataclasses.fields(get_editor(method).config_cls)}
        knobs = {"rho": args.rho} if takes_rho else KNOBS.get(method, {})
        config = make_config(method, **defaults, **knobs)
        flips, to_target, in_top2, n = 0, 0, 0, 0
        by_bucket = np.zeros(3)
        for gi, g in enumerate(evalset.groups):
            y_top2 = (top2.indices == g.label).any(-1).numpy()  # base top-2 holds the target
            for i in edits[gi]:
                task = EditTask(
                    backbone.model,
                    sites,
                    split,
                    images[gi][i : i + 1],
                    torch.tensor([g.label]),
                    g.tokens[i : i + 1],
                    hypernet,
                )
                patch = run_edit(method, task, config).patch
                (logits,) = patched_logits(split, patch, [evalset.locality_tokens])
                flipped = (logits.argmax(-1) != evalset.base_locality_preds).numpy()
                flips += flipped.sum()
                to_target += (flipped & (logits.argmax(-1) == g.label).numpy()).sum()
                in_top2 += (flipped & y_top2).sum()
                by_bucket += np.bincount(bucket[flipped], minlength=3)
                n += 1
        total, counts = n * len(margin), np.bincount(bucket, minlength=3) * n
        rates = " / ".join(
            f"{100 * b / c:.1f}" if c else "-" for b, c in zip(by_bucket, counts, strict=True)
        )
        print(
            f"| {method} | {100 * flips / total:.1f} | {100 * to_target / max(flips, 1):.1f} | "
            f"{100 * in_top2 / max(flips, 1):.1f} | "
            f"{100 * (flips - to_target) / max(flips, 1):.1f} | "
            f"{100 * (flips - to_target) / total:.1f} | {rates} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
