"""Targets from real edits (``MetaTrainConfig.target_source="edits"``): each candidate edit is the
product's edit, the choice follows the rule, and meta-training on them runs and logs them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.editing.registry import EditTask, get_editor
from models.editing.saliency import SaliencyConfig, gradient_scores
from models.forward import SplitForward
from models.hypernet.cutmix import CutMixSampler, Episodes
from models.hypernet.episodes import Anchors, BatchedEpisodes, episode_kl, one_hot_logits
from models.hypernet.metatrain import (
    EditOutcomes,
    MetaTrainConfig,
    MetaTrainer,
    build_hypernetwork,
    candidate_kinds,
    candidate_masks,
    edit_outcomes,
    entry_norms,
    pick_edits,
    top_masks,
)
from models.hypernet.network import row_ranks
from models.sites import Sites

EDITS = dict(
    batch=2,
    target_source="edits",
    inner_optimiser="rmsprop",
    inner_lr=1e-3,
    edit_rho=0.05,
    candidates=3,
    edit_steps=12,
    edit_stop=0.5,
    schedule_iterations=10,
)


class SecondClassSampler:
    """CutMix episodes whose target is the backbone's second class on x~: every edit has work."""

    def __init__(self, model: torch.nn.Module, pool, seed: int = 0) -> None:
        self.model, self.inner = model, CutMixSampler(model, pool, seed=seed)
        self.pool, self.generator = pool, self.inner.generator

    def sample(self, batch: int) -> Episodes:
        e = self.inner.sample(batch)
        with torch.no_grad():
            second = self.model(e.mixed).topk(2, dim=1).indices[:, 1]
        # the raise-like target: the backbone's own logits with the second class on top
        logits = e.clean_logits.clone()
        logits[torch.arange(batch), second] = logits.max(dim=1).values + 1.0
        return Episodes(e.clean, e.mixed, logits, e.boxes)


def test_one_hot_targets_at_t1_make_the_episode_loss_the_cross_entropy() -> None:
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([3, 0, 9, 3])
    kl = episode_kl(logits, one_hot_logits(targets, 10), 1.0)
    torch.testing.assert_close(kl, F.cross_entropy(logits, targets, reduction="none"))


def test_a_candidate_edit_is_the_products_masked_edit(demo_backbone, demo_pool) -> None:
    """Saliency's candidate, run by edit_outcomes, takes the steps and reaches the weights of the
    `saliency` editor on the same image, target, rho, lr, step limit and stop."""
    model, cfg = demo_backbone.model, MetaTrainConfig(**EDITS)
    sites = Sites.for_model(model)
    episodes = SecondClassSampler(model, demo_pool, seed=1).sample(2)
    targets = episodes.targets
    batch = BatchedEpisodes(SplitForward(model, sites), sites, episodes, 5.0)
    ce = batch.replicate(one_hot_logits(targets, episodes.clean_logits.shape[1]), 1.0)
    grads, _ = ce.grads_and_losses(ce.zeros())
    gradient = entry_norms(sites, [g.dense() for g in grads])
    k = round(cfg.edit_rho * sites.n_entries)
    masks = top_masks(gradient, k)
    anchors = Anchors.pick(ce.split, demo_pool.get(torch.arange(8)), 2, 2)
    out = edit_outcomes(ce, masks, anchors, cfg)
    editor = get_editor("saliency")
    config = SaliencyConfig(rho=cfg.edit_rho, lr=cfg.inner_lr, max_steps=12, stop_loss=0.5)
    for b in range(2):
        task = EditTask.build(model, sites, episodes.mixed[b : b + 1], targets[b : b + 1])
        torch.testing.assert_close(gradient[b], gradient_scores(task), rtol=1e-4, atol=1e-8)
        product = editor.fn(task, config, None)
        assert product.steps == int(out.steps[b]) and 0 < product.steps <= 12
        edited = copy.deepcopy(model)
        product.patch.apply(edited)
        masked = [
            d.masked(m, mat).dense()[b]
            for d, m, mat in zip(out.deltas, sites.split(masks), sites.matrices, strict=True)
        ]
        for w, w0, d in zip(sites.params(edited), sites.params(model), masked, strict=True):
            # a step moves a weight by about lr (1e-3); float noise stays far below that
            torch.testing.assert_close(w.detach(), w0.detach() + d, rtol=1e-3, atol=5e-5)
        assert math.isclose(product.loss, out.loss[b].item(), rel_tol=1e-3, abs_tol=1e-5)
        assert bool(out.fixed[b]) == (product.loss <= 0.5)


