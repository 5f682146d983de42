"""scripts/choose_default_rho.py: on the shipped hypernetwork's tuning run it chooses the density
the Tiny-ImageNet backbone ships with, and it refuses a test-half run, a world without halves and
methods that disagree, in one line each. make run's model then edits at that density."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.store.manifest import BackboneManifest
from models.worlds import tiny_imagenet as tin

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs/bench/tiny-imagenet/attempts/spill-input"  # attempt 23, the shipped network


def choose(results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/choose_default_rho.py", str(results), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_shipped_density_is_the_one_its_tuning_run_chooses() -> None:
    run = choose(RUNS / "tuning-results.json", "--world", "tiny-imagenet")
    assert run.returncode == 0, run.stderr
    assert "where2edit rho 0.02: SR 100.0% GR 45.0% LR 79.7% (rho 0.1: SR 100.0% GR 36.9%" in (
        run.stdout
    )
    assert run.stdout.splitlines()[-1] == "default rho: 0.02"
    extra = BackboneManifest.read(tin.ASSETS / "backbone.json").extra
    assert extra["edit_defaults"]["rho"] == 0.02
    assert "spill-input/tuning-results.json" in extra["rho_evidence"]


def test_a_point_below_the_papers_lr_or_short_of_sr_100_is_never_chosen(tmp_path) -> None:
    results = json.loads((RUNS / "tuning-results.json").read_text())
    points = results["methods"]["where2edit"]["points"]
    paper = next(p for p in points if p["config"]["rho"] == 0.1)
    for p in points:
        if p["config"]["rho"] == 0.02:
            p["lr"] = paper["lr"] - 0.001  # the best GR, now with less LR than rho 0.1's
        if p["config"]["rho"] == 0.01:
            p["sr"] = 0.95
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    run = choose(path, "--world", "tiny-imagenet", "--methods", "where2edit")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "default rho: 0.05"


@pytest.mark.parametrize(
    ("results", "args", "message"),
    [
        (RUNS / "results.json", ["--world", "tiny-imagenet"], "outside the tiny-imagenet world's"),
        (RUNS / "tuning-results.json", ["--world", "demo"], "not split in halves"),
        (RUNS / "tuning-results.json", ["--world", "tiny-imagenet", "--methods", "ft"], "no rho"),
        (Path("/etc/passwd"), ["--world", "tiny-imagenet"], "passwd"),
    ],
)
def test_it_refuses_what_cannot_choose_a_default(results, args, message) -> None:
    run = choose(results, *args)
    assert run.returncode != 0 and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_methods_that_disagree_give_no_default(tmp_path) -> None:
    results = json.loads((RUNS / "tuning-results.json").read_text())
    for p in results["methods"]["saliency"]["points"]:
        if p["config"]["rho"] == 0.02:
            p["gr"] = 0.0
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    run = choose(path, "--world", "tiny-imagenet")
    assert run.returncode != 0 and "choose different densities ([0.02, 0.05])" in run.stderr


def test_a_point_without_its_figures_is_refused_in_one_line(tmp_path) -> None:
    results = json.loads((RUNS / "tuning-results.json").read_text())
    del results["methods"]["where2edit"]["points"][0]["config"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    run = choose(path, "--world", "tiny-imagenet")
    assert run.returncode != 0 and "where2edit's points are not a vitedit bench run's" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_run_on_another_backbone_is_refused(tmp_path) -> None:
    results = json.loads((RUNS / "tuning-results.json").read_text())
    results["backbone"]["sha256"] = "0" * 64  # e.g. a second backbone's run of the same groups
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    run = choose(path, "--world", "tiny-imagenet")
    assert run.returncode != 0 and "benched on another backbone" in run.stderr


def test_on_the_finer_sweep_the_methods_disagree_and_no_default_is_written() -> None:
    # docs/bench/tiny-imagenet/default-density: where2edit's best is 0.015, saliency's 0.02
    sweep = ROOT / "docs/bench/tiny-imagenet/default-density/tuning-results.json"
    run = choose(sweep, "--world", "tiny-imagenet")
    assert run.returncode != 0 and "choose different densities ([0.015, 0.02])" in run.stderr
    assert "where2edit rho 0.015: SR 100.0% GR 45.8% LR 80.1%" in run.stdout
