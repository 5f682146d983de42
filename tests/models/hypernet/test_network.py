"""Hypernetwork: output layout and range, persistence, and refusal of foreign backbones/sites."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.backbones import Backbone
from models.errors import (
    HypernetworkMismatchError,
    IntegrityError,
    ManifestError,
    WeightsMismatchError,
)
from models.hypernet.network import (
    ANCHORS_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    HypernetConfig,
    Hypernetwork,
    cls_features,
    feature_dim,
    load_demo_hypernetwork,
    rank_features,
    row_ranks,
    target_features,
)
from models.sites import Sites
from models.store.manifest import sha256_file
from tests.conftest import run_capped


def make_hypernet(backbone: Backbone, sites: Sites, **shape: int) -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork(HypernetConfig.for_sites(feature_dim(backbone.model), sites, **shape))


@pytest.fixture
def sites(tiny_backbone: Backbone) -> Sites:
    return Sites.for_model(tiny_backbone.model)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_scores_are_flat_in_sites_order_and_inside_the_unit_interval(tiny_backbone, sites, images):
    net = make_hypernet(tiny_backbone, sites)
    scores = net(cls_features(tiny_backbone.model, images))
    assert scores.shape == (3, sites.n_entries)
    eps = net.config.clamp
    assert scores.min() >= eps and scores.max() <= 1 - eps
    with torch.no_grad():  # head i drives exactly the i-th matrix's slice
        net.heads[3].bias.fill_(100.0)
    parts = sites.split(net(cls_features(tiny_backbone.model, images)))
    assert [p.shape[-1] for p in parts] == [m.hidden for m in sites.matrices]
    assert torch.all(parts[3] == 1 - eps)
    assert all(not torch.all(p == 1 - eps) for i, p in enumerate(parts) if i != 3)


def test_heads_follow_per_matrix_hidden_sizes():
    sites = Sites(("a.mlp", "b.mlp"), (24, 40))  # e.g. Swin stages of different widths
    net = Hypernetwork(HypernetConfig.for_sites(16, sites, width=32, heads=4))
    assert [h.out_features for h in net.heads] == [24, 24, 40, 40]
    assert net(torch.randn(2, 16)).shape == (2, 128)


def test_query_tokens_start_at_zero_and_projection_only_when_widths_differ(tiny_backbone, sites):
    same = make_hypernet(tiny_backbone, sites)
    assert torch.count_nonzero(same.queries) == 0
    assert same.queries.shape == (len(sites.matrices), same.config.width)
    assert isinstance(same.proj, torch.nn.Identity)
    wider = make_hypernet(tiny_backbone, sites, width=48)
    assert isinstance(wider.proj, torch.nn.Linear) and wider.proj.in_features == 32


def test_vit_b_shape_matches_the_reference_parameter_count():
    sites = Sites(("blocks.7.mlp", "blocks.8.mlp", "blocks.9.mlp"), (3072,) * 3)
    net = Hypernetwork(HypernetConfig.for_sites(768, sites))
    assert net.config.heads == 6 and net.config.depth == 3
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 24.8


def test_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        HypernetConfig(feature_dim=32, hidden=(8, 8), width=30, heads=4)


def test_cls_features_are_the_pre_logits_the_head_reads(tiny_backbone, images):
    model = tiny_backbone.model
    feats = cls_features(model, images)
    assert feats.shape == (3, feature_dim(model))
    torch.testing.assert_close(model.head(feats), model(images))


def test_non_finite_weights_are_never_saved(tiny_backbone, sites, tmp_path):
    net = make_hypernet(tiny_backbone, sites)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(IntegrityError, match="non-finite weights"):
        net.save(tmp_path, tiny_backbone, sites)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_non_finite_weights_even_with_their_sha256_in_the_manifest(
    tiny_backbone, sites, tmp_path
):
    """Weights written by hand (sha256 updated to match) must not score neurons NaN."""
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    weights = tmp_path / WEIGHTS_FILE
    state = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(weights))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = sha256_file(weights)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"holds NaN or inf in .*must be finite"):
        Hypernetwork.load(tmp_path, tiny_backbone, sites)


def test_save_load_round_trip_gives_identical_scores(tiny_backbone, sites, images, tmp_path):
    net = make_hypernet(tiny_backbone, sites).eval()
    net.save(tmp_path, tiny_backbone, sites, training={"iterations": 3})
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    feats = cls_features(tiny_backbone.model, images)
    assert torch.equal(net(feats), loaded(feats))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["sites"] == sites.to_json() and manifest["training"] == {"iterations": 3}
    assert manifest["config"]["hidden"] == [m.hidden for m in sites.matrices]
    assert {p.name for p in tmp_path.iterdir()} == {MANIFEST_FILE, WEIGHTS_FILE}


def test_a_target_token_network_reads_the_target_and_round_trips(
    tiny_backbone, sites, images, tmp_path
):
    image_only = make_hypernet(tiny_backbone, sites).eval()
    net = image_only.with_target_token(seed=0).eval()
    assert net.config.target_token and not image_only.config.target_token
    model, feats = tiny_backbone.model, cls_features(tiny_backbone.model, images)
    head = model.get_classifier().weight
    rows = target_features(model, torch.tensor([1, 1, 4]))
    assert torch.equal(rows, head[[1, 1, 4]]) and not rows.requires_grad
    # the image-only network's weights are kept; the target changes the scores
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in image_only.state_dict().items())
    one, four = (net(feats, target_features(model, torch.full((3,), c))) for c in (1, 4))
    assert not torch.allclose(one, four)
    with pytest.raises(ValueError, match="reads the edit's target"):
        net(feats)
    with pytest.raises(ValueError, match="reads the edit's target labels"):
        net.mask_scores(model, images)
    averaged = net.mask_scores(model, images, torch.tensor([1, 1, 1]))
    assert torch.allclose(averaged, one.mean(dim=0))
    net.save(tmp_path, tiny_backbone, sites)
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert loaded.config.target_token and torch.equal(
        loaded(feats, target_features(model, torch.full((3,), 1))), one
    )


def test_row_ranks_span_minus_one_to_one_and_ignore_the_scale():
    norms = torch.tensor([[0.3, 5.0, 0.0, 1.0], [2.0, 1.0, 4.0, 3.0]])
    ranks = row_ranks(norms)
    expected = torch.tensor([[-1 / 3, 1.0, -1.0, 1 / 3], [-1 / 3, -1.0, 1.0, 1 / 3]])
    torch.testing.assert_close(ranks, expected)
    assert torch.equal(row_ranks(norms.square() * 1e-6), ranks)  # any monotone rescaling


@pytest.mark.parametrize("name", ["target_token", "gradient_input", "spill_input"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_an_optional_input_must_be_true_or_false(name, value):
    with pytest.raises(ValueError, match=f"{name} must be true or false"):
        HypernetConfig(32, (64, 64), width=32, heads=4, **{name: value})


def test_the_tail_feature_keeps_the_order_and_lifts_the_top_alone():
    values = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    tail, linear = rank_features(values, "tail"), rank_features(values, "linear")
    assert torch.equal(tail.argsort(dim=-1), linear.argsort(dim=-1))
    assert torch.equal(linear, row_ranks(values))
    # the smallest -1, the largest log(n) - 1, an exponential's quantiles centred near 0
    assert torch.allclose(tail.min(dim=-1).values, torch.full((3,), -1.0))
    top = torch.tensor(1000.0).log() - 1
    assert torch.allclose(tail.max(dim=-1).values, top.expand(3))
    assert tail.mean().abs() < 0.01
    ranked = tail[0].sort(descending=True).values
    assert ranked[9] > 3.6 > ranked[10]  # the top 1%
    assert ranked[499] < 0  # the median
    with pytest.raises(ValueError, match="unknown rank feature 'cube'"):
        rank_features(values, "cube")
    with pytest.raises(ValueError, match="rank_feature must be one of linear, tail"):
        HypernetConfig(32, (64, 64), width=32, heads=4, rank_feature="cube")


def test_a_tail_reading_network_round_trips_and_refuses_to_switch_trained_gates(
    tiny_backbone, sites, images, tmp_path
):
    parent = make_hypernet(tiny_backbone, sites).eval()
    net = parent.with_rank_feature("tail").with_gradient_input().eval()
    assert net.config.rank_feature == "tail" and parent.config.rank_feature == "linear"
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in parent.state_dict().items())
    with torch.no_grad():
        for gate in net.gates:
            torch.nn.init.normal_(gate.weight)
    norms = torch.rand(sites.n_entries, generator=torch.Generator().manual_seed(0))
    scores = net.mask_scores(tiny_backbone.model, images, gradient=norms)
    # the same gates read the linear rank otherwise
    linear = Hypernetwork(dataclasses.replace(net.config, rank_feature="linear")).eval()
    linear.load_state_dict(net.state_dict())
    assert not torch.allclose(
        linear.mask_scores(tiny_backbone.model, images, gradient=norms), scores
    )
    net.save(tmp_path, tiny_backbone, sites)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["config"]["rank_feature"] == "tail"
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert loaded.config.rank_feature == "tail"
    assert torch.equal(loaded.mask_scores(tiny_backbone.model, images, gradient=norms), scores)
    assert net.with_rank_feature("tail") is net
    with pytest.raises(ValueError, match="trained on 'tail' ranks: it cannot be switched"):
        net.with_rank_feature("linear")
    # a manifest from before the field reads linear ranks, as its network was trained to
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    del manifest["config"]["rank_feature"]
    assert HypernetConfig(**{**manifest["config"], "hidden": (1,)}).rank_feature == "linear"
    # a config the class refuses is a broken manifest, said in one line
    saved = (tmp_path / MANIFEST_FILE).read_text()
    for field, value in (("rank_feature", "cube"), ("gradient_input", "no"), ("colour", 1)):
        broken = json.loads(saved)
        broken["config"][field] = value
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(broken))
        with pytest.raises(ManifestError, match=f"{MANIFEST_FILE}: its config: .*{field}"):
            Hypernetwork.load(tmp_path, tiny_backbone, sites)
    broken = json.loads(saved)
    broken["config"]["rank_feature"] = "a" * 100_000  # quoted, but cut short
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(broken))
    with pytest.raises(ManifestError, match="rank_feature must be one of") as caught:
        Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert len(str(caught.value)) < 400


def test_a_gradient_reading_network_keeps_its_parents_weights_and_round_trips(
    tiny_backbone, sites, images, tmp_path
):
    parent = make_hypernet(tiny_backbone, sites).eval()
    net = parent.with_gradient_input().eval()
    assert net.config.gradient_input and not parent.config.gradient_input
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in parent.state_dict().items())
    feats = cls_features(tiny_backbone.model, images)
    norms = torch.rand(sites.n_entries, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for gate in net.gates:
            torch.nn.init.normal_(gate.weight)
    # one gradient for the edit's images, read by each of them
    averaged = net.mask_scores(tiny_backbone.model, images, gradient=norms)
    assert torch.allclose(averaged, net(feats, None, norms.expand(len(images), -1)).mean(dim=0))
    assert not torch.allclose(
        averaged, net.mask_scores(tiny_backbone.model, images, gradient=-norms)
    )
    with pytest.raises(ValueError, match="reads the edit's gradient norms"):
        net.mask_scores(tiny_backbone.model, images)
    net.save(tmp_path, tiny_backbone, sites)
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert torch.equal(loaded.mask_scores(tiny_backbone.model, images, gradient=norms), averaged)


def spill_network(backbone: Backbone, sites: Sites, images: torch.Tensor) -> Hypernetwork:
    net = make_hypernet(backbone, sites).with_spill_input(images).eval()
    with torch.no_grad():
        for gate in net.spill_gates:
            torch.nn.init.normal_(gate.weight)
    return net


def test_a_spill_reading_network_starts_as_its_parent_and_reads_the_spill_ranking(
    tiny_backbone, sites, images
):
    parent = make_hypernet(tiny_backbone, sites).eval()
    net = parent.with_spill_input(images).eval()
    assert net.config.spill_input and not parent.config.spill_input
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in parent.state_dict().items())
    spill = torch.rand(sites.n_entries, generator=torch.Generator().manual_seed(0))
    model = tiny_backbone.model
    # zero gates: its parent's scores, whatever the spill
    assert torch.equal(
        net.mask_scores(model, images, spill=spill), parent.mask_scores(model, images)
    )
    net = spill_network(tiny_backbone, sites, images)
    assert not torch.allclose(
        net.mask_scores(model, images, spill=spill), net.mask_scores(model, images, spill=-spill)
    )
    with pytest.raises(ValueError, match="reads the edit's fix per spill"):
        net.mask_scores(model, images)
    # the reference is its anchors' margin gradients on this model, taken once and kept
    reference = net.spill_reference(model, sites)
    assert reference.gradients[0].shape[0] == len(images)
    assert net.spill_reference(model, sites) is reference
    weight = sites.params(model)[0]
    saved = weight.detach().clone()
    # written in place and back (an evaluation applying a patch and reverting it): kept
    with torch.no_grad():
        weight.mul_(1.5)
        weight.copy_(saved)
    assert net.spill_reference(model, sites) is reference
    # weights written in place (a parent version, as a worker does): taken again, at them
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        moved = net.spill_reference(model, sites)
        assert moved is not reference
        assert not torch.allclose(moved.gradients[1], reference.gradients[1])
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    back = net.spill_reference(model, sites)  # back at the first weights: taken again, as then
    assert back is not moved
    torch.testing.assert_close(back.gradients[1], reference.gradients[1])


def test_a_spill_reading_network_round_trips_with_its_anchors(
    tiny_backbone, sites, images, tmp_path
):
    net = spill_network(tiny_backbone, sites, images)
    spill = torch.rand(sites.n_entries, generator=torch.Generator().manual_seed(0))
    net.save(tmp_path, tiny_backbone, sites)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["spill_anchors"]["file"] == ANCHORS_FILE
    assert manifest["spill_anchors"]["count"] == len(images)
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert torch.equal(loaded.anchor_images, images)
    model = tiny_backbone.model
    assert torch.equal(
        loaded.mask_scores(model, images, spill=spill), net.mask_scores(model, images, spill=spill)
    )


def test_a_spill_reading_network_is_never_saved_without_anchors(tiny_backbone, sites, tmp_path):
    net = make_hypernet(tiny_backbone, sites).with_spill_input()
    with pytest.raises(IntegrityError, match="without its anchors"):
        net.save(tmp_path, tiny_backbone, sites)
    assert not (tmp_path / MANIFEST_FILE).exists()


@pytest.mark.parametrize("damage", ["changed", "missing", "unlisted", "wrong shape", "miscounted"])
def test_load_refuses_damaged_spill_anchors(tiny_backbone, sites, images, tmp_path, damage):
    spill_network(tiny_backbone, sites, images).save(tmp_path, tiny_backbone, sites)
    anchors, manifest_path = tmp_path / ANCHORS_FILE, tmp_path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    expected: tuple[type[Exception], str] = (IntegrityError, "the file was changed")
    if damage == "changed":
        data = bytearray(anchors.read_bytes())
        data[-1] ^= 0xFF
        anchors.write_bytes(bytes(data))
    elif damage == "missing":
        anchors.unlink()
        expected = (IntegrityError, "needs its anchors")
    elif damage == "unlisted":
        del manifest["spill_anchors"]
        expected = (ManifestError, "names no spill-anchors.safetensors")
    elif damage == "miscounted":
        manifest["spill_anchors"]["count"] = 7
        expected = (IntegrityError, "holds 3 anchors, its manifest says 7")
    else:  # images of another input size, listed with their true sha256
        from safetensors.torch import save_file

        from models.store.manifest import sha256_file

        save_file({"images": torch.zeros(2, 1, 14, 14)}, str(anchors))
        manifest["spill_anchors"]["sha256"] = sha256_file(anchors)
        expected = (IntegrityError, r"shape \(1, 28, 28\), found \(2, 1, 14, 14\)")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(expected[0], match=expected[1]):
        Hypernetwork.load(tmp_path, tiny_backbone, sites)


def test_load_rejects_a_hypernetwork_trained_for_another_backbone(tiny_backbone, sites, tmp_path):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    other = dataclasses.replace(tiny_backbone, weights_sha256="ab" * 32)
    with pytest.raises(HypernetworkMismatchError, match="trained for backbone 'tiny-vit'"):
        Hypernetwork.load(tmp_path, other, sites)


def test_a_config_far_larger_than_the_weights_is_refused_before_allocating(
    tiny_backbone, sites, tmp_path
):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["config"] |= {"width": 16384, "depth": 64, "heads": 8, "mlp_hidden": 65536}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))  # ~200 G parameters
    done = run_capped(
        f"""
        from pathlib import Path
        import torch
        from models.backbones import load_backbone
        from models.errors import WeightsMismatchError
        from models.hypernet.network import Hypernetwork
        from tests.conftest import tiny_manifest
        torch.manual_seed(0)
        try:
            Hypernetwork.load(Path({str(tmp_path)!r}), load_backbone(tiny_manifest()))
        except WeightsMismatchError as exc:
            print("refused:", exc)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "Check the config in hypernet.json" in done.stdout


