"""The fair harness: per-edit mask seeds, repeated seeds, bootstrap intervals, pinned sites."""

from __future__ import annotations

import json

import pytest
import torch

from models.errors import DataError, HypernetworkMismatchError
from models.evaluation import bootstrap_ci, paired_difference_ci
from models.hypernet.network import HypernetConfig, Hypernetwork
from models.sites import Sites
from models.worlds.bench import BenchConfig, edit_seed, run_bench
from models.worlds.layout import EditBenchmark, EditGroup, to_pil


def _benchmark(seed: int = 0) -> EditBenchmark:
    gen = torch.Generator().manual_seed(seed)

    def images(n: int) -> list:
        return to_pil(torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8).numpy())

    groups = [EditGroup("3-5", 3, images(4), "test"), EditGroup("7-1", 7, images(4), "tuning")]
    return EditBenchmark(groups, images(12))


def test_edit_seed_is_stable_and_differs_by_run_seed_group_and_image() -> None:
    seeds = {edit_seed(s, g, i) for s in (0, 1) for g in ("3-5", "7-1") for i in (0, 1, 2)}
    assert len(seeds) == 12
    assert edit_seed(0, "3-5", 1) == edit_seed(0, "3-5", 1)


def test_random_mask_is_redrawn_per_seed_while_deterministic_methods_repeat(tiny_backbone) -> None:
    # every image of every group is edited under each seed, so only the mask draws can differ
    config = BenchConfig(
        ("ft", "random"),
        knobs={"random": (0.05,)},
        edits_per_group=None,
        lr=0.05,
        max_steps=3,
        stop_loss=0.0,
        seeds=(0, 1, 2),
    )
    results = run_bench(tiny_backbone, _benchmark(), config)
    ft = results["methods"]["ft"]["points"][0]["per_seed"]
    rnd = results["methods"]["random"]["points"][0]["per_seed"]
    assert ft["0"] == ft["1"] == ft["2"]
    assert len({tuple(v.values()) for v in rnd.values()}) > 1
    assert results["methods"]["ft"]["points"][0]["n_edits"] == 2 * 4 * 3


def test_points_carry_bootstrap_intervals_around_their_mean(tiny_backbone) -> None:
    config = BenchConfig(("ft",), edits_per_group=2, lr=0.05, max_steps=2, seeds=(0, 1))
    point = run_bench(tiny_backbone, _benchmark(), config)["methods"]["ft"]["points"][0]
    for metric in ("sr", "gr", "lr"):
        lo, hi = point["ci95"][metric]
        assert lo <= point[metric] <= hi
    groups = [g["gr"] for g in point["groups"]]
    assert point["ci95"]["gr"][0] >= min(groups) and point["ci95"]["gr"][1] <= max(groups)


def test_bootstrap_interval_of_constant_values_is_a_point_and_of_spread_values_covers_the_mean() -> (
    None
):
    assert bootstrap_ci([0.4] * 8) == pytest.approx((0.4, 0.4))
    lo, hi = bootstrap_ci([0.0, 1.0] * 20, seed=3)
    assert 0.3 < lo < 0.5 < hi < 0.7
    mean, (dlo, dhi) = paired_difference_ci([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])
    assert mean == pytest.approx(0.1) and dlo == pytest.approx(0.1) and dhi == pytest.approx(0.1)


def test_sites_given_in_any_order_or_repeated_are_sorted_and_deduplicated(tiny_backbone) -> None:
    model = tiny_backbone.model
    assert Sites.for_model(model, (3, 1, 2, 2)) == Sites.for_model(model, (1, 2, 3))
    assert Sites.from_names(model, ["blocks.2.mlp", "blocks.1.mlp", "blocks.2.mlp"]).mlps == (
        "blocks.1.mlp",
        "blocks.2.mlp",
    )


def test_hypernetwork_refuses_other_sites_of_the_same_widths(tiny_backbone, tmp_path) -> None:
    own, other = (
        Sites.for_model(tiny_backbone.model, (1, 2)),
        Sites.for_model(tiny_backbone.model, (2, 3)),
    )
    hypernet = Hypernetwork(HypernetConfig.for_sites(32, own, width=16, heads=2, depth=1))
    hypernet.save(tmp_path, tiny_backbone, own)
    loaded = Hypernetwork.load(tmp_path, tiny_backbone)
    config = BenchConfig(
        ("where2edit",), knobs={"where2edit": (0.1,)}, edits_per_group=1, seeds=(0,)
    )
    with pytest.raises(HypernetworkMismatchError, match=r"blocks\.1\.mlp"):
        run_bench(tiny_backbone, _benchmark(), config, loaded, other)
    results = run_bench(tiny_backbone, _benchmark(), config, loaded, own)
    manifest = json.loads((tmp_path / "hypernet.json").read_text())
    assert results["hypernetwork"]["weights_sha256"] == manifest["weights_sha256"]  # provenance