def test_candidates_are_its_own_top_saliencys_top_and_mixes_of_the_two() -> None:
    gen = torch.Generator().manual_seed(0)
    own = torch.randn(3, 50, generator=gen)
    saliency = torch.rand(3, 50, generator=gen)
    masks = candidate_masks(own, saliency, 5, 6, torch.Generator().manual_seed(1))
    assert masks.shape == (3, 6, 50) and (masks.sum(dim=2) == 5).all()
    assert torch.equal(masks[:, 0], top_masks(own, 5))
    assert torch.equal(masks[:, 1], top_masks(saliency, 5))
    # the mixes: the rule, at the weights the generator gives
    a = torch.rand((3, 4, 1), generator=torch.Generator().manual_seed(1))
    rule = a * row_ranks(own).unsqueeze(1) + (1 - a) * row_ranks(saliency).unsqueeze(1)
    assert torch.equal(masks[:, 2:], top_masks(rule, 5))
    assert not torch.equal(masks[:, 2], masks[:, 3])  # random mixes differ
    # and they lie between the ends: most of a mix is in one end's top or the other's
    ends = (masks[:, :1] + masks[:, 1:2]).clamp(max=1)
    assert (masks[:, 2:] * ends).sum() / masks[:, 2:].sum() > 0.6  # a random mask: about 0.2


def test_a_spill_ranking_is_the_third_candidate_and_the_mixes_follow() -> None:
    gen = torch.Generator().manual_seed(0)
    own, saliency, spill = (torch.randn(2, 40, generator=gen) for _ in range(3))
    masks = candidate_masks(own, saliency, 4, 5, torch.Generator().manual_seed(1), spill)
    assert masks.shape == (2, 5, 40) and (masks.sum(dim=2) == 4).all()
    assert torch.equal(masks[:, 2], top_masks(spill, 4))
    a = torch.rand((2, 2, 1), generator=torch.Generator().manual_seed(1))
    rule = a * row_ranks(own).unsqueeze(1) + (1 - a) * row_ranks(saliency).unsqueeze(1)
    assert torch.equal(masks[:, 3:], top_masks(rule, 4))
    assert candidate_kinds(5, spill=True) == ["own", "saliency", "spill", "mixed", "mixed"]
    assert candidate_kinds(3, spill=False) == ["own", "saliency", "mixed"]
    assert candidate_masks(own, saliency, 4, 3, gen, spill).shape == (2, 3, 40)  # no mix


def two_episodes(loss: list[float], fixed: list[bool], anchor_kl: list[float]) -> EditOutcomes:
    """The outcomes of 3 candidates for each of 2 episodes (rows episode-major)."""
    steps = torch.tensor([5.0, 3, 9, 12, 12, 12])
    return EditOutcomes(steps, torch.tensor(loss), torch.tensor(fixed), torch.tensor(anchor_kl), [])


def test_the_choice_is_the_fix_with_least_spill_else_the_closest() -> None:
    outcomes = two_episodes(
        [0.4, 0.5, 0.3, 0.9, 0.7, 0.8],
        [True, True, True, False, False, False],
        [0.2, 0.3, 0.1, 0.0, 0.5, 0.5],
    )
    # episode 0: all three fix it, the third spills least; episode 1: none does, the 2nd is closest
    assert pick_edits(outcomes, 3).tolist() == [2, 1]
    outcomes.fixed[2] = False  # now the least-spilling fix is the first
    assert pick_edits(outcomes, 3).tolist() == [0, 1]


def test_without_its_own_target_the_first_candidate_is_never_chosen() -> None:
    outcomes = two_episodes(
        [0.4, 0.5, 0.9, 0.1, 0.7, 0.8],
        [True, True, False, False, False, False],
        [0.0, 0.3, 0.1, 0.0, 0.5, 0.5],
    )
    assert pick_edits(outcomes, 3).tolist() == [0, 0]  # its own fixes with least spill; closest
    # the next fix with least spill, and of the rest the closest; the outcomes are not changed
    assert pick_edits(outcomes, 3, own=False).tolist() == [1, 1]
    assert outcomes.fixed[0] and outcomes.loss[3] == 0.1
    with pytest.raises(ValueError, match="own_target False needs targets from edits"):
        MetaTrainConfig(own_target=False)


