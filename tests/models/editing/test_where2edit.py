"""The where2edit editor: learned top-rho masks, and nothing outside them changes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from models.editing import make_config, run_edit
from models.editing.saliency import edit_gradients, gradient_scores
from models.editing.where2edit import learned_masks
from models.errors import EditConfigError, HypernetworkMismatchError, MaskScoresNotFinite
from models.hypernet.network import HypernetConfig, Hypernetwork, cls_features, feature_dim
from models.sites import Sites, top_rho_mask
from models.spill import CleanAnchors, SpillReference, spill_ranking


def test_where2edit_needs_a_hypernetwork(task):
    task.hypernetwork = None
    with pytest.raises(EditConfigError, match="needs a hypernetwork"):
        run_edit("where2edit", task, make_config("where2edit"))


def test_non_finite_scores_are_refused_before_any_neuron_is_picked_or_edited(task):
    before = [p.detach().clone() for p in task.sites.params(task.model)]
    with torch.no_grad():
        for p in task.hypernetwork.parameters():
            p.fill_(float("nan"))
    with pytest.raises(MaskScoresNotFinite, match=r"scored \d+ of \d+ neurons NaN or inf"):
        run_edit("where2edit", task, make_config("where2edit", max_steps=3))
    with pytest.raises(MaskScoresNotFinite, match="method=saliency"):
        learned_masks(task.hypernetwork, task, rho=0.1)
    after = task.sites.params(task.model)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_mask_keeps_the_top_rho_of_the_scores_averaged_over_the_edit_images(task):
    masks = learned_masks(task.hypernetwork, task, rho=0.1)
    flat = torch.cat(masks)
    assert flat.dtype == torch.bool and int(flat.sum()) == round(0.1 * task.sites.n_entries)
    with torch.no_grad():
        scores = task.hypernetwork(cls_features(task.model, task.images)).mean(0)
    assert scores[flat].min() >= scores[~flat].max()


def test_untouched_rows_and_columns_stay_bit_identical(task):
    before = [p.detach().clone() for p in task.sites.params(task.model)]
    config = make_config("where2edit", rho=0.1, lr=1e-2, max_steps=5, stop_loss=0.0)
    outcome = run_edit("where2edit", task, config)
    masks = learned_masks(task.hypernetwork, task, rho=0.1)
    assert outcome.mask_entries == int(torch.cat(masks).sum())
    assert outcome.patch.n_neurons > 0
    edited = copy.deepcopy(task.model)
    outcome.patch.apply(edited)
    for matrix, mask, w0, w1 in zip(
        task.sites.matrices, masks, before, task.sites.params(edited), strict=True
    ):
        keep = ~mask
        untouched_0 = w0.index_select(matrix.dim, keep.nonzero().flatten())
        untouched_1 = w1.index_select(matrix.dim, keep.nonzero().flatten())
        assert torch.equal(untouched_0, untouched_1), matrix.param
    after = task.sites.params(task.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # model unchanged
    assert sum(outcome.extra["mask_per_matrix"].values()) == outcome.mask_entries


def test_rho_is_validated():
    with pytest.raises(EditConfigError, match="rho"):
        make_config("where2edit", rho=1.5)


def test_a_hypernetwork_for_other_sites_is_refused(task):
    other = Sites.for_model(task.model, blocks=(0,))
    task.hypernetwork = Hypernetwork(HypernetConfig.for_sites(feature_dim(task.model), other))
    with pytest.raises(HypernetworkMismatchError, match="use its sites"):
        learned_masks(task.hypernetwork, task, rho=0.1)


def test_a_target_reading_hypernetwork_gets_the_edits_targets(task):
    task.hypernetwork = task.hypernetwork.with_target_token(seed=0).eval()
    masks = torch.cat(learned_masks(task.hypernetwork, task, rho=0.1))
    other = dataclasses.replace(task, targets=(task.targets + 1) % 10)
    assert not torch.equal(masks, torch.cat(learned_masks(task.hypernetwork, other, rho=0.1)))
    outcome = run_edit("where2edit", task, make_config("where2edit", rho=0.1, max_steps=2))
    assert outcome.mask_entries == int(masks.sum())


def with_input_only(task, net: Hypernetwork, gates: torch.nn.ModuleList, rho: float) -> None:
    """Check that ``net`` (an input added to the task's network, gates zero) keeps its parent's
    mask, then make it score by that input alone: heads at zero, ``gates`` at one, so z is the
    input's rank (scores saturated at the clamp would tie and select by index instead)."""
    parent = torch.cat(learned_masks(task.hypernetwork, task, rho))
    task.hypernetwork = net
    assert torch.equal(torch.cat(learned_masks(net, task, rho)), parent)
    with torch.no_grad():
        for head, gate in zip(net.heads, gates, strict=True):
            head.weight.zero_(), head.bias.zero_(), gate.bias.fill_(1.0)


@pytest.mark.parametrize("kind", ["linear", "tail"])
def test_a_gradient_reading_hypernetwork_reads_the_edits_own_gradient(task, kind):
    net = task.hypernetwork.with_rank_feature(kind).with_gradient_input().eval()
    assert net.config.rank_feature == kind
    rho = 0.1
    # z: the gradient's rank (linear, or as its tail: the same order), so saliency's own mask
    with_input_only(task, net, net.gates, rho)
    saliency = top_rho_mask(gradient_scores(task), rho)
    assert torch.equal(torch.cat(learned_masks(net, task, rho)), saliency)
    outcome = run_edit("where2edit", task, make_config("where2edit", rho=rho, max_steps=2))
    assert outcome.mask_entries == int(saliency.sum())
    with pytest.raises(ValueError, match="gradient"):
        net.mask_scores(task.model, task.images, task.targets)  # the gradient is not optional


def test_a_spill_reading_hypernetwork_reads_the_edits_fix_per_spill_on_its_anchors(task):
    anchors = task.images[:2].clone()  # any clean images of the backbone's input
    net = task.hypernetwork.with_spill_input(anchors).eval()
    rho = 0.1
    # z: the spill ranking's rank, so saliency-spill's mask on the network's own anchors
    with_input_only(task, net, net.spill_gates, rho)
    reference = SpillReference.at(
        task.model, task.sites, CleanAnchors.lowest_margin(task.model, anchors, len(anchors))
    )
    expected = top_rho_mask(spill_ranking(edit_gradients(task), reference, task.sites), rho)
    assert not torch.equal(expected, top_rho_mask(gradient_scores(task), rho))  # not saliency's
    assert torch.equal(torch.cat(learned_masks(net, task, rho)), expected)
    outcome = run_edit("where2edit", task, make_config("where2edit", rho=rho, max_steps=2))
    assert outcome.mask_entries == int(expected.sum())
