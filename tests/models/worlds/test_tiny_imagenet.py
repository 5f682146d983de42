"""The Tiny-ImageNet world: reading the official layout, training that resumes, the derived benchmark."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbones import create_model, load_backbone
from models.errors import DataError, IntegrityError
from models.store.manifest import BackboneManifest, read_json, write_json_atomic
from models.worlds import tiny_imagenet as tin
from models.worlds import tiny_imagenet_benchmark as tib
from models.worlds.training import TrainConfig, Trainer, cutmix_batch, mix_batch, mixup_batch

WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]


def fake_tiny_imagenet(root: Path, size: int = 64, train: int = 20, val: int = 8) -> Path:
    """The official layout with a few JPEGs per class: a colour per class plus noise."""
    rng = np.random.default_rng(0)
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text(
        "".join(f"{w}\tclass {i}, other name\n" for i, w in enumerate(WNIDS))
    )

    def image(c: int) -> Image.Image:
        base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.int16)
        pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    lines = []
    for c, w in enumerate(WNIDS):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(train):
            image(c).save(folder / f"{w}_{i}.JPEG")
        for i in range(val):
            name = f"val_{c * val + i}.JPEG"
            (root / "val" / "images").mkdir(parents=True, exist_ok=True)
            image(c).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t{size}\t{size}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_manifest() -> BackboneManifest:
    m = tin.manifest([f"class {i}" for i in range(4)], weights=None, stem="patch")
    overrides = {**m.overrides, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4}
    return BackboneManifest(**{**m.__dict__, "overrides": overrides})


def test_every_stem_gives_the_same_token_grid_and_ffn_sites() -> None:
    from models.hypernet.cutmix import patch_grid

    names = [f"class {i}" for i in range(4)]
    small = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4}
    models = {}
    for stem in tin.STEMS:
        m = tin.manifest(names, weights=None, stem=stem)
        models[stem] = create_model(
            BackboneManifest(**{**m.__dict__, "overrides": {**m.overrides, **small}})
        )
    assert set(models) == {"patch", "conv", "conv-stage", "conv-stages"}
    assert not hasattr(models["conv"].patch_embed.backbone, "stages")  # the stem alone
    stage = models["conv-stage"].patch_embed.backbone.stages  # and with a ResNetV2 stage
    assert len(stage) == 1 and len(stage[0].blocks) == 2
    assert models["conv-stage"].patch_embed.proj.in_channels == 256
    stages = models["conv-stages"].patch_embed.backbone.stages  # or two, each of 2 blocks
    assert [len(s.blocks) for s in stages] == [2, 2]
    assert models["conv-stages"].patch_embed.proj.in_channels == 512
    assert models["conv-stages"].patch_embed.proj.kernel_size == (1, 1)  # a token per cell
    for model in models.values():
        assert patch_grid(model) == (8, 4)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    fc1 = {n: p.shape for n, p in models["patch"].named_parameters() if ".mlp." in n}
    for stem in ("conv", "conv-stage", "conv-stages"):
        assert fc1 == {n: p.shape for n, p in models[stem].named_parameters() if ".mlp." in n}
    with pytest.raises(ValueError, match="stem must be one of"):
        tin.manifest(names, stem="resnet")
    with pytest.raises(ValueError, match="4x4 map: it cannot give 64 tokens"):
        tin.manifest(names, stem="conv-stages", tokens=64)


@pytest.mark.parametrize("size", [64, 32])
def test_reader_takes_the_official_layout_at_64_or_32_px(tmp_path: Path, size: int) -> None:
    root = fake_tiny_imagenet(tmp_path, size=size, train=3, val=2)
    x, y = tin.read_split(root, "train")
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    xv, yv = tin.read_split(root, "val")
    assert xv.shape == (8, 32, 32, 3) and yv.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert tin.read_classes(root)[1] == ["class 0", "class 1", "class 2", "class 3"]
    files, _ = tin.split_files(root, "val")
    assert np.array_equal(tin.decode(files[0].read_bytes()), xv[0])  # bytes decode like files


def test_train_indices_pick_the_same_images_per_class_for_a_seed() -> None:
    y = np.repeat(np.arange(4), 10)
    a = tin.train_indices(y, 7, seed=0)
    assert np.array_equal(a, tin.train_indices(y, 7, seed=0))
    assert np.bincount(y[a]).tolist() == [7, 7, 7, 7]
    assert not np.array_equal(a, tin.train_indices(y, 7, seed=1))


def test_augment_crops_from_the_reflect_padded_image_and_keeps_shape() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out = tin.augment(x, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    found = [
        any(
            torch.equal(out[i], c[:, dy : dy + 32, dx : dx + 32])
            for dy in range(9)
            for dx in range(9)
            for c in (padded[i], padded[i].flip(-1))
        )
        for i in range(2)
    ]
    assert all(found)


def test_resized_crop_at_full_area_is_the_image_or_its_mirror(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.rand(8, 3, 32, 32)
    monkeypatch.setattr(tin, "RESIZED_AREA", (1.0, 1.0))
    monkeypatch.setattr(tin, "RESIZED_ASPECT", (1.0, 1.0))
    out = tin.augment_resized(x, torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x, strict=True)]
    kept = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # one or the other, each
    assert any(mirrored) and any(kept)


def test_resized_crop_zooms_into_the_image_and_repeats_from_its_generator() -> None:
    # a horizontal ramp: a crop of less than the full width spans a narrower range of values
    x = torch.linspace(0, 1, 32).expand(64, 3, 32, 32).contiguous()
    out = tin.augment_resized(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1  # resampled inside the image, never beyond it
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # right edge minus left: negative when mirrored
    assert spans.abs().max() <= 1 + 1e-6 and spans.abs().min() < 0.75  # areas down to 25%
    assert (spans < 0).any() and (spans > 0).any()
    again = tin.augment_resized(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_prepare_and_augment_work_on_the_device_of_their_batch() -> None:
    # the meta device holds shapes only: any CPU constant or index mixed into a batch of another
    # device (a GPU's, in training) raises there, as it would on cuda
    x = torch.zeros(4, 32, 32, 3, dtype=torch.uint8, device="meta")
    for crop in (tin.augment, tin.augment_resized):
        out = crop(tin.to_input(x), torch.Generator().manual_seed(0))
        assert out.device.type == "meta" and out.shape == (4, 3, 32, 32)


def test_training_interrupted_by_its_budget_resumes_to_the_same_weights(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=gen)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(create_model(tiny_manifest()), cfg, tin.to_input, tin.augment)

    straight = trainer()
    assert straight.fit(x, y, x[:8], y[:8]).finished
    first = trainer()
    stopped = first.fit(x, y, x[:8], y[:8], checkpoint=tmp_path, time_budget=0.0)
    assert not stopped.finished and stopped.steps == 1
    resumed = trainer()
    assert resumed.resume(tmp_path) and resumed.step == 1
    assert resumed.fit(x, y, x[:8], y[:8], checkpoint=tmp_path).finished
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    other = Trainer(
        create_model(tiny_manifest()), TrainConfig(epochs=2, lr=5e-3), tin.to_input, tin.augment
    )
    with pytest.raises(Exception, match="another config"):
        other.resume(tmp_path)


def test_training_records_top1_on_the_training_images_it_is_given() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (32,), generator=gen)

    def trainer() -> Trainer:
        cfg = TrainConfig(epochs=2, batch_size=16)
        return Trainer(create_model(tiny_manifest()), cfg, tin.to_input, tin.augment)

    fitted = trainer()
    history = fitted.fit(x, y, x[:8], y[:8], fit_eval=(x[8:], y[8:])).history
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_accuracy"] == fitted.accuracy(x[8:], y[8:])  # the final weights'
    assert "train_accuracy" not in trainer().fit(x, y, x[:8], y[:8]).history[0]  # none given


def test_a_resume_may_change_the_schedule_length_and_records_where(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=gen)
    first = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=3, batch_size=16),
        tin.to_input,
        tin.augment,
    )
    stopped = first.fit(x, y, x[:8], y[:8], checkpoint=tmp_path, stop_at_step=5)
    assert not stopped.finished and stopped.steps == 5
    shorter = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=2, batch_size=16),
        tin.to_input,
        tin.augment,
    )
    assert shorter.resume(tmp_path)
    assert shorter.fit(x, y, x[:8], y[:8], checkpoint=tmp_path).steps == 8  # 2 epochs x 4 steps
    assert shorter.schedule == [{"from_step": 0, "epochs": 3}, {"from_step": 5, "epochs": 2}]
    assert read_json(tmp_path / "train.json")["schedule"] == shorter.schedule


def test_width_sets_the_ffn_sites_and_must_fit_the_heads() -> None:
    names = [f"class {i}" for i in range(4)]
    m = tin.manifest(names, weights=None, width=192)
    assert m.overrides["embed_dim"] == 192 and m.overrides["num_heads"] == 4
    with pytest.raises(ValueError, match="multiple of the 4 heads"):
        tin.manifest(names, width=130)


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_tokens_set_the_grid_of_either_stem_and_leave_the_sites(stem: str) -> None:
    names = [f"class {i}" for i in range(4)]
    grids = {}
    for tokens in (16, 64):
        model = create_model(tin.manifest(names, weights=None, stem=stem, tokens=tokens))
        grids[tokens] = model.patch_embed.grid_size
        out = model(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 200) and model.blocks[2].mlp.fc1.out_features == 512
    assert grids == {16: (4, 4), 64: (8, 8)}
    with pytest.raises(ValueError, match="tokens must be 16"):
        tin.manifest(names, tokens=32)


def test_bf16_training_learns_and_resumes_a_checkpoint_older_than_the_option(
    tmp_path: Path,
) -> None:
    """bf16 autocast trains (the weights stay fp32); a checkpoint written before TrainConfig had
    ``precision`` resumes as fp32, its value then."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=gen)
    torch.manual_seed(0)
    bf16 = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=1, batch_size=16, precision="bf16"),
        tin.to_input,
        tin.augment,
    )
    before = {k: v.clone() for k, v in bf16.model.state_dict().items()}
    assert bf16.fit(x, y, x[:8], y[:8]).finished
    after = bf16.model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)

    old = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=2, batch_size=16),
        tin.to_input,
        tin.augment,
    )
    old.fit(x, y, x[:8], y[:8], checkpoint=tmp_path, stop_at_step=2)
    state = read_json(tmp_path / "train.json")
    del state["config"]["precision"]  # as written before the option existed
    write_json_atomic(tmp_path / "train.json", state)
    again = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=2, batch_size=16),
        tin.to_input,
        tin.augment,
    )
    assert again.resume(tmp_path) and again.step == 2
    bf = Trainer(
        create_model(tiny_manifest()),
        TrainConfig(epochs=2, batch_size=16, precision="bf16"),
        tin.to_input,
        tin.augment,
    )
    with pytest.raises(Exception, match="another config"):
        bf.resume(tmp_path)