def test_meta_training_on_edit_targets_regresses_onto_the_chosen_masks(demo_backbone, demo_pool):
    model = demo_backbone.model
    sites = Sites.for_model(model)
    cfg = MetaTrainConfig(**EDITS)
    hypernet = build_hypernetwork(model, sites, seed=0, gradient_input=True)
    sampler = SecondClassSampler(model, demo_pool)
    trainer = MetaTrainer(demo_backbone, sites, demo_pool, hypernet, cfg, sampler=sampler)
    first = trainer.step()
    k = round(cfg.edit_rho * sites.n_entries)
    assert first["s_density"] == pytest.approx(k / sites.n_entries)  # the chosen masks' size
    assert first["kl_last"] < first["kl_unedited"]  # the chosen edits lower the edit's CE
    wins = [first[f"won_{kind}"] for kind in ("own", "saliency", "mixed")]
    assert sum(wins) == pytest.approx(1.0)
    assert all(0 <= first[f"fixed_{kind}"] <= 1 for kind in ("own", "saliency", "mixed"))
    assert all(0 < first[f"steps_{kind}"] <= cfg.edit_steps for kind in ("own", "saliency"))
    assert -1 <= first["h_grad_corr"] <= 1 and math.isfinite(first["bce"])
    before = [p.detach().clone() for p in hypernet.parameters()]
    trainer.step()
    assert any(
        not torch.equal(a, b.detach()) for a, b in zip(before, hypernet.parameters(), strict=True)
    )


def test_meta_training_without_its_own_target_still_tries_and_logs_its_own_mask(
    demo_backbone, demo_pool
) -> None:
    model = demo_backbone.model
    sites = Sites.for_model(model)
    cfg = MetaTrainConfig(**{**EDITS, "own_target": False})
    hypernet = build_hypernetwork(model, sites, seed=0, gradient_input=True)
    trainer = MetaTrainer(
        demo_backbone, sites, demo_pool, hypernet, cfg, sampler=SecondClassSampler(model, demo_pool)
    )
    first = trainer.step()
    assert first["won_own"] == 0 and first["won_saliency"] + first["won_mixed"] == 1
    assert 0 < first["steps_own"] <= cfg.edit_steps  # its own mask was still edited
    assert first["kl_last"] < first["kl_unedited"]


def test_the_spill_candidate_ranks_each_episode_by_fix_per_spill_on_fixed_anchors(
    demo_backbone, demo_pool
) -> None:
    from models.errors import DataError
    from models.spill import CleanAnchors, SpillReference

    model = demo_backbone.model
    sites = Sites.for_model(model)
    cfg = MetaTrainConfig(**{**EDITS, "spill_anchors": 16, "candidates": 4})
    hypernet = build_hypernetwork(model, sites, seed=0, gradient_input=True)
    sampler = SecondClassSampler(model, demo_pool)
    trainer = MetaTrainer(demo_backbone, sites, demo_pool, hypernet, cfg, sampler=sampler)
    # the anchors: the 16 lowest-margin of the (whole, here) pool, their gradients taken at W0
    expected = CleanAnchors.lowest_margin(model, demo_pool.images, 16)
    torch.testing.assert_close(trainer.spill.margin, expected.margin)
    reference = SpillReference.at(model, sites, expected)
    for a, b in zip(trainer.spill.gradients, reference.gradients, strict=True):
        torch.testing.assert_close(a, b)
    first = trainer.step()
    kinds = ("own", "saliency", "spill", "mixed")
    assert sum(first[f"won_{kind}"] for kind in kinds) == pytest.approx(1.0)
    assert 0 < first["steps_spill"] <= cfg.edit_steps and 0 <= first["fixed_spill"] <= 1
    too_many = MetaTrainConfig(**{**EDITS, "spill_anchors": 65, "candidates": 4})
    with pytest.raises(DataError, match="the pool holds only 64 images; give at most 64"):
        MetaTrainer(demo_backbone, sites, demo_pool, hypernet, too_many, sampler=sampler)
    with pytest.raises(ValueError, match="spill_anchors needs targets from edits and 3 or more"):
        MetaTrainConfig(**{**EDITS, "spill_anchors": 16, "candidates": 2})
    with pytest.raises(ValueError, match="spill_anchors needs targets from edits"):
        MetaTrainConfig(spill_anchors=16)
    with pytest.raises(ValueError, match=r"spill_anchors must be 0 \(off\) to 4096"):
        MetaTrainConfig(**{**EDITS, "spill_anchors": 5000})