def test_benchmark_selects_a_half_and_refuses_a_missing_one() -> None:
    bench = _benchmark()
    assert [g.name for g in bench.select("test").groups] == ["3-5"]
    assert bench.select("all") is bench
    with pytest.raises(DataError, match="no 'holdout' groups"):
        bench.select("holdout")


def _point(knob, sr, lr, grs):
    return {
        "knob_value": knob,
        "sr": sr,
        "lr": lr,
        "gr": sum(grs) / len(grs),
        "groups": [{"gr": g} for g in grs],
    }


def test_headline_compares_best_eligible_points_with_a_paired_interval() -> None:
    from models.worlds.headline import headline

    results = {
        "methods": {
            "where2edit": {
                "knob": "rho",
                "points": [
                    _point(0.1, 1.0, 0.92, [0.5, 0.6, 0.7]),
                    _point(0.5, 1.0, 0.85, [0.9, 0.9, 0.9]),
                ],
            },
            "random": {
                "knob": "rho",
                "points": [
                    _point(0.1, 1.0, 0.95, [0.4, 0.5, 0.6]),
                    _point(0.05, 0.5, 0.99, [0.9, 0.9, 0.9]),
                ],
            },
            "ft": {"knob": None, "points": [_point(None, 1.0, 0.80, [0.95, 0.95, 0.95])]},
        }
    }
    out = headline(results)
    bar = out["at_lr_bar"]
    assert bar["best_baseline"] == "random"  # its SR-50% point and ft (LR 80%) do not qualify
    assert bar["gr_difference"] == pytest.approx(0.1) and bar["separated"]
    assert out["at_where2edit_rho_0.1"]["min_lr"] == 0.92
    # read on the fronts at that LR: where2edit's rho-0.1 point, random's only full-SR point
    fronts = out["at_where2edit_rho_0.1_on_fronts"]
    assert fronts["best_baseline"] == "random" and fronts["points"]["ft"] is None
    assert fronts["gr_difference"] == pytest.approx(0.1)
    assert (
        headline({"methods": {"random": results["methods"]["random"]}})["at_lr_bar"]["verdict"]
        == "no where2edit point qualifies"
    )


def test_a_variant_of_the_learned_mask_is_not_a_baseline_nor_run_by_default() -> None:
    """where2edit-sal mixes the learned ranking with saliency's: the headline does not count it
    as a baseline to beat, and `vitedit bench` runs it only when it is named."""
    import argparse

    from cli.bench import _methods
    from models.worlds.headline import VARIANTS, headline

    hybrid = {"knob": "rho", "points": [_point(0.1, 1.0, 0.95, [0.9, 0.9, 0.9])]}
    results = {
        "methods": {
            "where2edit": {"knob": "rho", "points": [_point(0.1, 1.0, 0.92, [0.5, 0.6, 0.7])]},
            "random": {"knob": "rho", "points": [_point(0.1, 1.0, 0.95, [0.4, 0.5, 0.6])]},
            "where2edit-sal": hybrid,
        }
    }
    assert headline(results)["at_lr_bar"]["best_baseline"] == "random"
    assert {"where2edit-sal", "where2edit-spill"} <= VARIANTS
    default = _methods(argparse.Namespace(methods=None), hypernet=object())
    assert "where2edit" in default and "where2edit-sal" not in default
    named = _methods(argparse.Namespace(methods="where2edit-sal"), hypernet=object())
    assert named == ("where2edit-sal",)


