"""The benchmark's headline: does the learned mask beat every baseline at matched locality?

From a ``results.json`` of :func:`models.worlds.bench.run_bench` (one run, the same groups, edits
and seeds for every method):

- at a locality bar (LR >= 90% by default): each method's best GR among its points with SR 100%
  and LR at or above the bar; the learned mask's best minus the best baseline's;
- at where2edit's own LR at rho 0.1: each baseline's best GR among its points with SR 100% and
  LR at or above that LR.

Each difference comes with a paired 95% bootstrap interval over groups (both points were scored on
the same groups, so groups are resampled in pairs); ``separated`` says whether it excludes 0.
"""

from __future__ import annotations

from typing import Any

from models.evaluation import paired_difference_ci

LEARNED = "where2edit"
# variants of the learned mask (part learned, part baseline): neither the learned mask nor a
# baseline to beat; a default `vitedit bench` leaves them out (they run when named)
VARIANTS = frozenset({"where2edit-sal"})
FULL_SR = 0.999  # "SR 100%" allowing float noise in the mean


def eligible_best(entry: dict[str, Any], min_lr: float) -> dict[str, Any] | None:
    """The point of highest GR with SR 100% and LR >= ``min_lr`` (None if there is none)."""
    points = [p for p in entry["points"] if p["sr"] >= FULL_SR and p["lr"] >= min_lr]
    return max(points, key=lambda p: (p["gr"], p["lr"]), default=None)


def _compare(results: dict[str, Any], min_lr: float, seed: int) -> dict[str, Any]:
    methods = results["methods"]
    best = {m: eligible_best(e, min_lr) for m, e in methods.items()}
    ours = best.get(LEARNED)
    baselines = {
        m: p for m, p in best.items() if m != LEARNED and m not in VARIANTS and p is not None
    }
    out: dict[str, Any] = {
        "min_lr": min_lr,
        "points": {m: _brief(methods[m], p) for m, p in best.items()},
    }
    if ours is None or not baselines:
        out["verdict"] = (
            "no where2edit point qualifies" if ours is None else "no baseline point qualifies"
        )
        return out
    rival_name, rival = max(baselines.items(), key=lambda kv: kv[1]["gr"])
    return out | {"best_baseline": rival_name, **_gr_difference(ours, rival, seed)}


def _gr_difference(ours: dict[str, Any], theirs: dict[str, Any], seed: int) -> dict[str, Any]:
    """GR of ``ours`` minus ``theirs`` with its paired 95% interval over the same groups."""
    diff, (lo, hi) = paired_difference_ci(
        [g["gr"] for g in ours["groups"]], [g["gr"] for g in theirs["groups"]], seed=seed
    )
    return {"gr_difference": diff, "ci95": [lo, hi], "separated": lo > 0 or hi < 0}


def _brief(entry: dict[str, Any], point: dict[str, Any] | None) -> dict[str, Any] | None:
    if point is None:
        return None
    keep = ("knob_value", "sr", "gr", "lr", "ci95")
    return {"knob": entry["knob"], **{k: point[k] for k in keep if k in point}}


def headline(results: dict[str, Any], min_lr: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """The two comparisons of the module docstring, JSON-ready."""
    out = {"at_lr_bar": _compare(results, min_lr, seed)}
    learned = results["methods"].get(LEARNED)
    at_rho = next((p for p in (learned or {}).get("points", []) if p["knob_value"] == 0.1), None)
    if at_rho is not None:
        out["at_where2edit_rho_0.1"] = _compare(results, at_rho["lr"], seed)
    return out


def front_comparison(
    results: dict[str, Any], rival: str, learned: str = LEARNED, seed: int = 0
) -> list[dict[str, Any]]:
    """The learned mask's front against a rival's, at every locality the rival reaches.

    For each LR of a rival point with SR 100% (its bars, highest first), both methods' best GR
    among their points with SR 100% and LR at or above the bar, and the paired difference with
    its 95% interval. Comparing at matched LR rather than at the same rho asks whether one front
    lies above the other; a bar the learned mask never reaches is reported as such (the rival's
    front extends further there).
    """
    methods = results["methods"]
    if learned not in methods or rival not in methods:
        missing = [m for m in (learned, rival) if m not in methods]
        raise KeyError(f"no {', '.join(missing)} in these results")
    bars = sorted({p["lr"] for p in methods[rival]["points"] if p["sr"] >= FULL_SR}, reverse=True)
    rows = []
    for bar in bars:
        theirs = eligible_best(methods[rival], bar)
        ours = eligible_best(methods[learned], bar)
        row: dict[str, Any] = {
            "min_lr": bar,
            rival: _brief(methods[rival], theirs),
            learned: _brief(methods[learned], ours),
        }
        if ours is not None and theirs is not None:
            row |= _gr_difference(ours, theirs, seed)
        rows.append(row)
    return rows