def test_edit_targets_need_the_edits_optimiser_a_pool_and_the_batched_loop(
    demo_backbone, demo_pool
) -> None:
    with pytest.raises(ValueError, match="inner_optimiser must be rmsprop"):
        MetaTrainConfig(**{**EDITS, "inner_optimiser": "sgd"})
    with pytest.raises(ValueError, match="candidates must be 2"):
        MetaTrainConfig(**{**EDITS, "candidates": 1})
    with pytest.raises(ValueError, match=r"candidates must be 2 .* to 64 \(got candidates=100000"):
        MetaTrainConfig(**{**EDITS, "candidates": 100_000})  # no batch would fit in memory
    for steps in (0, 10**9):  # an edit's own bound: 1 to 10,000 steps
        with pytest.raises(ValueError, match="edit_steps must be 1 to 10000"):
            MetaTrainConfig(**{**EDITS, "edit_steps": steps})
    with pytest.raises(ValueError, match="target_source must be one of search, edits"):
        MetaTrainConfig(**{**EDITS, "target_source": "oracle"})
    model = demo_backbone.model
    sites = Sites.for_model(model)
    cfg = MetaTrainConfig(**EDITS)
    hypernet = build_hypernetwork(model, sites)
    with pytest.raises(ValueError, match="reference loop implements the paper's objective only"):
        MetaTrainer(demo_backbone, sites, demo_pool, hypernet, cfg, impl="reference")
    sampler = CutMixSampler(model, demo_pool, seed=0)
    with pytest.raises(ValueError, match="a pool of clean images is needed"):
        MetaTrainer(demo_backbone, sites, None, hypernet, cfg, sampler=sampler)


def test_a_candidate_edit_may_take_as_many_steps_as_an_edit() -> None:
    from models.editing.registry import EditConfig
    from models.hypernet.metatrain import MAX_EDIT_STEPS

    assert EditConfig.bounds()["max_steps"].high == MAX_EDIT_STEPS


def test_a_spill_reading_network_learns_on_the_trainers_anchors_and_keeps_them(
    demo_backbone, demo_pool, tmp_path
) -> None:
    from models.errors import HypernetworkMismatchError
    from models.hypernet.network import Hypernetwork

    model = demo_backbone.model
    sites = Sites.for_model(model)
    sampler = SecondClassSampler(model, demo_pool)
    plain = build_hypernetwork(model, sites, seed=0, gradient_input=True, spill_input=True)
    with pytest.raises(ValueError, match="give --spill-anchors N"):
        MetaTrainer(demo_backbone, sites, demo_pool, plain, MetaTrainConfig(**EDITS))
    cfg = MetaTrainConfig(**{**EDITS, "spill_anchors": 16, "candidates": 4})
    trainer = MetaTrainer(demo_backbone, sites, demo_pool, plain, cfg, sampler=sampler)
    # the network keeps the spill candidate's anchors: the 16 lowest-margin pool images
    from models.spill import CleanAnchors

    expected = CleanAnchors.lowest_margin(model, demo_pool.images, 16)
    assert torch.equal(plain.anchor_images, expected.images.cpu())
    gates = [g.weight.detach().clone() for g in plain.spill_gates]
    trainer.step()
    # the regression reaches the spill gates (zero at the start): the input is read
    assert any(not torch.equal(a, g.weight) for a, g in zip(gates, plain.spill_gates, strict=True))
    plain.save(tmp_path, demo_backbone, sites)
    loaded = Hypernetwork.load(tmp_path, demo_backbone, sites).requires_grad_(True)
    assert torch.equal(loaded.anchor_images, plain.anchor_images)
    # a network that has anchors trains on its own, not on newly drawn ones
    other = MetaTrainConfig(**{**EDITS, "spill_anchors": 16, "candidates": 4, "seed": 3})
    again = MetaTrainer(demo_backbone, sites, demo_pool, loaded, other, sampler=sampler)
    torch.testing.assert_close(again.spill.margin, trainer.spill.margin)
    assert torch.equal(loaded.anchor_images, plain.anchor_images)
    fewer = MetaTrainConfig(**{**EDITS, "spill_anchors": 8, "candidates": 4})
    with pytest.raises(HypernetworkMismatchError, match="its own 16 anchors; give --spill-"):
        MetaTrainer(demo_backbone, sites, demo_pool, loaded, fewer, sampler=sampler)


