"""Choose a backbone's default mask density (rho) from a tuning-half bench, and record it.

The editors' own default is the paper's rho 0.1 (docs/method.md). On a world where another
density is better on both axes, 0.1 is a poor default: on Tiny-ImageNet's tuning half the shipped
hypernetwork's rho 0.02 has GR 45.0% and LR 79.7% against 36.9% and 77.9% at rho 0.1, and
saliency's the same way round (docs/worlds.md). The rule, for each method named:

- the points with SR 100% whose LR is at least the LR at rho 0.1 (a default never gives up
  locality against the paper's);
- of those, the highest GR.

Every method named must choose the same rho, as the backbone's default applies to every masked
editor (``extra.edit_defaults.rho``; workers/registration.py). The results must come from the
tuning half: figures are reported on the test half, which never informs a default.

    .venv/bin/python scripts/choose_default_rho.py T/results.json --world tiny-imagenet [--write]

``--write`` records it in the world's ``backbone.json`` (``extra.edit_defaults.rho``, with the
command and its figures as ``extra.rho_evidence``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from cli.main import one_line_errors
from models.errors import DataError
from models.store.manifest import BackboneManifest, read_json
from models.worlds.bench import read_results
from models.worlds.catalog import get_world

PAPER_RHO = 0.1


def _is_point(p: Any) -> bool:
    """A bench point: a config with a rho, and SR, GR and LR as numbers."""
    fields = [p.get(k) for k in ("sr", "gr", "lr")] if isinstance(p, dict) else [None]
    config = p.get("config") if isinstance(p, dict) else None
    numbers = [*fields, config.get("rho") if isinstance(config, dict) else None]
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)


def choose(points: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The chosen point of one method's bench points (each with config.rho, sr, gr, lr)."""
    by_rho = {p["config"].get("rho"): p for p in points}
    if PAPER_RHO not in by_rho:
        raise DataError(f"{method} has no point at rho {PAPER_RHO}: bench it there to compare")
    floor = by_rho[PAPER_RHO]["lr"]
    eligible = [p for p in points if p["sr"] >= 1.0 and p["lr"] >= floor]
    if not eligible:
        raise DataError(f"{method}: no point has SR 100% and LR at least rho {PAPER_RHO}'s")
    return max(eligible, key=lambda p: (p["gr"], p["lr"]))


def check_tuning_half(results: dict[str, Any], path: Path, world: str) -> None:
    """Refuse results that hold any group outside the world's tuning half (or of another
    world): a default must never be read off the half that reports figures."""
    world_json = read_json(get_world(world).assets / "world.json")
    described = world_json.get("groups", {})
    halves = {name: g.get("split") for name, g in described.items() if isinstance(g, dict)}
    if "tuning" not in halves.values():
        raise DataError(f"the {world} world's groups are not split in halves: no tuning half")
    backbone = (results.get("backbone") or {}).get("sha256")
    if backbone != world_json.get("backbone_sha256"):
        raise DataError(f"{path}: benched on another backbone than the {world} world's")
    benchmark = results.get("benchmark") or {}
    groups = [g.get("name") for g in benchmark.get("groups", []) if isinstance(g, dict)]
    others = sorted({str(n) for n in groups if halves.get(n) != "tuning"})
    if not groups or others:
        raise DataError(
            f"{path}: groups outside the {world} world's tuning half "
            f"({', '.join(others[:3]) or 'none at all'}): bench it with --split tuning"
        )


def describe(method: str, point: dict[str, Any], paper: dict[str, Any]) -> str:
    def fig(p: dict[str, Any]) -> str:
        return f"SR {100 * p['sr']:.1f}% GR {100 * p['gr']:.1f}% LR {100 * p['lr']:.1f}%"

    rho = point["config"]["rho"]
    return f"{method} rho {rho:g}: {fig(point)} (rho {PAPER_RHO:g}: {fig(paper)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a tuning-half results.json of vitedit bench")
    parser.add_argument("--world", required=True, choices=["demo", "tiny-imagenet"])
    parser.add_argument("--methods", default="where2edit,saliency", help="comma-separated")
    parser.add_argument(
        "--write", action="store_true", help="record it in the world's backbone.json"
    )
    args = parser.parse_args()
    results = read_results(args.results)
    check_tuning_half(results, args.results, args.world)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise DataError("--methods names no method")
    lines, chosen = [], set()
    for method in methods:
        entry = results["methods"].get(method)
        if entry is None or entry.get("knob") != "rho":
            raise DataError(f"{args.results}: no rho points of {method!r}")
        points = entry.get("points")
        if not isinstance(points, list) or not all(map(_is_point, points)):
            raise DataError(f"{args.results}: {method}'s points are not a vitedit bench run's")
        point = choose(points, method)
        paper = next(p for p in entry["points"] if p["config"].get("rho") == PAPER_RHO)
        chosen.add(point["config"]["rho"])
        lines.append(describe(method, point, paper))
    print("\n".join(lines))
    if len(chosen) != 1:
        raise DataError(f"the methods choose different densities ({sorted(chosen)}): no default")
    rho = chosen.pop()
    print(f"default rho: {rho:g}")
    if args.write:
        path = get_world(args.world).assets / "backbone.json"
        manifest = BackboneManifest.read(path)
        command = shlex.join(["scripts/choose_default_rho.py", *sys.argv[1:]])
        extra = {
            **manifest.extra,
            "edit_defaults": {**(manifest.extra.get("edit_defaults") or {}), "rho": rho},
            "rho_evidence": f"{command} (tuning half only): {'; '.join(lines)}",
        }
        BackboneManifest(**{**manifest.__dict__, "extra": extra}).write(path)
        print(f"wrote extra.edit_defaults.rho to {path}")


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
