"""The benchmark harness: the paper's folder layout in, results.json + GR-vs-LR plot out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import bench as bench_command
from models.backbones import load_backbone
from models.errors import HypernetworkMismatchError
from models.store.manifest import BackboneManifest
from models.worlds.bench import BenchConfig, edit_defaults, knob_values, run_bench, sample_edits
from models.worlds.layout import EditBenchmark, read_benchmark
from tests import conftest
from tests.conftest import TINY_VIT_OVERRIDES


def tiny_manifest(extra: dict | None = None) -> BackboneManifest:
    """The manifest of the tests' :func:`~tests.conftest.tiny_vit`, with ``extra``."""
    return conftest.tiny_manifest(overrides=dict(TINY_VIT_OVERRIDES), extra=extra or {})


def write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


@pytest.fixture
def paper_layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """edit_groups/<true>-<tag>/*.png, locality/**/*.png and a backbone manifest, in tmp_path."""
    write_images(tmp_path / "edit_groups" / "3-5", 4, seed=0)
    write_images(tmp_path / "edit_groups" / "7-invert", 3, seed=1)
    write_images(tmp_path / "locality" / "sketch", 5, seed=2)
    manifest = tmp_path / "backbone.json"
    tiny_manifest().write(manifest)
    return tmp_path / "edit_groups", tmp_path / "locality", manifest


def bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_command_reads_paper_layout_and_writes_json_and_plot(
    paper_layout, tmp_path: Path
) -> None:
    groups, locality, manifest = paper_layout
    out = tmp_path / "out"
    args = bench_args(
        [
            "--backbone",
            str(manifest),
            "--groups",
            str(groups),
            "--locality",
            str(locality),
            "--methods",
            "ft,random",
            "--knobs",
            "random=0.5,0.1",
            "--edits-per-group",
            "2",
            "--lr",
            "1e-3",
            "--max-steps",
            "2",
            "--threads",
            "1",
            "--seeds",
            "0",
            "--out",
            str(out),
        ]
    )
    threads = torch.get_num_threads()
    try:
        assert bench_command.run_bench_command(args) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    assert (out / "gr_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert [g["name"] for g in results["benchmark"]["groups"]] == ["3-5", "7-invert"]
    assert results["benchmark"]["locality_size"] == 5
    assert results["settings"]["lr"] == 1e-3 and results["settings"]["max_steps"] == 2
    assert set(results["metrics"]) >= {"SR", "GR", "LR"}
    random_points = results["methods"]["random"]["points"]
    assert [p["knob_value"] for p in random_points] == [0.5, 0.1]
    assert random_points[1]["config"] == {
        "lr": 1e-3,
        "max_steps": 2,
        "stop_loss": 0.01,
        "seed": 0,
        "rho": 0.1,
    }
    point = results["methods"]["ft"]["points"][0]
    assert point["n_edits"] == 4 and 1 <= point["steps_mean"] <= 2
    assert {"sr", "gr", "lr", "seconds_per_edit"} <= set(point)
    assert [g["name"] for g in point["groups"]] == ["3-5", "7-invert"]


def test_run_bench_with_zero_change_scores_full_locality(paper_layout) -> None:
    groups, locality, _ = paper_layout
    backbone = load_backbone(tiny_manifest())
    benchmark = read_benchmark(groups, locality)
    config = BenchConfig(
        ("random",), knobs={"random": (0.05,)}, edits_per_group=1, lr=1e-9, max_steps=1
    )
    results = run_bench(backbone, benchmark, config)
    point = results["methods"]["random"]["points"][0]
    assert point["lr"] == 1.0  # a 1e-9 step cannot flip any locality prediction
    assert results["backbone"]["sha256"] == ""  # random init: no weights file


def test_sample_edits_is_seeded_and_capped_by_group_size() -> None:
    first = sample_edits([10, 3], per_group=4, seed=7)
    assert first == sample_edits([10, 3], per_group=4, seed=7)
    assert len(first[0]) == 4 and first[1] == [0, 1, 2]
    assert sample_edits([3], per_group=None, seed=0) == [[0, 1, 2]]


def test_quick_run_uses_two_spread_knob_values_unless_overridden() -> None:
    config = BenchConfig.quick_run(("random", "ft", "lora"), knobs={"lora": (1.0,)})
    assert knob_values("random", config) == [0.5, 0.1]
    assert knob_values("ft", config) == [None]
    assert knob_values("lora", config) == [1.0]
    assert knob_values("random", BenchConfig(("random",))) == [0.75, 0.5, 0.25, 0.1, 0.05]


def test_edit_defaults_come_from_backbone_manifest_extra() -> None:
    backbone = load_backbone(tiny_manifest({"edit_defaults": {"lr": 3e-4, "max_steps": 40}}))
    assert edit_defaults(backbone) == {"lr": 3e-4, "max_steps": 40, "stop_loss": 0.01}


def test_parse_knobs_accepts_repeated_and_semicolon_lists() -> None:
    knobs = bench_command.parse_knobs(["random=0.1,0.05", "lora=1;ft-l2=0.01"])
    assert knobs == {"random": (0.1, 0.05), "lora": (1.0,), "ft-l2": (0.01,)}
    with pytest.raises(SystemExit):
        bench_command.parse_knobs(["random"])


def test_default_methods_skip_where2edit_without_a_hypernetwork() -> None:
    args = bench_args(["--world", "demo"])
    methods = bench_command._methods(args, hypernet=None)
    assert "where2edit" not in methods
    assert {"ft", "ft-l1", "ft-l2", "random", "lora"} <= set(methods)
    with pytest.raises(SystemExit, match="needs a hypernetwork"):
        bench_command._methods(bench_args(["--methods", "where2edit"]), hypernet=None)


def test_two_runs_merge_into_what_one_run_of_their_methods_gives(paper_layout) -> None:
    from models.errors import DataError
    from models.worlds.bench import merge_results

    groups, locality, _ = paper_layout
    backbone = load_backbone(tiny_manifest())
    benchmark = read_benchmark(groups, locality)
    shared = dict(edits_per_group=2, lr=1e-3, max_steps=2, seeds=(0, 1))
    knobs = {"random": (0.5,)}
    both = run_bench(backbone, benchmark, BenchConfig(("ft", "random"), knobs=knobs, **shared))
    ft = run_bench(backbone, benchmark, BenchConfig(("ft",), **shared))
    rand = run_bench(backbone, benchmark, BenchConfig(("random",), knobs=knobs, **shared))
    merged = merge_results([ft, rand])

    def scores(results: dict) -> dict:
        return {
            m: [(p["knob_value"], p["sr"], p["gr"], p["lr"], p["groups"]) for p in e["points"]]
            for m, e in results["methods"].items()
        }

    assert scores(merged) == scores(both)
    assert merged["settings"]["methods"] == ["ft", "random"]
    assert merged["headline"].keys() == both["headline"].keys()
    with pytest.raises(DataError, match="ft is in two runs"):
        merge_results([ft, ft])
    # one method from two runs with other knob values: the points of one run of both
    other_knob = run_bench(
        backbone, benchmark, BenchConfig(("random",), knobs={"random": (0.2,)}, **shared)
    )
    two = run_bench(
        backbone, benchmark, BenchConfig(("random",), knobs={"random": (0.5, 0.2)}, **shared)
    )
    assert scores(merge_results([rand, other_knob])) == scores(two)
    without = merge_results([both], drop=["random"])  # then another run's random in its place
    assert without["settings"]["methods"] == ["ft"]
    swapped = merge_results([without, other_knob])
    assert [p["knob_value"] for p in swapped["methods"]["random"]["points"]] == [0.2]
    # where2edit points of two hypernetworks never mix (the results record which one made them)
    point = {**rand["methods"]["random"]["points"][0]}
    learned = [
        {
            **ft,
            "hypernetwork": {"weights_sha256": sha, "episodes": 8},
            "methods": {"where2edit": {"knob": "rho", "points": [{**point, "knob_value": rho}]}},
        }
        for sha, rho in (("a" * 64, 0.1), ("b" * 64, 0.05))
    ]
    with pytest.raises(DataError, match="different hypernetworks"):
        merge_results(learned)
    assert merge_results([learned[0], rand])["hypernetwork"]["weights_sha256"] == "a" * 64
    # dropping the where2edit points drops the record of their hypernetwork too
    assert "hypernetwork" not in merge_results([learned[0]], drop=["where2edit"])
    relabelled = merge_results([merge_results([learned[0], rand], drop=["where2edit"]), learned[1]])
    assert relabelled["hypernetwork"]["weights_sha256"] == "b" * 64
    other = run_bench(backbone, benchmark, BenchConfig(("random",), **{**shared, "lr": 1e-2}))
    with pytest.raises(DataError, match="other settings"):
        merge_results([ft, other])
    # another locality set of the same size (e.g. the reference rule's): never merged; results
    # written before the set's sha256 was recorded merge by its size, as they did
    flipped = EditBenchmark(benchmark.groups, benchmark.locality[::-1])
    elsewhere = run_bench(backbone, flipped, BenchConfig(("random",), knobs=knobs, **shared))
    assert elsewhere["benchmark"]["locality_size"] == ft["benchmark"]["locality_size"]
    with pytest.raises(DataError, match="another benchmark"):
        merge_results([ft, elsewhere])
    old = {**ft, "benchmark": {k: v for k, v in ft["benchmark"].items() if k != "locality_sha256"}}
    assert scores(merge_results([old, rand])) == scores(both)


def test_parse_sets_reads_method_option_values() -> None:
    sets = bench_command.parse_sets(["where2edit-sal.mix=0.25", "ft-l1.c=0.1;where2edit-sal.rho=1"])
    assert sets == {"where2edit-sal": {"mix": 0.25, "rho": 1.0}, "ft-l1": {"c": 0.1}}
    for bad in ("where2edit-sal=0.25", "mix=0.25", "where2edit-sal.mix=", "where2edit-sal.mix=x"):
        with pytest.raises(SystemExit, match="--set"):
            bench_command.parse_sets([bad])


def test_a_fixed_option_reaches_every_point_and_never_merges_with_another(paper_layout) -> None:
    from models.errors import DataError, EditConfigError
    from models.hypernet.network import HypernetConfig, Hypernetwork, feature_dim
    from models.sites import Sites
    from models.worlds.bench import merge_results

    groups, locality, _ = paper_layout
    backbone = load_backbone(tiny_manifest())
    benchmark = read_benchmark(groups, locality)
    sites = Sites.for_model(backbone.model)
    torch.manual_seed(0)
    hypernet = Hypernetwork(HypernetConfig.for_sites(feature_dim(backbone.model), sites)).eval()
    shared = dict(edits_per_group=1, lr=1e-3, max_steps=2, seeds=(0,))
    knobs = {"where2edit-sal": (0.25, 0.1)}

    def run(mix: float, rhos: tuple[float, ...] = (0.25, 0.1)) -> dict:
        config = BenchConfig(
            ("where2edit-sal",),
            knobs={"where2edit-sal": rhos},
            options={"where2edit-sal": {"mix": mix}},
            **shared,
        )
        return run_bench(backbone, benchmark, config, hypernet, sites)

    quarter = run(0.25)
    points = quarter["methods"]["where2edit-sal"]["points"]
    assert [(p["knob_value"], p["config"]["mix"]) for p in points] == [(0.25, 0.25), (0.1, 0.25)]
    assert quarter["settings"]["options"] == {"where2edit-sal": {"mix": 0.25}}
    default = run_bench(
        backbone,
        benchmark,
        BenchConfig(("where2edit-sal",), knobs=knobs, **shared),
        hypernet,
        sites,
    )
    assert default["methods"]["where2edit-sal"]["points"][0]["config"]["mix"] == 0.5
    # points of one mix from two runs merge; two mixes never do
    merged = merge_results([run(0.25, (0.25,)), run(0.25, (0.1,))])
    assert merged["settings"]["options"] == {"where2edit-sal": {"mix": 0.25}}
    assert [p["knob_value"] for p in merged["methods"]["where2edit-sal"]["points"]] == [0.25, 0.1]
    with pytest.raises(DataError, match="other options"):
        merge_results([run(0.25, (0.25,)), run(0.75, (0.1,))])
    refused = [
        ({"where2edit-sal": {"rho": 0.1}}, "cannot be set per method"),
        ({"where2edit-sal": {"lr": 0.1}}, "cannot be set per method"),
        ({"where2edit-sal": {"mix": 2.0}}, "option mix="),
        ({"where2edit-sal": {"width": 2.0}}, "has no option"),
        ({"random": {"rho": 0.1}}, "not among the methods"),
    ]
    for options, match in refused:
        with pytest.raises(EditConfigError, match=match):
            BenchConfig(("where2edit-sal",), options=options)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"random": (float("nan"),)}, r"option rho=nan"),
        ({"random": (0.1, -1.0)}, r"option rho=-1\.0"),
        ({"typo": (0.1,)}, "not among the methods"),
        ({"ft": (0.1,)}, "ft has no knob"),
        ({"random": ()}, "at least one value"),
    ],
)
def test_every_knob_value_is_checked_before_any_edit_runs(knobs, match) -> None:
    from models.errors import EditConfigError

    with pytest.raises(EditConfigError, match=match):
        BenchConfig(("ft", "random"), knobs=knobs)


