"""scripts/pool_headlines.py: one seed of one backbone gives back the headline ``vitedit bench``
prints; the pooled figure weighs backbones alike; its bootstrap and t intervals behave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import DataError
from models.worlds.bench import read_results
from models.worlds.headline import headline
from scripts.pool_headlines import between_backbones, pool, seed_differences
from tests.scripts import ROOT, run_script

BENCH = ROOT / "docs/bench/tiny-imagenet"
SHIPPED = BENCH / "reference-locality/results.json"  # attempt 14's where2edit + every baseline
SEED1 = BENCH / "attempts/rmsprop-inner-seed1/reference-results.json"  # where2edit only
OTHER_BACKBONE = BENCH / "replication-gpu-a/session15/rmsprop-reference-results.json"


def test_one_seed_is_the_headline_of_its_own_results() -> None:
    results = read_results(SHIPPED)
    s = seed_differences(results, results, min_lr=0.9)
    expected = results["headline"]["at_lr_bar"]
    assert s["rival"] == expected["best_baseline"]
    assert s["difference"] == pytest.approx(expected["gr_difference"])
    assert np.mean(s["per_group"]) == pytest.approx(expected["gr_difference"])
    assert len(s["per_group"]) == len(s["groups"]) == 24


def test_the_other_headline_and_a_bar_no_point_reaches() -> None:
    results = read_results(SHIPPED)
    s = seed_differences(results, results, min_lr=0.9, at="rho-0.1")
    assert s["difference"] == pytest.approx(
        results["headline"]["at_where2edit_rho_0.1"]["gr_difference"]
    )
    with pytest.raises(DataError, match="no headline"):
        seed_differences(results, results, min_lr=0.999)


def test_pool_weighs_backbones_alike_and_its_interval_holds_the_mean() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.0, 0.01, 10), rng.normal(0.05, 0.01, 40)
    pooled = pool({"a": small, "b": large})
    assert pooled["difference"] == pytest.approx((small.mean() + large.mean()) / 2)
    lo, hi = pooled["ci95"]
    assert lo < pooled["difference"] < hi and pooled["separated"]
    alone = pool({"b": large})
    assert alone["difference"] == pytest.approx(large.mean())
    # identical groups everywhere: nothing to resample, the interval is the point
    flat = pool({"a": np.full(5, 0.02), "b": np.full(7, 0.04)})
    assert flat["ci95"] == pytest.approx([0.03, 0.03])


def test_between_backbones_is_a_t_interval() -> None:
    spread = between_backbones([0.01, 0.02, 0.03])
    assert spread["difference"] == pytest.approx(0.02)
    assert spread["sd"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / np.sqrt(3)
    assert spread["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert between_backbones([0.01]) is None


def test_the_script_prints_each_seed_and_the_pool(tmp_path: Path) -> None:
    out = tmp_path / "pool.json"
    done = run_script(
        "pool_headlines",
        *("--case", "shipped", str(SHIPPED), str(SHIPPED), str(SEED1)),
        *("--case", "again", str(SHIPPED), str(SHIPPED)),
        *("--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    shipped, again = report["cases"]["shipped"], report["cases"]["again"]
    assert len(shipped["seeds"]) == 2 and len(again["seeds"]) == 1
    seeds = [s["difference"] for s in shipped["seeds"].values()]
    assert shipped["difference"] == pytest.approx(np.mean(seeds))
    assert report["pooled"]["difference"] == pytest.approx(
        (shipped["difference"] + again["difference"]) / 2
    )
    assert "pooled, each backbone weighted alike" in done.stdout
    assert "sample of backbones" in done.stdout
    refused = run_script("pool_headlines", "--case", "shipped", str(SHIPPED))
    assert refused.returncode == 2 and "at least one where2edit" in refused.stderr
    mismatched = run_script("pool_headlines", "--case", "x", str(SHIPPED), str(OTHER_BACKBONE))
    assert mismatched.returncode == 1
    assert mismatched.stderr.startswith("pool_headlines: run 2 has another backbone")
    for bar in ("nan", "1.5", "-0.1"):
        refused = run_script(
            "pool_headlines", "--case", "x", str(SHIPPED), str(SHIPPED), "--min-lr", bar
        )
        assert refused.returncode == 2 and "invalid share value" in refused.stderr
    unwritable = run_script(
        "pool_headlines",
        "--case",
        "x",
        str(SHIPPED),
        str(SHIPPED),
        "--json",
        str(tmp_path / "no/x.json"),
    )
    assert unwritable.returncode == 1
    assert (
        unwritable.stderr.startswith("pool_headlines: cannot write")
        and "Traceback" not in unwritable.stderr
    )


def test_the_on_fronts_headline_pools_its_per_group_values() -> None:
    results = read_results(SHIPPED)
    s = seed_differences(results, results, min_lr=0.9, at="lr-bar-fronts")
    expected = headline(results)["at_lr_bar_on_fronts"]
    assert s["rival"] == expected["best_baseline"]
    assert np.mean(s["per_group"]) == pytest.approx(expected["gr_difference"])
    assert len(s["per_group"]) == 24


def test_the_on_fronts_reading_at_where2edits_rho_01_lr() -> None:
    results = read_results(SHIPPED)
    s = seed_differences(results, results, min_lr=0.9, at="rho-0.1-fronts")
    expected = headline(results)["at_where2edit_rho_0.1_on_fronts"]
    assert np.mean(s["per_group"]) == pytest.approx(expected["gr_difference"])
