"""The benchmark harness: every method x every knob value x every sampled edit, scored by SR/GR/LR.

    config = BenchConfig(methods=("ft", "random"), lr=1e-3, max_steps=50, stop_loss=0.1)
    results = run_bench(backbone, benchmark, config)          # a JSON-ready dict
    write_results(results, out_dir)                            # results.json + gr_vs_lr.png

All methods share one optimiser setting (lr, max steps, stop rule) and the same sites. Each edit
uses one failure image of a group and starts from the same model; GR is measured on the full group
minus that image. Prefix tokens and base locality predictions are computed once per run.

Every stochastic choice is repeated over ``config.seeds``: the sampled edit images, and each
edit's own seed (a random mask is drawn afresh per edit, from the seed, the group and the image).
A point's SR/GR/LR are means over groups of the per-group means over seeds and edits; each comes
with a 95% percentile-bootstrap interval over groups (the unit the benchmark samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.backbones import Backbone
from models.editing.registry import (
    EDITORS,
    EditConfig,
    EditTask,
    get_editor,
    make_config,
    run_edit,
)
from models.errors import DataError, EditConfigError, ManifestError
from models.evaluation import (
    METRIC_DEFINITIONS,
    EditScore,
    EvalSet,
    FrontPoint,
    best_gr_at_lr,
    bootstrap_ci,
    group_result,
    overall,
    pareto_front,
)
from models.forward import SplitForward
from models.precision import autocast
from models.sites import Sites
from models.store.manifest import read_json, write_json_atomic
from models.worlds.headline import headline
from models.worlds.layout import EditBenchmark

log = logging.getLogger(__name__)

SHARED_OPTIONS = ("lr", "max_steps", "stop_loss")  # one setting for every method of a run
RESULTS_SCHEMA = 2  # 2: seeds, per-edit seeds, bootstrap intervals
QUICK_GROUPS = 4  # --quick: this many groups,
QUICK_EDITS = 2  # this many edit images per group,
QUICK_KNOBS = 2  # and this many knob values per method
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
Progress = Callable[[int, int, str], None]
"""progress(done, total, label) after every edit."""


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...]
    knobs: dict[str, tuple[float, ...]] = field(default_factory=dict)  # overrides per method
    # fixed options per method, the same at every knob value (e.g. {"where2edit-sal": {"mix": 0.25}})
    options: dict[str, dict[str, float]] = field(default_factory=dict)
    edits_per_group: int | None = 10  # None = every image of every group
    max_groups: int | None = None  # None = every group
    lr: float = EditConfig.lr
    max_steps: int = EditConfig.max_steps
    stop_loss: float = EditConfig.stop_loss
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    precision: str = "fp32"  # forward passes in fp32 or under bf16 autocast (models/precision.py)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("the benchmark needs at least one seed")
        for method, given in self.options.items():
            if method not in self.methods:
                raise EditConfigError(f"options for {method!r}, which is not among the methods")
            knob = get_editor(method).config_cls.knob
            fixed = sorted(set(given) & {*SHARED_OPTIONS, "seed", knob})
            if fixed:
                raise EditConfigError(
                    f"{method}: {fixed} cannot be set per method (the knob is swept with knobs, "
                    "lr / max_steps / stop_loss are shared, seeds are the run's)"
                )
            make_config(method, **given)  # an unknown option or one out of bounds fails here
        for method, values in self.knobs.items():  # before any edit runs, not at its turn
            if method not in self.methods:
                raise EditConfigError(
                    f"knobs for {method!r}, which is not among the methods {list(self.methods)}"
                )
            knob = get_editor(method).config_cls.knob
            if knob is None:
                raise EditConfigError(f"{method} has no knob to sweep; drop it from the knobs")
            if not values:
                raise EditConfigError(f"knobs for {method!r}: give at least one value")
            for value in values:
                make_config(method, **{**self.options.get(method, {}), knob: value})

    @property
    def seed(self) -> int:
        """The first seed: the one that picks groups and seeds the bootstrap."""
        return self.seeds[0]

    @classmethod
    def quick_run(cls, methods: tuple[str, ...], **options: Any) -> BenchConfig:
        return cls(
            methods, edits_per_group=QUICK_EDITS, max_groups=QUICK_GROUPS, quick=True, **options
        )


def edit_defaults(backbone: Backbone) -> dict[str, float]:
    """lr / max_steps / stop_loss measured for this backbone (manifest extra), else EditConfig's."""
    base = {
        "lr": EditConfig.lr,
        "max_steps": EditConfig.max_steps,
        "stop_loss": EditConfig.stop_loss,
    }
    measured = backbone.manifest.extra.get("edit_defaults", {}) or {}
    return {**base, **{k: v for k, v in measured.items() if k in base}}


