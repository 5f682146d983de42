"""The tuning-half criteria of a hypernetwork attempt's rule (docs/worlds.md, attempts 10-13).

    .venv/bin/python scripts/rule_criteria.py RESULTS.json [--a where2edit] [--b saliency] \
        [--middle 0.1,0.05] [--end 0.01,0.0075,0.006,0.005]

From one ``vitedit bench`` results.json holding both methods on the same edits:
- M: the mean, over the ``--middle`` rhos, of a's paired LR difference to b (attempts 10-12's rule);
- E: the same over the ``--end`` rhos, the front's end (attempt 13's rule);
- S: a's mean SR over the ``--end`` rhos.
Each rho's difference is printed with its 95% bootstrap interval over groups.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.args import numbers
from models.errors import DataError
from models.evaluation import paired_difference_ci
from models.worlds.bench import read_results

rhos = numbers("rhos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--a", default="where2edit")
    parser.add_argument("--b", default="saliency")
    parser.add_argument("--middle", type=rhos, default=rhos("0.1,0.05"))
    parser.add_argument("--end", type=rhos, default=rhos("0.01,0.0075,0.006,0.005"))
    args = parser.parse_args()
    try:
        methods = read_results(args.results)["methods"]
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    for name in (args.a, args.b):
        if name not in methods:
            raise SystemExit(f"{args.results} has no {name!r}; it has {sorted(methods)}")
    points = [{p["knob_value"]: p for p in methods[m]["points"]} for m in (args.a, args.b)]

    def lr_difference(rho: float) -> float:
        if rho not in points[0] or rho not in points[1]:
            raise SystemExit(f"rho {rho:g} is not among both methods' points")
        x, y = points[0][rho], points[1][rho]
        if [g["name"] for g in x["groups"]] != [g["name"] for g in y["groups"]]:
            raise SystemExit(f"rho {rho:g}: the two methods did not edit the same groups")
        diff, (lo, hi) = paired_difference_ci(
            [g["lr"] for g in x["groups"]], [g["lr"] for g in y["groups"]]
        )
        print(
            f"rho {rho:g}: {args.a} SR {100 * x['sr']:.1f} LR {100 * x['lr']:.1f}, {args.b} SR "
            f"{100 * y['sr']:.1f} LR {100 * y['lr']:.1f}; LR difference {100 * diff:+.2f} "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        )
        return 100 * diff

    middle = sum(lr_difference(r) for r in args.middle) / len(args.middle)
    end = sum(lr_difference(r) for r in args.end) / len(args.end)
    sr = sum(100 * points[0][r]["sr"] for r in args.end) / len(args.end)
    print(f"M (rho {','.join(f'{r:g}' for r in args.middle)}): {middle:+.2f}")
    print(f"E (rho {','.join(f'{r:g}' for r in args.end)}): {end:+.2f}")
    print(f"S ({args.a}'s mean SR over the end rhos): {sr:.2f}")


if __name__ == "__main__":
    main()