def test_cutmix_pastes_one_box_of_the_next_image_and_weighs_labels_by_area() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    for _ in range(20):
        mixed, own = cutmix_batch(x, gen)
        pasted = mixed != x  # every image differs from the next, so the box shows everywhere
        assert torch.equal(mixed[pasted], x.roll(1, 0)[pasted])
        area = pasted[0, 0].float().mean().item()
        assert own == pytest.approx(1 - area) and torch.equal(pasted[0], pasted[3])


def test_mixup_blends_each_image_with_the_next_and_weighs_labels_alike() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    weights = []
    for _ in range(50):
        mixed, own = mixup_batch(x, gen)
        torch.testing.assert_close(mixed, own * x + (1 - own) * x.roll(1, 0))
        weights.append(own)
    assert 0.0 <= min(weights) < 0.2 and 0.8 < max(weights) <= 1.0  # uniform over [0, 1]


def test_mix_batch_deals_batches_to_cutmix_and_mixup_by_their_shares() -> None:
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    gen = torch.Generator().manual_seed(0)
    kinds = {"cutmix": 0, "mixup": 0, "none": 0}
    for _ in range(2000):
        mixed = mix_batch(x, TrainConfig(cutmix=0.25, mixup=0.5), gen)
        if mixed is None:
            kinds["none"] += 1
        elif (mixed[0][0] == mixed[0][0, 0, 0, 0]).all():  # a blend of two flat images is flat
            kinds["mixup"] += 1
        else:  # a pasted box is not (its area is never 0 or all of the image here)
            kinds["cutmix"] += 1
    assert abs(kinds["cutmix"] - 500) < 80 and abs(kinds["mixup"] - 1000) < 100
    assert abs(kinds["none"] - 500) < 80
    # no mixing draws nothing; CutMix alone draws what it always drew (older recipes replay)
    gen = torch.Generator().manual_seed(5)
    assert mix_batch(x, TrainConfig(), gen) is None
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())
    old, new = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(20):
        expected = cutmix_batch(x, old) if torch.rand((), generator=old) < 0.5 else None
        got = mix_batch(x, TrainConfig(cutmix=0.5), new)
        assert (got is None) == (expected is None)
        if got is not None and expected is not None:
            assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