def knob_values(method: str, config: BenchConfig) -> list[float | None]:
    """Knob values swept for a method: the override, else its own list ([None]: no knob)."""
    cls = get_editor(method).config_cls
    if cls.knob is None:
        return [None]
    values = list(config.knobs.get(method, cls.knob_values))
    if config.quick and method not in config.knobs and len(values) > QUICK_KNOBS:
        values = [values[len(values) // 4], values[(3 * len(values)) // 4]]  # two spread values
    return values


def sample_edits(sizes: Sequence[int], per_group: int | None, seed: int) -> list[list[int]]:
    """Edit image indices per group: ``per_group`` sampled without replacement (all if None)."""
    rng = np.random.default_rng(seed)
    if per_group is None:
        return [list(range(n)) for n in sizes]
    return [
        sorted(int(i) for i in rng.choice(n, size=min(per_group, n), replace=False)) for n in sizes
    ]


def edit_seed(seed: int, group: str, image: int) -> int:
    """The seed of one edit: a stable function of the run seed, the group name and the image."""
    state = np.random.SeedSequence([seed, zlib.crc32(group.encode()), image]).generate_state(1)
    return int(state[0])


def choose_groups(n_groups: int, max_groups: int | None, seed: int) -> list[int]:
    if max_groups is None or max_groups >= n_groups:
        return list(range(n_groups))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_groups, size=max_groups, replace=False).tolist())


@dataclass
class _Prepared:
    backbone: Backbone
    sites: Sites
    evalset: EvalSet
    images: list[torch.Tensor]  # preprocessed images per chosen group
    names: list[str]
    edits: dict[int, list[list[int]]]  # seed -> edit image indices per group


def _prepare(
    backbone: Backbone, benchmark: EditBenchmark, config: BenchConfig, sites: Sites
) -> _Prepared:
    picked = choose_groups(len(benchmark.groups), config.max_groups, config.seed)
    chosen = [benchmark.groups[i] for i in picked]
    images, evalset = evaluation_set(backbone, sites, chosen, benchmark.locality)
    sizes = [len(x) for x in images]
    edits = {seed: sample_edits(sizes, config.edits_per_group, seed) for seed in config.seeds}
    return _Prepared(backbone, sites, evalset, images, [g.name for g in chosen], edits)


def evaluation_set(
    backbone: Backbone, sites: Sites, groups: Sequence[Any], locality: Any
) -> tuple[list[torch.Tensor], EvalSet]:
    """The preprocessed images of each group (objects with ``name``, ``label``, ``images``) and
    the :class:`EvalSet` that scores edits of them against ``locality``; for the bench and the
    probe scripts."""
    split = SplitForward(backbone.model, sites)
    images = [backbone.preprocess(g.images) for g in groups]
    named = [(g.name, g.label, x) for g, x in zip(groups, images, strict=True)]
    return images, EvalSet.prepare(split, named, backbone.preprocess(locality))


def _run_point(
    prep: _Prepared,
    method: str,
    edit_config: EditConfig,
    hypernetwork: Any,
    tick: Callable[[str], None],
) -> dict[str, Any]:
    """Every sampled edit of every group and seed with one method config: the point's numbers."""
    model, split = prep.backbone.model, prep.evalset.split
    groups, seconds, steps = [], 0.0, []
    per_seed: dict[int, list[EditScore]] = {}
    for gi, g in enumerate(prep.evalset.groups):
        scores: list[EditScore] = []
        for seed, edits in prep.edits.items():
            seed_scores = []
            for i in edits[gi]:
                task = EditTask(
                    model,
                    prep.sites,
                    split,
                    prep.images[gi][i : i + 1],
                    torch.tensor([g.label], device=prep.backbone.device),
                    g.tokens[i : i + 1],
                    hypernetwork,
                )
                config = dataclasses.replace(edit_config, seed=edit_seed(seed, g.name, i))
                start = time.perf_counter()
                outcome = run_edit(method, task, config)
                seconds += time.perf_counter() - start
                steps.append(outcome.steps)
                seed_scores.append(prep.evalset.score(outcome.patch, gi, [i]))
                tick(f"{method} {g.name}")
            per_seed.setdefault(seed, []).append(_mean_scores(seed_scores))
            scores += seed_scores
        groups.append(group_result(g.name, scores))
    total = overall(groups)
    first_seed = next(iter(prep.edits))
    ci = {
        m: bootstrap_ci([getattr(g, m) for g in groups], seed=first_seed)
        for m in ("sr", "gr", "lr")
    }
    return {
        "sr": total.sr,
        "gr": total.gr,
        "lr": total.lr,
        "ci95": ci,
        "per_seed": {
            str(seed): dataclasses.asdict(_mean_scores(scores)) for seed, scores in per_seed.items()
        },
        "seconds_per_edit": seconds / len(steps),
        "steps_mean": float(np.mean(steps)),
        "n_edits": len(steps),
        "groups": [dataclasses.asdict(g) for g in groups],
    }