def test_a_depth_far_beyond_the_weights_is_refused_without_building_it(
    tiny_backbone, sites, tmp_path
):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["config"]["depth"] = 1_000_000
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    start = time.monotonic()
    with pytest.raises(WeightsMismatchError, match=r"this hypernetwork: building it made more"):
        Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert time.monotonic() - start < 2


def test_load_refuses_integer_weights_naming_a_tensor(tiny_backbone, sites, tmp_path):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    weights = tmp_path / WEIGHTS_FILE
    save_file({k: v.to(torch.int32) for k, v in load_file(str(weights)).items()}, str(weights))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = sha256_file(weights)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(WeightsMismatchError, match=r"holds '\S+' as I32 .*floating-point"):
        Hypernetwork.load(tmp_path, tiny_backbone, sites)


def test_load_rejects_other_sites(tiny_backbone, sites, tmp_path):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    other = Sites.for_model(tiny_backbone.model, blocks=(0, 1, 2))
    with pytest.raises(HypernetworkMismatchError, match=r"blocks\.0\.mlp"):
        Hypernetwork.load(tmp_path, tiny_backbone, other)


def test_load_rejects_a_model_without_the_recorded_sites(tiny_backbone, sites, tmp_path):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["sites"]["mlps"][0] = "blocks.9.mlp"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(HypernetworkMismatchError, match="not in this model"):
        Hypernetwork.load(tmp_path, tiny_backbone)


