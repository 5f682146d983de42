"""Mask against mask at the same rho, from one or more ``vitedit bench`` results.json files.

For every rho two methods share (say where2edit and saliency), the paired difference of GR and of
LR over the same groups (and the same edits: same seeds), with a 95% bootstrap interval over
groups. The results must come from runs of the same edits (``vitedit bench --merge`` checks that).

    .venv/bin/python scripts/compare_masks.py RESULTS.json [--a where2edit] [--b saliency,random]
    .venv/bin/python scripts/compare_masks.py A/results.json --other B/results.json --a where2edit
        # where2edit of A (one hypernetwork) against where2edit of B (another), same edits
    .venv/bin/python scripts/compare_masks.py RESULTS.json --front [--a where2edit] [--b saliency]
        # front against front: both methods' best GR at every LR a --b point reaches (SR 100%)
    .venv/bin/python scripts/compare_masks.py A/results.json --other B/results.json --front
        # the same, with the --b fronts taken from B (e.g. another hypernetwork's where2edit)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.errors import DataError
from models.evaluation import paired_difference_ci
from models.worlds.bench import read_results
from models.worlds.headline import front_comparison


def ci_cell(diff: float, lo: float, hi: float) -> str:
    """A difference and its interval in points, starred when the interval excludes 0."""
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def by_knob(entry: dict[str, Any]) -> dict[float, dict[str, Any]]:
    return {p["knob_value"]: p for p in entry["points"]}


def compare(a: dict[str, Any], b: dict[str, Any], label: str) -> list[str]:
    rows = []
    pa, pb = by_knob(a), by_knob(b)
    for knob in sorted(set(pa) & set(pb), reverse=True):
        x, y = pa[knob], pb[knob]
        if [g["name"] for g in x["groups"]] != [g["name"] for g in y["groups"]]:
            raise SystemExit(f"{label}: the runs did not edit the same groups")
        cells = []
        for metric in ("gr", "lr"):
            diff, (lo, hi) = paired_difference_ci(
                [g[metric] for g in x["groups"]], [g[metric] for g in y["groups"]]
            )
            cells.append(ci_cell(diff, lo, hi))
        rows.append(
            f"| {label} | {knob:g} | {100 * x['gr']:.1f} / {100 * x['lr']:.1f} | "
            f"{100 * y['gr']:.1f} / {100 * y['lr']:.1f} | {cells[0]} | {cells[1]} |"
        )
    return rows


def front_rows(results: dict[str, Any], a: str, b: str) -> list[str]:
    rows = []
    for row in front_comparison(results, rival=b, learned=a):
        cells = []
        for method in (a, b):
            p = row[method]
            cells.append("-" if p is None else f"{100 * p['gr']:.1f} / {100 * p['lr']:.1f}")
        if "gr_difference" in row:
            diff = ci_cell(row["gr_difference"], *row["ci95"])
        else:
            diff = f"no {a} point reaches this LR"
        rows.append(f"| {100 * row['min_lr']:.1f} | {cells[0]} | {cells[1]} | {diff} |")
    return rows


def load_results(path: Path) -> dict[str, Any]:
    """A ``vitedit bench`` results.json, or exit saying what is wrong with the file."""
    try:
        return read_results(path)
    except DataError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--other", type=Path, help="take the --b methods from this results file")
    parser.add_argument("--a", default="where2edit")
    parser.add_argument("--b", default="saliency,random")
    parser.add_argument(
        "--front", action="store_true", help="compare fronts at matched LR instead of rho to rho"
    )
    args = parser.parse_args()
    first = load_results(args.results)
    second = load_results(args.other) if args.other else first
    if args.other and first["benchmark"] != second["benchmark"]:
        raise SystemExit("the two runs did not make the same edits: compare runs of one setting")
    rivals = [m.strip() for m in args.b.split(",") if m.strip()]
    if not rivals:
        parser.error("--b names no method; give one or more, comma-separated (e.g. saliency)")
    for name, results in ((args.a, first), *((b, second) for b in rivals)):
        if name not in results["methods"]:
            raise SystemExit(
                f"no method {name!r} in these results; they hold {', '.join(results['methods'])}"
            )
    if args.front:
        for b in rivals:
            # a rival from the other file gets its own name, so where2edit can face where2edit
            rival = f"{b} (other)" if args.other else b
            both = {**first, "methods": {args.a: first["methods"][args.a]}}
            both["methods"][rival] = second["methods"][b]
            print(
                f"| LR >= % | {args.a}: best GR / its LR % | {rival}: best GR / its LR % | "
                "GR diff. |"
            )
            print("|---:|---|---|---|")
            print("\n".join(front_rows(both, args.a, rival)))
        print(
            "(best: the highest GR among points with SR 100% and LR at or above the bar; GR diff."
        )
        print(" with its paired 95% interval over groups; * : it excludes 0)")
        return
    print("| a - b | rho | a GR / LR % | b GR / LR % | GR difference [95% CI] | LR difference |")
    print("|---|---:|---|---|---|---|")
    for b in rivals:
        rows = compare(first["methods"][args.a], second["methods"][b], f"{args.a} - {b}")
        print("\n".join(rows))
    print("(* : the 95% interval excludes 0; intervals resample groups, paired)")


if __name__ == "__main__":
    main()
