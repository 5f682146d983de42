"""The shipped Tiny-ImageNet world: backbone, benchmark file and their recorded figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.store.manifest import BackboneManifest, read_json, sha256_file
from models.worlds import tiny_imagenet as tin
from models.worlds import tiny_imagenet_benchmark as tib
from models.worlds.catalog import get_world


@pytest.fixture(scope="module")
def world():
    return tib.load_world()


@pytest.fixture(scope="module")
def backbone():
    return tin.load_tiny_imagenet_backbone()


def _predict(backbone, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return backbone.model(tin.to_input(torch.from_numpy(images))).argmax(-1).numpy()


def test_backbone_is_the_recorded_timm_vit_with_200_classes(backbone) -> None:
    manifest = BackboneManifest.read(tin.ASSETS / "backbone.json")
    assert sha256_file(tin.ASSETS / "backbone.safetensors") == manifest.weights_sha256
    assert backbone.weights_sha256 == manifest.weights_sha256
    timm_name, side = tin.STEMS[tin.DEFAULT_STEM]  # the conv-stem hybrid, 4x4 tokens
    assert manifest.timm_name == timm_name and manifest.overrides["patch_size"] == side // 4
    assert backbone.num_classes == 200 and backbone.model.patch_embed.grid_size == (4, 4)
    assert len(backbone.model.blocks) == 6 and backbone.model.embed_dim == 128
    assert len(backbone.class_names) == 200 and manifest.extra["val_accuracy"] > 0.2


def test_every_group_image_is_a_failure_of_the_shipped_backbone(world, backbone) -> None:
    labels = {g.name: g.label for g in world.benchmark.groups}
    wrong = [
        (_predict(backbone, images) != labels[name]).mean()
        for name, images in world.group_arrays.items()
    ]
    assert np.mean(wrong) >= 0.98  # failures by construction (float noise may flip a rare tie)


def test_heldout_accuracy_matches_the_recorded_figure(world, backbone) -> None:
    summary = read_json(tib.WORLD_MANIFEST)
    accuracy = float((_predict(backbone, world.heldout_images) == world.heldout_labels).mean())
    assert abs(accuracy - summary["heldout_accuracy"]) <= 0.005


def test_benchmark_has_the_paper_shape_and_halves(world) -> None:
    summary = read_json(tib.WORLD_MANIFEST)
    groups = summary["groups"].values()
    natural = [g for g in groups if g["kind"] == "natural"]
    assert len(natural) >= 16 and all(g["size"] >= 10 for g in groups)
    assert {g["split"] for g in groups} == {"tuning", "test"}
    assert summary["locality"]["size"] == len(world.benchmark.locality) >= 500
    assert summary["locality"]["largest_class_share"] <= 0.05
    assert (tib.WORLD_FILE.stat().st_size) < 10_000_000
    assert get_world("tiny-imagenet").report_split == "test"


def test_both_locality_sets_are_sensitive_images_of_the_shipped_backbone(world, backbone) -> None:
    summary = read_json(tib.WORLD_MANIFEST)
    reference = tib.load_world(locality="reference")
    assert (
        sha256_file(tib.WORLD_FILE.with_name(tib.REFERENCE_FILE))
        == (summary["locality_reference"]["sha256"])
    )
    assert [g.name for g in reference.benchmark.groups] == [g.name for g in world.benchmark.groups]
    for images, entry, bound in (
        (world.locality_array, summary["locality"], 0.014),
        (reference.locality_array, summary["locality_reference"], 0.05),
    ):
        with torch.no_grad():
            probs = backbone.model(tin.to_input(torch.from_numpy(images))).softmax(-1)
        top2 = probs.topk(2, dim=-1).values
        assert len(images) == entry["size"] == 500 and entry["largest_class_share"] <= 0.05
        assert float((top2[:, 0] - top2[:, 1]).max()) < bound
        assert sum(entry["histogram"].values()) == 500
    # the reference rule reaches past the smallest gaps: a set a few times less tied
    assert summary["locality_reference"]["median_gap"] > 3 * 0.006


def test_shipped_hypernetwork_fits_the_backbone_and_edits_a_failure(world, backbone) -> None:
    from models.editing.registry import EditTask, make_config, run_edit
    from models.forward import SplitForward
    from models.hypernet.network import Hypernetwork
    from models.sites import Sites
    from models.worlds.bench import edit_defaults

    hypernet = Hypernetwork.load(tin.ASSETS / "hypernet", backbone)
    sites = Sites.for_model(backbone.model)  # the default: blocks 2-4, what it was trained for
    assert hypernet.sites == sites
    # attempt 23 (docs/worlds.md): it reads the edit's target, its gradient and its fix per
    # spill on the 64 clean anchors shipped with it
    assert hypernet.config.target_token and hypernet.config.gradient_input
    assert hypernet.config.spill_input and hypernet.anchor_images.shape == (64, 3, 32, 32)
    group = world.benchmark.groups[0]
    images = backbone.preprocess(group.images[:1])
    split = SplitForward(backbone.model, sites)
    task = EditTask(
        backbone.model,
        sites,
        split,
        images,
        torch.tensor([group.label]),
        split.prefix(images),
        hypernet,
    )
    outcome = run_edit(
        "where2edit", task, make_config("where2edit", rho=0.1, **edit_defaults(backbone))
    )
    from models.evaluation import patched_predictions

    (after,) = patched_predictions(split, outcome.patch, [task.tokens])
    before = _predict(backbone, world.group_arrays[group.name][:1])
    assert before[0] != group.label and int(after[0]) == group.label  # the failure is fixed


def test_the_catalog_serves_either_locality_set_and_refuses_others() -> None:
    from models.errors import DataError
    from models.worlds.bench import locality_fingerprint

    world = get_world("tiny-imagenet")
    own, reference = world.benchmark("test"), world.benchmark("test", "reference")
    assert [g.name for g in reference.groups] == [g.name for g in own.groups]
    assert {g.split for g in reference.groups} == {"test"}
    assert len(reference.locality) == len(own.locality) == 500
    assert locality_fingerprint(reference.locality) != locality_fingerprint(own.locality)
    with pytest.raises(DataError, match="it has the locality sets \\['smallest', 'reference'\\]"):
        world.benchmark(locality="largest")
    with pytest.raises(DataError, match="has no locality set 'reference'; it has one"):
        get_world("demo").benchmark(locality="reference")
