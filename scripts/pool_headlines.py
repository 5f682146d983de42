"""One headline over several backbones and meta-training seeds (issue 11: statistics, not single runs).

    .venv/bin/python scripts/pool_headlines.py \
        --case shipped BASELINES.json W_SEED0.json W_SEED1.json \
        --case second  BASELINES.json W_SEED0.json W_SEED1.json \
        [--at lr-bar|rho-0.1|lr-bar-fronts|rho-0.1-fronts] [--json OUT]

Each ``--case`` is one backbone: a ``vitedit bench`` results.json with its baselines (its own
where2edit points, if any, are left out), then one where2edit results.json per meta-training seed,
all on that backbone's test half and locality set (``vitedit bench --merge`` refuses anything else).

For each seed the headline is the one ``vitedit bench`` prints (models/worlds/headline.py): the
best where2edit point with SR 100% and LR >= ``--min-lr`` (``--at lr-bar``; or at where2edit's own
LR at rho 0.1, ``--at rho-0.1``) against the best baseline's, GR minus GR per group; or each
method's GR at the bar on the upper hull of its SR-100% points (``--at lr-bar-fronts``,
``--at rho-0.1-fronts``: models/worlds/headline.py's ``*_on_fronts``). Per backbone, those per-group differences
are averaged over its seeds (the seeds share the groups). The pooled figure gives each backbone the same weight: the mean of the backbones'
means. Its 95% interval is a stratified bootstrap: groups are resampled within each backbone, as
the benchmark samples them. Nothing is re-selected inside the bootstrap, as in the single headline.
That interval holds the backbones fixed: it says what these backbones show, not what another
backbone would. For that, the script also prints a t interval over the backbones' means (df = the
number of backbones - 1), which with three backbones is wide.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataError
from models.worlds.bench import merge_results, read_results
from models.worlds.headline import LEARNED, gr_at_lr, headline

RESAMPLES = 10_000
# Student's t, 97.5% quantile, by degrees of freedom (for the between-backbone interval)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
VERDICTS = {
    "lr-bar": "at_lr_bar",
    "rho-0.1": "at_where2edit_rho_0.1",
    "lr-bar-fronts": "at_lr_bar_on_fronts",
    "rho-0.1-fronts": "at_where2edit_rho_0.1_on_fronts",
}


def seed_differences(
    baselines: dict[str, Any], learned: dict[str, Any], min_lr: float, at: str = "lr-bar"
) -> dict:
    """The headline of one meta-training seed: which points, and GR ours - theirs per group."""
    base = merge_results([baselines], drop=[LEARNED])
    ours = {**learned, "methods": {LEARNED: learned["methods"][LEARNED]}}
    merged = merge_results([base, ours])
    verdict = headline(merged, min_lr=min_lr).get(VERDICTS[at])
    if verdict is None or "best_baseline" not in verdict:
        why = "where2edit has no rho 0.1 point" if verdict is None else verdict["verdict"]
        raise DataError(f"no headline {at}: {why}")
    rival = verdict["best_baseline"]
    groups, picked = {}, {}
    for method in (LEARNED, rival):
        if at.endswith("-fronts"):  # GR at the bar on the method's upper hull, per group
            point = gr_at_lr(merged["methods"][method], verdict["min_lr"])
            lo, hi = point["between"]
            picked[method] = f"{lo}-{hi} (w {point['weight']:.2f})" if lo != hi else lo
        else:
            value = verdict["points"][method]["knob_value"]
            point = next(p for p in merged["methods"][method]["points"] if p["knob_value"] == value)
            picked[method] = value
        groups[method] = {g["name"]: g["gr"] for g in point["groups"]}
    names = sorted(groups[LEARNED])
    return {
        "rival": rival,
        "points": picked,
        "difference": verdict["gr_difference"],
        "groups": names,
        "per_group": [groups[LEARNED][n] - groups[rival][n] for n in names],
    }


def pool(cases: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Mean of the cases' means, and its stratified 95% bootstrap interval over groups."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(RESAMPLES)
    for values in cases.values():
        picks = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
        draws += values[picks].mean(axis=1)
    draws /= len(cases)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    mean = float(np.mean([v.mean() for v in cases.values()]))
    return {"difference": mean, "ci95": [float(lo), float(hi)], "separated": bool(lo > 0 or hi < 0)}


def between_backbones(means: list[float]) -> dict[str, Any] | None:
    """The t interval of the backbones' means (None below two backbones or past the table)."""
    n = len(means)
    if n - 1 not in T_975:
        return None
    mean, sd = float(np.mean(means)), float(np.std(means, ddof=1))
    half = T_975[n - 1] * sd / np.sqrt(n)
    return {"difference": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def share(text: str) -> float:
    """An LR bar in [0, 1] (argparse turns the ValueError into a usage error)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(text)
    return value


def main() -> None:
    try:
        run()
    except DataError as e:  # a file that is not a results.json, or results that do not pair up
        raise SystemExit(f"pool_headlines: {e}") from None
    except OSError as e:  # --json somewhere it cannot be written
        raise SystemExit(f"pool_headlines: cannot write {e.filename}: {e.strerror}") from None


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME BASELINES WHERE2EDIT",
        help="a backbone: its name, its baselines' results.json, one where2edit results.json per seed",
    )
    parser.add_argument(
        "--min-lr", type=share, default=0.9, help="the locality bar in [0, 1] (--at lr-bar)"
    )
    parser.add_argument(
        "--at",
        choices=sorted(VERDICTS),
        default="lr-bar",
        help="which headline: the best point at LR >= the bar or at where2edit's rho-0.1 LR, or "
        "either read as GR at that LR on each front's upper hull (*-fronts)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {"at": args.at, "min_lr": args.min_lr, "cases": {}}
    cases: dict[str, np.ndarray] = {}
    print("| backbone | seed file | where2edit rho | best baseline (knob) | GR difference |")
    print("|---|---|---:|---|---:|")
    for name, baselines_path, *learned_paths in args.case:
        if not learned_paths:
            parser.error(f"--case {name}: give at least one where2edit results.json")
        baselines = read_results(Path(baselines_path))
        seeds = [
            seed_differences(baselines, read_results(Path(p)), args.min_lr, args.at)
            for p in learned_paths
        ]
        if len({tuple(s["groups"]) for s in seeds}) != 1:
            raise DataError(f"--case {name}: the seeds' results do not share their groups")
        for path, s in zip(learned_paths, seeds, strict=True):
            rival = f"{s['rival']} ({s['points'][s['rival']]})"
            print(
                f"| {name} | {Path(path).parent.name}/{Path(path).name} | {s['points'][LEARNED]} | {rival} | {100 * s['difference']:+.1f} |"
            )
        cases[name] = np.mean([s["per_group"] for s in seeds], axis=0)
        report["cases"][name] = {
            "seeds": {
                p: {k: s[k] for k in ("rival", "points", "difference")}
                for p, s in zip(learned_paths, seeds, strict=True)
            },
            **pool({name: cases[name]}),
        }
    print()
    print("| backbone | groups | seeds | mean GR difference | 95% interval (groups) |")
    print("|---|---:|---:|---:|---|")
    for name, values in cases.items():
        entry = report["cases"][name]
        lo, hi = entry["ci95"]
        print(
            f"| {name} | {len(values)} | {len(entry['seeds'])} | {100 * entry['difference']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
        )
    report["pooled"] = pool(cases)
    lo, hi = report["pooled"]["ci95"]
    sep = "separated" if report["pooled"]["separated"] else "not separated"
    print(
        f"| **pooled, each backbone weighted alike** | {sum(len(v) for v in cases.values())} | "
        f"| **{100 * report['pooled']['difference']:+.1f}** | [{100 * lo:+.2f}, {100 * hi:+.2f}], {sep} |"
    )
    spread = between_backbones([float(v.mean()) for v in cases.values()])
    if spread is not None:
        report["between_backbones"] = spread
        lo, hi = spread["ci95"]
        print(
            f"\nOver the backbones as a sample of backbones (t, df {len(cases) - 1}): "
            f"{100 * spread['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"sd of the backbones' means {100 * spread['sd']:.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