def test_load_rejects_changed_weights(tiny_backbone, sites, tmp_path):
    make_hypernet(tiny_backbone, sites).save(tmp_path, tiny_backbone, sites)
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Hypernetwork.load(tmp_path, tiny_backbone, sites)


def test_demo_loader_returns_none_when_nothing_is_shipped(tiny_backbone, tmp_path: Path):
    assert load_demo_hypernetwork(tiny_backbone, tmp_path / "absent") is None


def test_shipped_demo_hypernetwork_fits_the_demo_backbone_and_is_input_dependent(demo_backbone):
    from models.hypernet.metatrain import mask_iou
    from models.hypernet.network import DEMO_DIR, read_manifest
    from models.worlds import demo as demo_world

    net = load_demo_hypernetwork(demo_backbone)
    assert net is not None, "not shipped: run `vitedit hypernet train --world demo`"
    manifest = read_manifest(DEMO_DIR)
    assert manifest["backbone"]["weights_sha256"] == demo_backbone.weights_sha256
    assert (DEMO_DIR / WEIGHTS_FILE).stat().st_size < 5_000_000
    images = demo_world.normalise(demo_world.load_world().heldout_images[:32])
    scores = net(cls_features(demo_backbone.model, images))
    assert mask_iou(scores, rho=0.1) < 0.9, "the top-10% mask barely depends on the image"


def test_cli_meta_trains_on_the_demo_world_in_short_mode(demo_backbone, tmp_path):
    from cli.main import main

    out = tmp_path / "hypernet"
    args = ["hypernet", "train", "--world", "demo", "--out", str(out), "--iterations", "1"]
    args += ["--batch", "2", "--outer-steps", "1", "--inner-steps", "2"]
    assert main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert Hypernetwork.load(out, demo_backbone).config.width == 128


def test_cli_meta_trains_a_spill_reading_network_that_keeps_its_anchors(demo_backbone, tmp_path):
    from cli.main import main

    out = tmp_path / "hypernet"
    args = ["hypernet", "train", "--world", "demo", "--out", str(out), "--iterations", "1"]
    args += ["--batch", "2", "--target-from", "edits", "--inner-optimiser", "rmsprop"]
    args += ["--candidates", "3", "--edit-steps", "4", "--spill-input"]
    with pytest.raises(SystemExit, match="--spill-input reads fix per spill on clean anchors"):
        main([*args, "--checkpoint-dir", str(tmp_path / "ck")])
    assert main([*args, "--spill-anchors", "8", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    loaded = Hypernetwork.load(out, demo_backbone)
    assert loaded.config.spill_input and loaded.anchor_images.shape[0] == 8
