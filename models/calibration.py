"""Calibrate a backbone: the edit optimiser setting and the meta-training inner lr, measured.

The paper's numbers (edit lr 2e-5, stop at CE <= 0.01; inner lr 1e-3) belong to a pretrained
ViT-B. On other backbones they can do nothing: every edit runs to its step limit, or the mask
search of meta-training never moves (docs/method.md sections 3 and 4). Calibration measures both
on the backbone itself, on groups that are not the reported ones:

- **edit setting**: lr x max_steps x stop_loss, each edit by a 10% random mask and by full
  fine-tuning of the sites (the two ends of "how much is edited"); the setting where both fix
  every edit image (SR >= 99%) with the least damage (highest mean LR, then GR, then fewest steps);
- **inner lr**: a few meta-training iterations per candidate from the same seed; the candidate
  whose mask search lowers the pseudo-edits' KL the most while its masks stay selective
  (1% to 50% dense).

The result goes into the backbone manifest (``extra.edit_defaults``, ``extra.meta_defaults``,
``extra.calibration`` with every measured row), where editors, the bench, the service and
``vitedit hypernet train`` read it.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.backbones import Backbone
from models.hypernet.cutmix import ImagePool
from models.hypernet.metatrain import MetaTrainConfig, MetaTrainer, build_hypernetwork
from models.sites import Sites
from models.store.manifest import BackboneManifest, utc_now
from models.worlds.bench import BenchConfig, run_bench
from models.worlds.layout import EditBenchmark

EDIT_METHODS = ("random", "ft")
EDIT_KNOBS = {"random": (0.1,)}
MIN_SR = 0.99
LRS = (1e-4, 1e-3, 1e-2)
MAX_STEPS = (50,)
STOP_LOSSES = (0.1, 0.5)
INNER_LRS = (1e-3, 1e-2, 1e-1, 1.0)
DENSITY_RANGE = (0.01, 0.5)  # selective masks: not (nearly) empty, not half the neurons or more

Setting = tuple[float, int, float]  # (lr, max_steps, stop_loss)


def tuning_groups(benchmark: EditBenchmark, seed: int = 0) -> EditBenchmark:
    """The groups calibration may look at: the "tuning" half when the benchmark has one, else a
    seeded half of the groups (the others stay unseen for reported figures)."""
    if "tuning" in benchmark.splits:
        return benchmark.select("tuning")
    groups = sorted(benchmark.groups, key=lambda g: g.name)
    random.Random(seed).shuffle(groups)
    half = groups[: max(1, len(groups) // 2)]
    return EditBenchmark(sorted(half, key=lambda g: g.name), benchmark.locality)


@dataclasses.dataclass
class EditSearch:
    rows: list[dict[str, Any]]
    chosen: Setting | None
    seconds: float


def choose_edit_setting(rows: Sequence[dict[str, Any]]) -> Setting | None:
    """The setting whose methods all reach SR >= MIN_SR with the highest mean LR, then GR, then
    the fewest steps; None when no setting fixes every edit."""
    by_setting: dict[Setting, list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault((r["lr"], r["max_steps"], r["stop_loss"]), []).append(r)
    ok = {k: v for k, v in by_setting.items() if all(r["sr"] >= MIN_SR for r in v)}
    if not ok:
        return None

    def key(k: Setting) -> tuple[float, float, float]:
        v = ok[k]
        return (
            sum(r["locality"] for r in v) / len(v),
            sum(r["gr"] for r in v) / len(v),
            -sum(r["steps_mean"] for r in v),
        )

    return max(ok, key=key)


def search_edit_setting(
    backbone: Backbone,
    benchmark: EditBenchmark,
    lrs: Sequence[float] = LRS,
    max_steps: Sequence[int] = MAX_STEPS,
    stop_losses: Sequence[float] = STOP_LOSSES,
    groups: int | None = 6,
    edits: int = 2,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] = lambda row: None,
) -> EditSearch:
    """SR / GR / LR of each setting on ``benchmark`` (give it the tuning groups only)."""
    start, rows = time.perf_counter(), []
    for lr, steps, stop in itertools.product(lrs, max_steps, stop_losses):
        config = BenchConfig(
            EDIT_METHODS,
            knobs=EDIT_KNOBS,
            edits_per_group=edits,
            max_groups=groups,
            lr=lr,
            max_steps=steps,
            stop_loss=stop,
            seeds=(seed,),
        )
        results = run_bench(backbone, benchmark, config)
        for method in EDIT_METHODS:
            p = results["methods"][method]["points"][0]
            row = {
                "lr": lr,
                "max_steps": steps,
                "stop_loss": stop,
                "method": method,
                "sr": p["sr"],
                "gr": p["gr"],
                "locality": p["lr"],
                "steps_mean": p["steps_mean"],
                "seconds_per_edit": p["seconds_per_edit"],
            }
            rows.append(row)
            progress(row)
    return EditSearch(rows, choose_edit_setting(rows), time.perf_counter() - start)


@dataclasses.dataclass
class InnerSearch:
    rows: list[dict[str, float]]
    chosen: float | None
    seconds: float


def choose_inner_lr(rows: Sequence[dict[str, float]]) -> float | None:
    """The candidate with the largest relative KL drop among those with selective masks."""
    lo, hi = DENSITY_RANGE
    ok = [r for r in rows if lo <= r["s_density"] <= hi and r["kl_drop"] > 0]
    return max(ok, key=lambda r: (r["kl_drop"], -r["inner_lr"]))["inner_lr"] if ok else None


def search_inner_lr(
    backbone: Backbone,
    sites: Sites,
    pool: ImagePool,
    candidates: Sequence[float] = INNER_LRS,
    iterations: int = 3,
    batch: int = 4,
    seed: int = 0,
    progress: Callable[[dict[str, float]], None] = lambda row: None,
) -> InnerSearch:
    """Mean outer KL (first -> last outer step) and mask density of a few meta-training
    iterations per inner lr, the same episodes for each (same seed)."""
    start, rows = time.perf_counter(), []
    for inner_lr in candidates:
        cfg = MetaTrainConfig(iterations=iterations, batch=batch, inner_lr=inner_lr, seed=seed)
        hypernet = build_hypernetwork(backbone.model, sites, seed)
        trainer = MetaTrainer(backbone, sites, pool, hypernet, cfg)
        steps = [trainer.step() for _ in range(iterations)]
        first = sum(s["kl_first"] for s in steps) / iterations
        last = sum(s["kl_last"] for s in steps) / iterations
        row = {
            "inner_lr": inner_lr,
            "kl_first": first,
            "kl_last": last,
            "kl_drop": (first - last) / first if first > 0 else 0.0,
            "s_density": sum(s["s_density"] for s in steps) / iterations,
        }
        rows.append(row)
        progress(row)
    return InnerSearch(rows, choose_inner_lr(rows), time.perf_counter() - start)


def write_calibration(
    path: Path,
    edit: EditSearch | None,
    inner: InnerSearch | None,
    command: str,
    tuning: Sequence[str],
) -> BackboneManifest:
    """Record the choices and their evidence in the backbone manifest at ``path``."""
    manifest = BackboneManifest.read(path)
    extra = dict(manifest.extra)
    evidence: dict[str, Any] = {"command": command, "at": utc_now(), "tuning_groups": list(tuning)}
    if edit is not None:
        evidence["edit"] = {"rows": edit.rows, "seconds": round(edit.seconds, 1)}
        if edit.chosen is not None:
            lr, steps, stop = edit.chosen
            measured = {"lr": lr, "max_steps": steps, "stop_loss": stop}  # a rho set stays
            extra["edit_defaults"] = {**(extra.get("edit_defaults") or {}), **measured}
    if inner is not None:
        evidence["inner_lr"] = {"rows": inner.rows, "seconds": round(inner.seconds, 1)}
        if inner.chosen is not None:
            extra["meta_defaults"] = {"inner_lr": inner.chosen}
    extra["calibration"] = evidence
    updated = BackboneManifest(**{**manifest.__dict__, "extra": extra})
    updated.write(path)
    return updated