@pytest.mark.parametrize("mix", [{"cutmix": 0.5}, {"cutmix": 0.25, "mixup": 0.5}])
def test_training_with_cutmix_or_mixup_resumes_to_the_same_weights(
    tmp_path: Path, mix: dict[str, float]
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=gen)
    cfg = TrainConfig(epochs=1, batch_size=16, **mix)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(create_model(tiny_manifest()), cfg, tin.to_input, tin.augment)

    straight = trainer()
    assert straight.fit(x, y, x[:8], y[:8]).finished
    trainer().fit(x, y, x[:8], y[:8], checkpoint=tmp_path, stop_at_step=2)
    resumed = trainer()
    assert resumed.resume(tmp_path) and resumed.fit(x, y, x[:8], y[:8]).finished
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = fake_tiny_imagenet(tmp_path_factory.mktemp("tin"), size=32, train=20, val=10)
    torch.manual_seed(0)
    backbone = load_backbone(tiny_manifest())  # random init: most images are failures
    cfg = tib.DeriveConfig(
        train_per_class=12,
        min_group=2,
        max_group=5,
        natural_groups=4,
        shift_groups_per_shift=1,
        locality_size=4,
        locality_class_cap=0.5,
        heldout_size=4,
        pool_size=8,
    )
    out = tmp_path_factory.mktemp("world") / "world.npz"
    return out, tib.derive_world(backbone, root, cfg, out)