@pytest.mark.parametrize("seeds", [",", "", "a,b"])
def test_the_bench_command_refuses_no_seeds_before_loading_anything(seeds: str) -> None:
    args = bench_args(["--world", "demo", "--seeds", seeds])
    with pytest.raises(SystemExit, match="expected integers like 0,1,2"):
        bench_command.run_bench_command(args)


@pytest.mark.parametrize(
    ("methods", "match"),
    [("nope", "unknown method 'nope'; choose from"), (" , ", "names no method")],
)
def test_the_bench_command_refuses_methods_before_loading_anything(
    methods: str, match: str, monkeypatch
) -> None:
    def load(*_: object) -> None:
        raise AssertionError("loaded a backbone for a run it refuses")

    monkeypatch.setattr(bench_command, "_load_backbone", load)
    args = bench_args(["--world", "demo", "--methods", methods])
    with pytest.raises(SystemExit, match=match):
        bench_command.run_bench_command(args)


def test_a_locality_rule_needs_a_built_in_world(tmp_path) -> None:
    folders = ["--groups", str(tmp_path), "--locality", str(tmp_path)]
    args = bench_args([*folders, "--locality-rule", "reference"])
    with pytest.raises(SystemExit, match="a built-in world's locality set: give --world"):
        bench_command.run_bench_command(args)