def test_front_comparison_matches_locality_not_rho_and_names_unreached_bars() -> None:
    """Front against front: at each LR the rival reaches, both methods' best GR at or above it;
    a bar the learned mask never reaches carries no difference."""
    from models.worlds.headline import front_comparison

    results = {
        "methods": {
            "where2edit": {
                "knob": "rho",
                "points": [
                    _point(0.1, 1.0, 0.80, [0.6, 0.7, 0.8]),
                    _point(0.05, 1.0, 0.85, [0.5, 0.6, 0.7]),
                ],
            },
            "saliency": {
                "knob": "rho",
                "points": [
                    _point(0.1, 1.0, 0.78, [0.5, 0.5, 0.5]),
                    _point(0.05, 1.0, 0.90, [0.3, 0.3, 0.3]),
                    _point(0.01, 0.5, 0.99, [0.1, 0.1, 0.1]),  # SR 50%: sets no bar
                ],
            },
        }
    }
    rows = front_comparison(results, rival="saliency")
    assert [r["min_lr"] for r in rows] == [0.90, 0.78]
    assert rows[0]["where2edit"] is None and "gr_difference" not in rows[0]
    # at LR >= 78%: where2edit's rho 0.1 (GR 0.7, LR 0.80) against saliency's rho 0.1 (GR 0.5)
    assert rows[1]["where2edit"]["knob_value"] == 0.1
    assert rows[1]["gr_difference"] == pytest.approx(0.2) and rows[1]["separated"]
    with pytest.raises(KeyError, match="ft"):
        front_comparison(results, rival="ft")


def test_gr_at_the_bar_is_read_on_the_upper_hull_of_full_sr_points() -> None:
    """Between the two hull points around the bar, linearly (what mixing their knobs reaches);
    a point under the chord, a dominated point and an SR-50% point are not on the hull."""
    from models.worlds.headline import gr_at_lr, upper_hull

    entry = {
        "knob": "rho",
        "points": [
            _point(0.5, 1.0, 0.80, [0.6, 0.6]),  # dominated by 0.2 (more GR and LR there)
            _point(0.2, 1.0, 0.82, [0.7, 0.9]),
            _point(0.1, 1.0, 0.86, [0.5, 0.6]),  # under the chord from 0.2 to 0.05
            _point(0.05, 1.0, 0.92, [0.5, 0.5]),
            _point(0.01, 0.5, 0.99, [0.9, 0.9]),  # SR 50%
        ],
    }
    assert [p["knob_value"] for p in upper_hull(entry)] == [0.2, 0.05]
    at = gr_at_lr(entry, 0.87)
    assert at["between"] == [0.2, 0.05] and at["weight"] == pytest.approx(0.5)
    assert at["gr"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.5)
    assert [g["gr"] for g in at["groups"]] == pytest.approx([0.6, 0.7])
    first = gr_at_lr(entry, 0.5)  # the hull starts above the bar: its highest-GR point
    assert first["between"] == [0.2, 0.2] and first["gr"] == pytest.approx(0.8)
    assert gr_at_lr(entry, 0.93) is None  # past the hull's end


def test_the_on_fronts_headline_does_not_jump_when_a_point_misses_the_bar_narrowly() -> None:
    """The best-point headline drops a point 0.0003 under the bar and takes the next one; on the
    fronts the GR at the bar moves by a hair."""
    from models.worlds.headline import headline

    def results(lr: float) -> dict:
        return {
            "methods": {
                "where2edit": {
                    "knob": "rho",
                    "points": [
                        _point(0.02, 1.0, lr, [0.40, 0.40, 0.40]),
                        _point(0.01, 1.0, 0.91, [0.30, 0.30, 0.30]),
                    ],
                },
                "saliency": {"knob": "rho", "points": [_point(0.02, 1.0, 0.95, [0.3, 0.3, 0.35])]},
            }
        }

    over, under = headline(results(0.9001)), headline(results(0.8997))
    assert over["at_lr_bar"]["gr_difference"] == pytest.approx(0.4 - 0.3167, abs=1e-3)
    assert under["at_lr_bar"]["gr_difference"] == pytest.approx(0.3 - 0.3167, abs=1e-3)
    fronts = [h["at_lr_bar_on_fronts"]["gr_difference"] for h in (over, under)]
    assert fronts[0] == pytest.approx(0.4 - 0.3167, abs=1e-3)
    assert abs(fronts[0] - fronts[1]) < 0.005
    assert under["at_lr_bar_on_fronts"]["points"]["where2edit"]["between"] == [0.02, 0.01]
    # rho 0.02 at LR 0.85: the bar lies 5/6 of the way to rho 0.01, GR 0.4 / 6 + 0.3 * 5 / 6
    beyond = headline(results(0.85))["at_lr_bar_on_fronts"]
    assert beyond["points"]["where2edit"]["weight"] == pytest.approx(5 / 6)
    assert beyond["gr_difference"] == pytest.approx(0.4 / 6 + 0.25 - 0.3167, abs=1e-3)
    only = {"methods": {"where2edit": results(0.9)["methods"]["where2edit"]}}
    assert headline(only)["at_lr_bar_on_fronts"]["verdict"] == "no baseline's front reaches the bar"
