"""Site sweep: which group of consecutive FFN blocks gives the best GR-vs-LR front on the demo world?

docs/method.md section 1: the paper chose blocks 7-9 of ViT-B by sweeping groups of 3 consecutive FFNs
(middle-to-late blocks gave the best front). Meta-training a hypernetwork per group is the full
sweep; this is the cheap one: it runs mask-free baselines (default: the random mask at rho = 0.1 and
FT-L1 at c = 0.005) on every window of ``--width`` consecutive blocks, with the backbone's shared
optimiser setting, and prints SR / GR / LR per window. A window whose baselines already trade GR
for LR badly will not be rescued by a learned mask.

    .venv/bin/python scripts/site_sweep.py [--width 3] [--edits 4] [--groups 16]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from models.sites import Sites, find_mlps
from models.worlds.bench import BenchConfig, edit_defaults, run_bench
from models.worlds.demo import load_demo_backbone, load_world


def windows(n_blocks: int, width: int) -> list[tuple[int, ...]]:
    """Every run of ``width`` consecutive block indices: (0, 1, 2), (1, 2, 3), ..."""
    return [tuple(range(s, s + width)) for s in range(n_blocks - width + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=3, help="blocks per window")
    parser.add_argument("--methods", default="random,ft-l1")
    parser.add_argument(
        "--knobs", default="random=0.1;ft-l1=0.005", help="one knob value per method (METHOD=V;...)"
    )
    parser.add_argument("--groups", type=int, default=16, help="groups sampled from the benchmark")
    parser.add_argument("--edits", type=int, default=4, help="edit images per group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    methods = tuple(m.strip() for m in args.methods.split(","))
    knobs = {
        m.strip(): (float(v),)
        for m, v in (item.split("=") for item in args.knobs.split(";") if item.strip())
    }
    backbone, benchmark = load_demo_backbone(), load_world().benchmark
    defaults = edit_defaults(backbone)
    config = BenchConfig(
        methods,
        knobs=knobs,
        edits_per_group=args.edits,
        max_groups=args.groups,
        seeds=(args.seed,),
        **defaults,
    )
    n_blocks = len(find_mlps(backbone.model))
    print(
        f"demo world: {args.groups} groups x {args.edits} edits, {n_blocks} blocks; "
        f"lr {defaults['lr']:g}, <= {defaults['max_steps']} steps, "
        f"stop CE {defaults['stop_loss']:g}\n"
    )
    print("| blocks | method | knob | SR % | GR % | LR % | steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for blocks in windows(n_blocks, args.width):
        sites = Sites.for_model(backbone.model, blocks)
        results = run_bench(backbone, benchmark, config, sites=sites)
        for method, entry in results["methods"].items():
            for p in entry["points"]:
                print(
                    f"| {','.join(map(str, blocks))} | {method} | {p['knob_value']} | "
                    f"{100 * p['sr']:.1f} | {100 * p['gr']:.1f} | {100 * p['lr']:.1f} | "
                    f"{p['steps_mean']:.1f} |",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