def test_baselines_alone_load_no_hypernetwork(tmp_path: Path, monkeypatch) -> None:
    """A run of methods that need no hypernetwork loads none, so it runs on a backbone the world's
    hypernetwork was not trained for (a new backbone's baselines, before its meta-training). Here
    the demo world's hypernetwork folder holds the Tiny-ImageNet one: where2edit refuses it, the
    baselines run."""
    from models.worlds import catalog

    shipped = Path(__file__).parents[3] / "models" / "assets"
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("backbone.json", "world.json"):
        (assets / name).write_bytes((shipped / "demo" / name).read_bytes())
    shutil.copytree(shipped / "tiny-imagenet" / "hypernet", assets / "hypernet")
    world = dataclasses.replace(catalog.WORLDS["demo"], assets=assets)
    monkeypatch.setitem(catalog.WORLDS, "demo", world)

    def run(methods: str, knobs: str) -> int:
        args = bench_args(
            [
                "--world", "demo", "--methods", methods, "--knobs", knobs,
                "--edits-per-group", "1", "--seeds", "0", "--max-steps", "1",
                "--out", str(tmp_path / methods.replace(",", "-")),
            ]
        )  # fmt: skip
        threads = torch.get_num_threads()
        try:
            return bench_command.run_bench_command(args)
        finally:
            torch.set_num_threads(threads)

    with pytest.raises(HypernetworkMismatchError, match="trained for backbone 'tiny-imagenet-vit'"):
        run("random,where2edit", "random=0.1;where2edit=0.1")
    assert run("random", "random=0.1") == 0
    results = json.loads((tmp_path / "random" / "results.json").read_text())
    assert list(results["methods"]) == ["random"] and "hypernetwork" not in results