def test_derived_groups_are_dealt_into_tuning_and_test_halves(derived) -> None:
    _, summary = derived
    for kind in ("natural", "shift"):
        splits = [g["split"] for g in summary["groups"].values() if g["kind"] == kind]
        assert abs(splits.count("tuning") - splits.count("test")) <= 1
    assert summary["bench_pool"] == {"images": 72, "train_held_out": 32, "val": 40}


def test_locality_set_respects_the_class_cap(derived) -> None:
    _, summary = derived
    hist = summary["locality"]["histogram"]
    assert sum(hist.values()) == 4 and max(hist.values()) <= 2  # cap 0.5 of 4
    assert summary["locality"]["largest_class_share"] <= 0.5


def _gaps(gaps: list[float], labels: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities over 3 classes whose top-1 (the label) leads the top-2 by ``gaps``."""
    probs = torch.full((len(gaps), 3), 0.02)
    for i, (g, c) in enumerate(zip(gaps, labels, strict=True)):
        probs[i, c], probs[i, (c + 1) % 3] = (1 + g) / 2 - 0.01, (1 - g) / 2 - 0.01
    return probs, np.array(labels)


def test_sensitive_set_takes_the_smallest_gaps_or_a_seeded_sample_below_a_bound() -> None:
    gaps = [0.30, 0.01, 0.04, 0.02, 0.20, 0.03, 0.005, 0.045]
    probs, y = _gaps(gaps, [0, 1, 2, 0, 1, 2, 0, 1])
    y[4] = 2  # a wrong prediction never enters
    exclude = np.array([3])  # an image of a group never enters
    smallest = tib.DeriveConfig(locality_size=3, locality_class_cap=1.0)
    assert tib.sensitive_set(probs, y, exclude, smallest).tolist() == [6, 1, 5]
    below = smallest
    drawn = tib.sensitive_set(probs, y, exclude, below, max_gap=0.05)
    assert set(drawn) <= {1, 2, 5, 6, 7} and len(set(drawn)) == 3
    assert drawn.tolist() == tib.sensitive_set(probs, y, exclude, below, 0.05).tolist()  # seeded
    other = [
        tib.sensitive_set(probs, y, exclude, replace(below, seed=s), 0.05).tolist()
        for s in range(8)
    ]
    assert len({tuple(d) for d in other}) > 1  # a sample, not the smallest gaps again
    with pytest.raises(DataError, match="under the class cap and the gap bound"):
        tib.sensitive_set(probs, y, exclude, replace(below, locality_size=6), 0.05)


def test_the_reference_locality_set_is_its_own_checked_file(derived) -> None:
    out, summary = derived
    reference = summary["locality_reference"]
    assert reference["size"] == 4 and reference["max_gap_used"] < 0.05
    assert reference["file"] == tib.REFERENCE_FILE and (out.parent / tib.REFERENCE_FILE).is_file()
    assert max(reference["histogram"].values()) <= 2  # the same class cap
    shipped, drawn = tib.load_world(out), tib.load_world(out, locality="reference")
    assert drawn.locality_array.shape == (4, 32, 32, 3)
    assert [g.name for g in drawn.benchmark.groups] == [g.name for g in shipped.benchmark.groups]
    assert (drawn.heldout_images == shipped.heldout_images).all()  # only the locality differs
    with pytest.raises(DataError, match="unknown locality set"):
        tib.load_world(out, locality="largest")
    changed = out.parent / tib.REFERENCE_FILE
    kept = changed.read_bytes()
    changed.write_bytes(kept + b"x")  # its sha256 is checked against world.json too
    with pytest.raises(IntegrityError):
        tib.load_world(out, locality="reference")
    changed.write_bytes(kept)


def test_world_file_round_trips_and_refuses_a_changed_file(derived) -> None:
    out, summary = derived
    world = tib.load_world(out)
    assert world.pool.shape == (8, 32, 32, 3) and world.heldout_images.shape == (4, 32, 32, 3)
    assert world.locality_array.shape == (4, 32, 32, 3)
    assert {g.name: g.split for g in world.benchmark.groups} == {
        n: g["split"] for n, g in summary["groups"].items()
    }
    assert read_json(out.with_name("world.json"))["sha256"] == summary["sha256"]
    out.write_bytes(out.read_bytes() + b"x")
    with pytest.raises(IntegrityError):
        tib.load_world(out)


@pytest.mark.parametrize(
    ("options", "recipe", "timm_name"),
    [
        ([], ("pad", 0.0, 0.0), "vit_tiny_r_s16_p8_224"),
        (
            ["--crop", "resized", "--drop-path", "0.1", "--mixup", "0.5", "--stem", "conv-stage"],
            ("resized", 0.1, 0.5),
            "vitedit_hybrid_r2",
        ),
        (["--stem", "conv-stages"], ("pad", 0.0, 0.0), "vitedit_hybrid_r22"),
    ],
    ids=["shipped-recipe", "resized-crop-stochastic-depth-mixup-and-a-conv-stage", "conv-stages"],
)
def test_world_build_cli_extracts_a_tarball_and_trains_a_resumable_backbone(
    tmp_path: Path, options: list[str], recipe: tuple[str, float, float], timm_name: str
) -> None:
    from cli.main import main

    root = fake_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200", size=32, train=10, val=2)
    archive = tmp_path / "tin.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="tiny-imagenet-200")
    out, work = tmp_path / "out", tmp_path / "work"
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "world",
                "build",
                "tiny-imagenet",
                "--root",
                str(archive),
                "--work",
                str(work),
                "--out",
                str(out),
                "--stage",
                "backbone",
                "--epochs",
                "1",
                "--train-per-class",
                "8",
                "--batch-size",
                "8",
                "--lr",
                "1e-3",
                "--warmup-epochs",
                "0.5",
                "--device",
                "cpu",
                *options,
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    manifest = BackboneManifest.read(out / "backbone.json")
    recorded = manifest.extra["train_config"]
    assert (recorded["crop"], recorded["drop_path"], recorded["mixup"]) == recipe
    assert "drop_path_rate" not in manifest.overrides  # stochastic depth is training's alone
    assert manifest.timm_name == timm_name
    assert manifest.extra["train_config"]["lr"] == 1e-3 and manifest.extra["train_device"] == "cpu"
    assert manifest.extra["train_config"]["warmup_epochs"] == 0.5
    assert manifest.extra["train_per_class"] == 8 and len(manifest.extra["history"]) == 1
    assert 0.0 <= manifest.extra["history"][0]["train_accuracy"] <= 1.0  # its own images' top-1
    assert load_backbone(manifest).weights_sha256 == manifest.weights_sha256
    assert (work / "dataset" / "tiny-imagenet-200" / "wnids.txt").exists()
    assert read_json(work / "backbone-checkpoint" / "train.json")["step"] == 4  # 32 images / 8


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--cutmix", "5"], "--cutmix is a share"),
        (["--mixup", "-0.1"], "--mixup is a share"),
        (["--mixup", "nan"], "--mixup is a share"),
        (
            ["--mixup", "0.6", "--cutmix", "0.5"],
            r"--mixup is a share of batches in \[0, 1 - --cutmix\] = \[0, 0.5\]",
        ),
        (["--width", "-4"], "multiple of the 4 heads"),
        (["--stem", "conv-stages", "--tokens", "64"], "--tokens 16 only, got 64"),
        (["--drop-path", "1"], "--drop-path is a drop rate"),
        (["--drop-path", "nan"], "--drop-path is a drop rate"),
        (["--lr", "nan"], "--lr must be in"),
        (["--lr", "0"], "--lr must be in"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be between 0 and 1e6"),
        (["--warmup-epochs", "nan"], "--warmup-epochs must be between 0 and 1e6"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be between 0 and 1e6"),
        (["--warmup-epochs", "1e308"], "--warmup-epochs must be between 0 and 1e6"),
        (["--device", "gpu0"], "not a torch device"),
        (["--device", "mps"], "only cpu and cuda"),
    ],
)
def test_world_build_refuses_unusable_training_options(
    tmp_path: Path, option: list[str], message: str
) -> None:
    from cli.main import main

    with pytest.raises(SystemExit, match=message):
        main(["world", "build", "tiny-imagenet", "--root", str(tmp_path), *option])
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


def test_world_build_refuses_a_root_file_that_is_not_the_archive(tmp_path: Path) -> None:
    from cli.main import main

    (tmp_path / "notes.txt").write_text("not a tarball")
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"not a readable \.tar\.gz of the dataset"):
        main(
            [
                "world",
                "build",
                "tiny-imagenet",
                "--root",
                str(tmp_path / "notes.txt"),
                "--work",
                str(work),
            ]
        )
    assert not (work / "dataset" / ".extracted").exists()  # the next run tries again


def test_cutmix_and_mixup_may_share_every_batch() -> None:
    from cli.main import build_parser
    from cli.world import _check_options

    for cutmix, mixup in [(0.9, 0.1), (0.7, 0.3), (0.5, 0.5), (0.0, 1.0)]:  # 1 - 0.9 < 0.1
        argv = ["world", "build", "tiny-imagenet", "--cutmix", str(cutmix), "--mixup", str(mixup)]
        _check_options(build_parser().parse_args(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_world_build_refuses_a_cuda_device_it_cannot_see(tmp_path: Path) -> None:
    from cli.main import main

    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        main(["world", "build", "tiny-imagenet", "--root", str(tmp_path), "--device", "cuda"])
    assert list(tmp_path.iterdir()) == []


def test_the_demo_world_refuses_a_device_it_does_not_train_on(tmp_path: Path) -> None:
    from cli.main import main

    with pytest.raises(SystemExit, match="the demo world trains on the CPU"):
        main(["world", "build", "demo", "--out", str(tmp_path), "--device", "cuda"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option",
    [
        ["--cutmix", "0.5"],
        ["--mixup", "0.5"],
        ["--crop", "resized"],
        ["--drop-path", "0.1"],
        ["--width", "192"],
        ["--root", "data.tar.gz"],
        ["--time-budget", "60"],
    ],
)
def test_the_demo_world_refuses_options_only_tiny_imagenet_uses(
    tmp_path: Path, option: list[str]
) -> None:
    from cli.main import main

    with pytest.raises(SystemExit, match=f"{option[0]}: tiny-imagenet only"):
        main(["world", "build", "demo", "--out", str(tmp_path), *option])
    assert list(tmp_path.iterdir()) == []


def test_the_demo_benchmark_derives_from_the_backbone_in_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it used to load the shipped backbone whatever --out named
    from cli.main import main

    code = main(["world", "build", "demo", "--stage", "benchmark", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: manifest {tmp_path / 'backbone.json'} does not exist"
    )
    assert list(tmp_path.iterdir()) == []