def test_sibling_per_spill_picks_the_fix_with_most_sibling_gain_per_spill() -> None:
    outcomes = two_episodes(
        [0.4, 0.5, 0.3, 0.4, 0.4, 0.8],
        [True, True, True, True, True, False],
        [0.2, 0.1, 0.05, 0.2, 0.1, 0.01],
    )
    # episode 0: gains per spill 1.5, 4, 2 -> the second, though the third spills least;
    # episode 1 has no sibling (NaN): the least-spilling fix, the second
    gain = torch.tensor([0.3, 0.4, 0.1, *[math.nan] * 3])
    assert pick_edits(outcomes, 3).tolist() == [2, 1]
    assert pick_edits(outcomes, 3, gain=gain).tolist() == [1, 1]
    # a candidate that does not fix the episode is never picked for its gain; nor the own mask
    # without own_target; and a fix that spills nothing outranks every spilling one
    outcomes.fixed[1] = False
    assert pick_edits(outcomes, 3, gain=gain).tolist() == [2, 1]
    outcomes.anchor_kl[0] = 0.0
    assert pick_edits(outcomes, 3, gain=gain).tolist() == [0, 1]
    assert pick_edits(outcomes, 3, own=False, gain=gain).tolist() == [2, 1]
    with pytest.raises(ValueError, match="target_pick 'sibling-per-spill' needs targets from"):
        MetaTrainConfig(target_pick="sibling-per-spill")


def test_meta_training_on_sibling_per_spill_reads_each_failures_sibling(
    demo_backbone, demo_pool, caplog
) -> None:
    from models.errors import DataError
    from models.hypernet.failures import FailureSampler

    model = demo_backbone.model
    sites = Sites.for_model(model)
    cfg = MetaTrainConfig(**{**EDITS, "batch": 4, "target_pick": "sibling-per-spill"})
    hypernet = build_hypernetwork(model, sites, seed=0, gradient_input=True)
    images = demo_pool.images
    with torch.no_grad():
        top2 = model(images).topk(2, dim=1).indices
    # "failures" whose label is the backbone's second class: every edit has work
    sampler = FailureSampler(
        model, images, top2[:, 1], cfg.temperature, seed=2, predictions=top2[:, 0]
    )
    assert (sampler.sibling != torch.arange(len(images))).any()
    trainer = MetaTrainer(demo_backbone, sites, demo_pool, hypernet, cfg, sampler=sampler)
    first = trainer.step()
    assert 0 < first["siblings"] <= 1
    kinds = ("own", "saliency", "mixed")
    assert sum(first[f"won_{kind}"] for kind in kinds) == pytest.approx(1.0)
    assert all(math.isfinite(first[f"sibling_gain_{kind}"]) for kind in kinds)
    caplog.set_level("INFO", logger="models.hypernet.metatrain")
    trainer._log([first], 1.0)
    assert (
        "sibling CE gain" in caplog.text and f"own {first['sibling_gain_own']:.3f}" in caplog.text
    )
    # the probe's loss at W0 is each sibling's CE toward the episode's label
    episodes = FailureSampler(
        model, images, top2[:, 1], cfg.temperature, seed=2, predictions=top2[:, 0]
    ).sample(4)
    targets = one_hot_logits(episodes.targets, episodes.clean_logits.shape[1])
    probe, ce0 = trainer._sibling_probe(episodes, targets, 3)
    assert probe.tokens.shape[:2] == (1, 12)
    with torch.no_grad():
        expected = F.cross_entropy(model(episodes.siblings), episodes.targets, reduction="none")
    torch.testing.assert_close(ce0, expected, rtol=1e-4, atol=1e-5)
    cutmix = MetaTrainer(
        demo_backbone, sites, demo_pool, hypernet, cfg, sampler=SecondClassSampler(model, demo_pool)
    )
    with pytest.raises(DataError, match="it needs --episodes failures"):
        cutmix.step()
