"""The shipped demo world: files match their manifests, and the benchmark has the promised shape."""

import numpy as np
import pytest
import torch

from models.store.manifest import BackboneManifest, read_json, sha256_file
from models.worlds import demo as demo_world
from models.worlds.layout import read_benchmark


def test_shipped_backbone_matches_its_manifest(demo_backbone):
    manifest = BackboneManifest.read(demo_world.BACKBONE_MANIFEST)
    assert (
        sha256_file(manifest.weights_path)
        == manifest.weights_sha256
        == demo_backbone.weights_sha256
    )
    assert demo_backbone.class_names[0] == "T-shirt/top"


def test_shipped_world_matches_its_manifest_and_backbone(demo_backbone):
    summary = read_json(demo_world.WORLD_MANIFEST)
    assert summary["sha256"] == sha256_file(demo_world.WORLD_FILE)
    assert summary["backbone_sha256"] == demo_backbone.weights_sha256
    assert "MIT" in summary["licence"]


def test_world_has_enough_groups_of_genuine_failures(demo_backbone):
    world = demo_world.load_world()
    groups = world.benchmark.groups
    assert len(groups) >= 8 and all(len(g.images) >= 10 for g in groups)
    assert any(g.name.split("-")[1].isdigit() for g in groups), "natural (true-pred) groups"
    assert any(g.name.split("-")[1] in demo_world.SHIFTS for g in groups), "shift groups"
    for name, images in world.group_arrays.items():
        pred = demo_world.predict_logits(demo_backbone.model, demo_world.normalise(images)).argmax(
            -1
        )
        assert (pred != int(name.split("-")[0])).all(), (
            f"group {name} holds an image the model gets right"
        )


def test_locality_set_is_sensitive_and_correctly_classified(demo_backbone):
    world = demo_world.load_world()
    assert len(world.locality_array) >= 500
    probs = demo_world.predict_logits(
        demo_backbone.model, demo_world.normalise(world.locality_array)
    ).softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    summary = read_json(demo_world.WORLD_MANIFEST)
    assert float((top2[:, 0] - top2[:, 1]).max()) <= summary["locality"]["max_gap_used"] + 1e-5


def test_backbone_accuracy_on_heldout_matches_the_training_claim(demo_backbone):
    world = demo_world.load_world()
    pred = demo_world.predict_logits(
        demo_backbone.model, demo_world.normalise(world.heldout_images)
    ).argmax(-1)
    assert (pred == torch.from_numpy(world.heldout_labels)).float().mean() >= 0.85


def test_export_writes_the_papers_layout_that_the_harness_reads(tmp_path):
    world = demo_world.load_world()
    demo_world.export_world(world, tmp_path)
    bench = read_benchmark(tmp_path / "edit_groups", tmp_path / "locality")
    assert [g.name for g in bench.groups] == [g.name for g in world.benchmark.groups]
    first = np.asarray(bench.groups[0].images[0])
    assert np.array_equal(first, world.group_arrays[bench.groups[0].name][0])


@pytest.mark.parametrize("shift", sorted(demo_world.SHIFTS))
def test_shifts_are_deterministic_and_keep_the_image_format(shift):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    a, b = demo_world.apply_shift(shift, x, seed=3), demo_world.apply_shift(shift, x, seed=3)
    assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b)