def _mean_scores(scores: Sequence[EditScore]) -> EditScore:
    n = len(scores)
    return EditScore(*(sum(getattr(s, m) for s in scores) / n for m in ("sr", "gr", "lr")))


def run_bench(
    backbone: Backbone,
    benchmark: EditBenchmark,
    config: BenchConfig,
    hypernetwork: Any = None,
    sites: Sites | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the results as a JSON-ready dict (see :func:`write_results`).

    ``sites`` default to the three blocks ending at 75% depth; pass the hypernetwork's sites when
    where2edit is among the methods, so that every method edits the same neurons.
    """
    sites = sites or Sites.for_model(backbone.model)
    if hypernetwork is not None and any(get_editor(m).needs_hypernetwork for m in config.methods):
        hypernetwork.check_sites(sites)  # every method edits the hypernetwork's own sites
    with autocast(backbone.device, config.precision):  # base predictions at the same precision
        prep = _prepare(backbone, benchmark, config, sites)
    plan = [(m, v) for m in config.methods for v in knob_values(m, config)]
    per_point = sum(len(e) for edits in prep.edits.values() for e in edits)
    total, done = len(plan) * per_point, 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    methods: dict[str, Any] = {}
    for method, value in plan:
        knob = get_editor(method).config_cls.knob
        options = {
            "lr": config.lr,
            "max_steps": config.max_steps,
            "stop_loss": config.stop_loss,
            **config.options.get(method, {}),
            **({knob: value} if knob else {}),
        }
        edit_config = make_config(method, **options)
        with autocast(backbone.device, config.precision):
            point = _run_point(prep, method, edit_config, hypernetwork, tick)
        entry = methods.setdefault(method, {"knob": knob, "points": []})
        entry["points"].append(
            {"knob_value": value, "config": dataclasses.asdict(edit_config), **point}
        )
        log.info(
            "%s %s=%s: SR %.3f GR %.3f LR %.3f",
            method,
            knob,
            value,
            point["sr"],
            point["gr"],
            point["lr"],
        )
    for entry in methods.values():
        _add_summary(entry)
    results = _results(backbone, benchmark, config, prep, methods)
    if hypernetwork is not None and any(_needs_hypernetwork(m) for m in methods):
        results["hypernetwork"] = {  # which one made the where2edit points
            "weights_sha256": getattr(hypernetwork, "weights_sha256", None),
            "episodes": getattr(hypernetwork, "training_episodes", None),
        }
        source = getattr(hypernetwork, "episode_source", None)
        if source:  # not the paper's CutMix episodes (e.g. natural failures): say which
            results["hypernetwork"]["episode_source"] = source
    results["headline"] = headline(results, seed=config.seed)
    return results


MERGE_SAME = ("backbone", "sites", "benchmark")  # what runs must share to be merged
MERGE_SETTINGS_FREE = ("methods", "knobs", "options")  # settings that may differ between them


def locality_fingerprint(images: Sequence[Any]) -> str:
    """The sha256 of the locality images' pixels, in order: runs merge only on the same set."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _same_benchmark(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The groups, edits and locality set agree (results written before the locality's sha256
    was recorded are matched by the set's size alone)."""
    key = "locality_sha256"
    if key not in a or key not in b:
        a, b = ({k: v for k, v in x.items() if k != key} for x in (a, b))
    return a == b


def merge_results(runs: Sequence[dict[str, Any]], drop: Sequence[str] = ()) -> dict[str, Any]:
    """One results dict from runs that differ only in their methods, knob values and options.

    Each point depends only on the shared setting, the seeds and the edits (seeded per group
    and image), never on which other methods ran: runs on the same backbone, sites, groups and
    edits, with the same settings, merge into what one run of all their points would give. A
    method may come from several runs with other knob values; the points of a method that needs
    a hypernetwork must all come from the same one (``hypernetwork`` of the results). Refuses
    anything else, a point (method, knob value) present twice, and a method whose points differ
    in another option than the knob (``options``: one run's where2edit-sal at mix 0.25 never joins
    another's at 0.5). ``drop``: methods left out of
    every run first (e.g. to put another hypernetwork's where2edit points in their place).
    """
    if not runs:
        raise DataError("nothing to merge")
    runs = [_without(run, drop) for run in runs]
    first = runs[0]
    hypernets = {
        json.dumps(run.get("hypernetwork"), sort_keys=True)
        for run in runs
        if any(_needs_hypernetwork(m) for m in run["methods"])
    }
    if len(hypernets) > 1:
        raise DataError(
            "the runs' where2edit points come from different hypernetworks (or one run does not "
            "record its own): merge one hypernetwork's points, --drop where2edit from the others"
        )

    def shared_settings(run: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in run["settings"].items() if k not in MERGE_SETTINGS_FREE}

    methods: dict[str, Any] = {}
    for k, run in enumerate(runs):
        for key in MERGE_SAME:
            same = _same_benchmark if key == "benchmark" else operator.eq
            if not same(run[key], first[key]):
                raise DataError(f"run {k + 1} has another {key} than run 1: cannot merge")
        if shared_settings(run) != shared_settings(first):
            raise DataError(f"run {k + 1} has other settings than run 1: cannot merge")
        for method, entry in run["methods"].items():
            if method not in methods:
                methods[method] = {"knob": entry["knob"], "points": []}
            have = {p["knob_value"] for p in methods[method]["points"]}
            for point in entry["points"]:
                if point["knob_value"] in have:
                    knob = f" {entry['knob']}={point['knob_value']}" if entry["knob"] else ""
                    raise DataError(f"{method}{knob} is in two runs: keep it in one")
                fixed = _fixed_options(point, entry["knob"])
                reference = next(iter(methods[method]["points"]), point)
                if fixed != _fixed_options(reference, entry["knob"]):
                    raise DataError(
                        f"{method} has other options in run {k + 1} ({fixed}) than in an "
                        "earlier run: cannot merge"
                    )
                methods[method]["points"].append(point)
    for entry in methods.values():
        entry["points"].sort(key=lambda p: -1 if p["knob_value"] is None else -p["knob_value"])
        _add_summary(entry)
    knobs = {
        m: [p["knob_value"] for p in e["points"]]
        for m, e in methods.items()
        if e["knob"] is not None
    }
    options = {
        m: o for run in runs for m, o in run["settings"].get("options", {}).items() if m in methods
    }
    settings = {**first["settings"], "methods": list(methods), "knobs": knobs, "options": options}
    merged = {
        **{k: v for k, v in first.items() if k != "hypernetwork"},
        **next(({"hypernetwork": r["hypernetwork"]} for r in runs if r.get("hypernetwork")), {}),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "methods": methods,
        "merged_from": [run["created_at"] for run in runs],
    }
    merged["headline"] = headline(merged, seed=settings["seeds"][0])
    return merged


def _fixed_options(point: dict[str, Any], knob: str | None) -> dict[str, Any]:
    """A point's config but its knob and its per-edit seed: what must agree to merge points."""
    return {k: v for k, v in point.get("config", {}).items() if k not in (knob, "seed")}


def _without(run: dict[str, Any], drop: Sequence[str]) -> dict[str, Any]:
    """The run without the ``drop`` methods, and without its hypernetwork record once no method
    that needs one is left (the record says which hypernetwork made those points)."""
    methods = {m: e for m, e in run["methods"].items() if m not in drop}
    kept = {k: v for k, v in run.items() if k != "hypernetwork"}
    if any(_needs_hypernetwork(m) for m in methods) and run.get("hypernetwork"):
        kept["hypernetwork"] = run["hypernetwork"]
    return {**kept, "methods": methods}


def _needs_hypernetwork(method: str) -> bool:
    return method in EDITORS and get_editor(method).needs_hypernetwork


def front_points(entry: dict[str, Any]) -> list[FrontPoint]:
    return [FrontPoint(p["knob_value"], p["sr"], p["gr"], p["lr"]) for p in entry["points"]]


def _add_summary(entry: dict[str, Any]) -> None:
    points = front_points(entry)
    entry["front"] = [p.to_json() for p in pareto_front(points)]
    best = best_gr_at_lr(points, 0.9)
    entry["best_at_lr90"] = best.to_json() if best else None


def _results(
    backbone: Backbone,
    benchmark: EditBenchmark,
    config: BenchConfig,
    prep: _Prepared,
    methods: dict[str, Any],
) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    settings["seeds"] = list(config.seeds)
    settings["knobs"] = {k: list(v) for k, v in config.knobs.items()}
    settings["options"] = {k: dict(v) for k, v in config.options.items()}
    return {
        "schema": RESULTS_SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": {
            "name": backbone.manifest.name,
            "timm_name": backbone.manifest.timm_name,
            "sha256": backbone.weights_sha256,
        },
        "sites": prep.sites.to_json(),
        "settings": settings,
        "benchmark": {
            "groups": [
                {"name": n, "size": len(x), "edits": {str(s): e[k] for s, e in prep.edits.items()}}
                for k, (n, x) in enumerate(zip(prep.names, prep.images, strict=True))
            ],
            "locality_size": len(benchmark.locality),
            "locality_sha256": locality_fingerprint(benchmark.locality),
        },
        "metrics": METRIC_DEFINITIONS,
        "methods": methods,
    }


