"""Natural-failure episodes: targets on the true label, seeded draws, the set's file, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.backbones import Backbone
from models.errors import DataError
from models.hypernet.cutmix import TensorPool
from models.hypernet.failures import (
    FailureSampler,
    FailureSet,
    failures_of,
    raised_target,
    sibling_index,
    uniform_target,
)
from models.hypernet.metatrain import MetaTrainConfig, MetaTrainer, build_hypernetwork, meta_train
from models.hypernet.network import Hypernetwork
from models.sites import Sites

T = 5.0


def images_and_labels(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.arange(n) % 10


def test_the_raised_target_moves_only_the_label_to_the_edits_stop_ce():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9, 3])
    target = raised_target(logits, labels, stop_ce=0.5)
    ce = torch.nn.functional.cross_entropy(target, labels, reduction="none")
    torch.testing.assert_close(ce, torch.full((4,), 0.5))
    assert torch.equal(target.argmax(-1), labels)
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(4), labels] = False
    assert torch.equal(target[others], logits[others])  # every other class keeps its logit


def test_the_uniform_target_puts_the_confidence_on_the_label_at_temperature_t():
    target = uniform_target(torch.tensor([2, 7]), 200, T, confidence=0.9)
    p = (target / T).softmax(-1)
    torch.testing.assert_close(p[[0, 1], [2, 7]], torch.tensor([0.9, 0.9]))
    assert target[0, 2] == pytest.approx(T * math.log(9 * 199))
    with pytest.raises(ValueError, match="confidence"):
        uniform_target(torch.tensor([0]), 10, T, confidence=0.05)


@pytest.mark.parametrize("target", ["raise", "uniform"])
def test_sampler_shapes_and_targets_are_the_true_labels(tiny_backbone: Backbone, target):
    x, y = images_and_labels()
    sampler = FailureSampler(tiny_backbone.model, x, y, T, seed=3, target=target)
    episodes = sampler.sample(5)
    assert episodes.mixed.shape == (5, 1, 28, 28) and episodes.clean_logits.shape == (5, 10)
    assert torch.equal(episodes.mixed, episodes.clean)  # x~ is the failure itself
    drawn = [int((x == img).flatten(1).all(1).nonzero()) for img in episodes.mixed]
    assert torch.equal(episodes.targets, y[drawn])
    assert episodes.boxes.shape == (5, 4) and len(sampler.pool) == 12


def test_sampler_is_reproducible_from_its_seed(tiny_backbone: Backbone):
    x, y = images_and_labels()
    a = FailureSampler(tiny_backbone.model, x, y, T, seed=7).sample(20)
    b = FailureSampler(tiny_backbone.model, x, y, T, seed=7).sample(20)
    c = FailureSampler(tiny_backbone.model, x, y, T, seed=8).sample(20)
    assert torch.equal(a.mixed, b.mixed) and torch.equal(a.clean_logits, b.clean_logits)
    assert not torch.equal(a.mixed, c.mixed)


def test_sampler_applies_the_transform_to_stored_images(tiny_backbone: Backbone):
    raw = torch.randint(0, 256, (6, 28, 28, 1), dtype=torch.uint8)
    sampler = FailureSampler(
        tiny_backbone.model,
        raw,
        torch.zeros(6),
        T,
        transform=lambda u: u.permute(0, 3, 1, 2).float() / 255.0,
    )
    assert sampler.sample(2).mixed.dtype == torch.float32
    with pytest.raises(DataError):
        FailureSampler(tiny_backbone.model, raw, torch.zeros(5), T)


def test_failures_of_keeps_the_misclassified_and_the_set_round_trips(tmp_path):
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    labels = np.array([0, 1, 2, 1, 0])
    preds = torch.tensor([0, 2, 2, 0, 1])

    def fn(x: np.ndarray) -> torch.Tensor:  # one-hot logits of ``preds`` for the rows asked
        start = int(np.flatnonzero((images == x[0]).all(axis=(1, 2, 3)))[0])
        return torch.nn.functional.one_hot(preds[start : start + len(x)], 3).float()

    wrong, predicted = failures_of(fn, images, labels, batch=2)
    assert wrong.tolist() == [1, 3, 4] and predicted.tolist() == [2, 0, 1]
    fs = FailureSet(images[wrong], labels[wrong], predicted, wrong, {"seed": 0})
    fs.save(tmp_path / "f.npz")
    back = FailureSet.load(tmp_path / "f.npz")
    assert np.array_equal(back.images, fs.images) and back.labels.tolist() == [1, 1, 0]
    assert back.meta == {"seed": 0} and len(back) == 3
    with pytest.raises(DataError, match="not a failure set"):
        FailureSet.load(tmp_path / "missing.npz")


def test_meta_training_on_failures_records_its_episode_source(tiny_backbone: Backbone, tmp_path):
    x, y = images_and_labels()
    sites = Sites.for_model(tiny_backbone.model)
    cfg = MetaTrainConfig(
        iterations=2, batch=3, outer_steps=2, inner_steps=2, inner_lr=0.5, schedule_iterations=4
    )
    sampler = FailureSampler(tiny_backbone.model, x, y, cfg.temperature, seed=cfg.seed)
    source = {"kind": "failures", "size": 12, "target": "raise"}
    _, history = meta_train(
        tiny_backbone,
        sites,
        None,
        cfg,
        tmp_path,
        checkpoint_every=0,
        log_every=1,
        sampler=sampler,
        extra={"episode_source": source},
    )
    assert len(history) == 2 and all(np.isfinite(h["kl_last"]) for h in history)
    loaded = Hypernetwork.load(tmp_path, tiny_backbone, sites)
    assert loaded.episode_source == source  # a bench run names it with its where2edit points
    assert loaded.training_episodes == 6


def test_the_locality_terms_anchors_come_from_the_clean_pool_not_the_failures(
    tiny_backbone: Backbone,
):
    # sparing other misclassified images would fight the edit's generalization
    x, y = images_and_labels()
    sites = Sites.for_model(tiny_backbone.model)
    cfg = MetaTrainConfig(batch=2, locality=1.0, anchors=2, anchor_draws=2)
    clean = TensorPool(torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    sampler = FailureSampler(tiny_backbone.model, x, y, cfg.temperature, seed=cfg.seed)
    hypernet = build_hypernetwork(tiny_backbone.model, sites, seed=0)
    trainer = MetaTrainer(tiny_backbone, sites, clean, hypernet, cfg, sampler=sampler)
    anchors = trainer._anchors()
    with torch.no_grad():
        from_pool, from_failures = tiny_backbone.model(clean.images), tiny_backbone.model(x)
    for row in anchors.clean_logits.flatten(0, 1):
        assert torch.isclose(row, from_pool, atol=1e-5).all(dim=1).any()
        assert not torch.isclose(row, from_failures, atol=1e-5).all(dim=1).any()
    with pytest.raises(ValueError, match="pool of clean images"):
        MetaTrainer(tiny_backbone, sites, None, hypernet, cfg, sampler=sampler)


def test_each_failures_sibling_is_the_next_of_its_true_and_predicted_class():
    labels = torch.tensor([1, 2, 1, 1, 2, 3, 1])
    predictions = torch.tensor([0, 0, 0, 5, 0, 0, 0])
    # groups (1, 0): 0, 2, 6; (2, 0): 1, 4; (1, 5): 3 alone; (3, 0): 5 alone
    assert sibling_index(labels, predictions).tolist() == [2, 4, 6, 3, 1, 5, 0]


def test_siblings_leave_the_episode_stream_as_it_was(tiny_backbone: Backbone):
    x, _ = images_and_labels()
    y = torch.arange(12) % 5
    predictions = (y + 1) % 5
    predictions[0] = 7  # failure 0 alone in its pair; every other pairs up with its like
    plain = FailureSampler(tiny_backbone.model, x, y, T, seed=4).sample(8)
    paired_sampler = FailureSampler(tiny_backbone.model, x, y, T, seed=4, predictions=predictions)
    paired = paired_sampler.sample(8)
    assert plain.siblings is None and plain.has_sibling is None
    torch.testing.assert_close(paired.mixed, plain.mixed)
    torch.testing.assert_close(paired.clean_logits, plain.clean_logits)
    sib = paired_sampler.sibling
    assert (sib == torch.arange(12)).tolist() == [True] + [False] * 11
    for image, sibling, has in zip(paired.mixed, paired.siblings, paired.has_sibling, strict=True):
        i = int(torch.nonzero((x == image).flatten(1).all(dim=1))[0])
        torch.testing.assert_close(sibling, x[sib[i]])
        assert bool(has) == (sib[i] != i)
        assert y[sib[i]] == y[i] and predictions[sib[i]] == predictions[i]
    with pytest.raises(DataError, match="3 predictions for 12"):
        FailureSampler(tiny_backbone.model, x, y, T, predictions=predictions[:3])
