"""The where2edit-sal editor: a rank mix of the learned and the gradient-saliency masks."""

from __future__ import annotations

import copy

import pytest
import torch

from models.editing import EDITORS, make_config, run_edit
from models.editing.saliency import gradient_scores
from models.editing.where2edit import learned_masks
from models.editing.where2edit_saliency import average_ranks, hybrid_masks
from models.errors import EditConfigError, HypernetworkMismatchError
from models.hypernet.network import HypernetConfig, Hypernetwork, feature_dim
from models.sites import Sites, top_rho_mask


def test_it_is_registered_with_rho_and_a_bounded_mix():
    editor = EDITORS["where2edit-sal"]
    assert editor.needs_hypernetwork and editor.config_cls.knob == "rho"
    config = make_config("where2edit-sal")
    assert (config.rho, config.mix) == (0.1, 0.5)
    assert make_config("where2edit-sal", mix=0).mix == 0.0
    assert make_config("where2edit-sal", mix=1).mix == 1.0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(EditConfigError, match="option mix="):
            make_config("where2edit-sal", mix=bad)


def test_it_needs_a_hypernetwork(task):
    task.hypernetwork = None
    with pytest.raises(EditConfigError, match="needs a hypernetwork"):
        run_edit("where2edit-sal", task, make_config("where2edit-sal"))


@pytest.mark.parametrize("rho", [0.1, 0.25])
def test_mix_1_is_where2edits_mask_and_mix_0_is_saliencys(task, rho):
    learned = torch.cat(learned_masks(task.hypernetwork, task, rho))
    salient = top_rho_mask(gradient_scores(task), rho)
    assert torch.equal(torch.cat(hybrid_masks(task, rho, mix=1.0)), learned)
    assert torch.equal(torch.cat(hybrid_masks(task, rho, mix=0.0)), salient)
    assert not torch.equal(learned, salient)  # else the next test would prove nothing


def test_a_mixed_mask_differs_from_both_and_keeps_rho(task):
    rho = 0.1
    learned = torch.cat(learned_masks(task.hypernetwork, task, rho))
    salient = top_rho_mask(gradient_scores(task), rho)
    mixed = torch.cat(hybrid_masks(task, rho, mix=0.5))
    assert int(mixed.sum()) == round(rho * task.sites.n_entries)
    assert not torch.equal(mixed, learned) and not torch.equal(mixed, salient)
    # every entry in both parents' masks ranks in the top half of both: it stays in the mix
    assert bool(mixed[learned & salient].all())


def test_average_ranks_are_scaled_and_share_ties():
    ranks = average_ranks(torch.tensor([0.3, 0.1, 0.3, 0.9, 0.3]))
    expected = torch.tensor([2.0, 0.0, 2.0, 4.0, 2.0], dtype=torch.float64) / 4
    torch.testing.assert_close(ranks, expected)


def test_the_edit_changes_only_the_mixed_masks_neurons(task):
    before = [p.detach().clone() for p in task.sites.params(task.model)]
    config = make_config("where2edit-sal", rho=0.1, mix=0.5, lr=1e-2, max_steps=5, stop_loss=0.0)
    outcome = run_edit("where2edit-sal", task, config)
    masks = hybrid_masks(task, 0.1, 0.5)
    assert outcome.mask_entries == int(torch.cat(masks).sum())
    assert sum(outcome.extra["mask_per_matrix"].values()) == outcome.mask_entries
    edited = copy.deepcopy(task.model)
    outcome.patch.apply(edited)
    for matrix, mask, w0, w1 in zip(
        task.sites.matrices, masks, before, task.sites.params(edited), strict=True
    ):
        keep = (~mask).nonzero().flatten()
        assert torch.equal(w0.index_select(matrix.dim, keep), w1.index_select(matrix.dim, keep))
    after = task.sites.params(task.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # model unchanged


def test_a_hypernetwork_for_other_sites_is_refused(task):
    other = Sites.for_model(task.model, blocks=(0,))
    task.hypernetwork = Hypernetwork(HypernetConfig.for_sites(feature_dim(task.model), other))
    with pytest.raises(HypernetworkMismatchError, match="use its sites"):
        hybrid_masks(task, 0.1, 0.5)
    with pytest.raises(HypernetworkMismatchError):
        run_edit("where2edit-sal", task, make_config("where2edit-sal"))