def read_results(path: Path) -> dict[str, Any]:
    """A results.json written by :func:`write_results`; a DataError saying what is wrong with any
    other file."""
    try:
        results = read_json(path)
    except ManifestError as exc:
        raise DataError(f"{exc}; pass a results.json written by vitedit bench") from None
    if not isinstance(results.get("methods"), dict):
        raise DataError(f"{path} has no 'methods': pass a results.json written by vitedit bench")
    return results


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and the GR-vs-LR plot ``gr_vs_lr.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "results.json", out_dir / "gr_vs_lr.png"
    write_json_atomic(json_path, results)
    plot_fronts(results, png_path)
    return json_path, png_path


def plot_fronts(results: dict[str, Any], path: Path) -> None:
    """GR against LR, one line per method through its knob values (annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, (method, entry) in enumerate(results["methods"].items()):
        pts = sorted(entry["points"], key=lambda p: p["lr"])
        xs, ys = [100 * p["lr"] for p in pts], [100 * p["gr"] for p in pts]
        (line,) = ax.plot(xs, ys, marker=MARKERS[k % len(MARKERS)], label=method)
        if all("ci95" in p for p in pts):  # 95% bootstrap intervals over groups
            xerr = [
                [x - 100 * p["ci95"]["lr"][0] for p, x in zip(pts, xs, strict=True)],
                [100 * p["ci95"]["lr"][1] - x for p, x in zip(pts, xs, strict=True)],
            ]
            yerr = [
                [y - 100 * p["ci95"]["gr"][0] for p, y in zip(pts, ys, strict=True)],
                [100 * p["ci95"]["gr"][1] - y for p, y in zip(pts, ys, strict=True)],
            ]
            ax.errorbar(
                xs,
                ys,
                xerr=xerr,
                yerr=yerr,
                fmt="none",
                ecolor=line.get_color(),
                elinewidth=0.8,
                alpha=0.6,
                capsize=2,
            )
        failed = [(x, y) for p, x, y in zip(pts, xs, ys, strict=True) if p["sr"] < 0.99]
        if failed:  # hollow ring: some edits did not succeed (SR < 99%)
            ax.scatter(
                *zip(*failed, strict=True), s=120, facecolors="none", edgecolors=line.get_color()
            )
        for p, x, y in zip(pts, xs, ys, strict=True):
            if p["knob_value"] is not None:
                ax.annotate(
                    f"{p['knob_value']:g}",
                    (x, y),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axvline(90, color="grey", linestyle=":", linewidth=1)
    ax.text(
        0.01,
        0.01,
        "ringed: SR < 99%; bars: 95% bootstrap intervals over groups",
        transform=ax.transAxes,
        fontsize=7,
        color="grey",
    )
    ax.set_xlabel("locality LR (%)")
    ax.set_ylabel("generalization GR (%)")
    settings = results["settings"]
    ax.set_title(
        f"{results['backbone']['name']}: lr {settings['lr']:g}, "
        f"<= {settings['max_steps']} steps, stop CE {settings['stop_loss']:g}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
