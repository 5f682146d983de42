"""SR / GR / LR on hand-built cases, aggregation, fronts, and exact model restoration."""

from __future__ import annotations

import math

import pytest
import torch

from models.evaluation import (
    EditScore,
    EvalSet,
    FrontPoint,
    GroupResult,
    best_gr_at_lr,
    edit_score,
    group_result,
    overall,
    pareto_front,
    patched_predictions,
)
from models.forward import SplitForward
from models.sites import Patch, Sites
from tests.conftest import tiny_vit


def test_gr_divides_by_group_size_minus_the_edit_image() -> None:
    group_preds = torch.tensor([3, 3, 1, 3])  # the edit image (index 2) is still wrong
    score = edit_score(group_preds, 3, [2], torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert score == EditScore(sr=0.0, gr=1.0, lr=1.0)  # the reference's |G| division would say 0.75


def test_sr_and_gr_with_several_edit_images() -> None:
    group_preds = torch.tensor([5, 2, 5, 2, 5])
    score = edit_score(group_preds, 5, [0, 1], torch.tensor([1]), torch.tensor([1]))
    assert score.sr == 0.5
    assert score.gr == pytest.approx(2 / 3)


def test_lr_is_share_of_unchanged_locality_predictions() -> None:
    base = torch.tensor([0, 1, 2, 3])
    after = torch.tensor([0, 9, 2, 9])
    assert edit_score(torch.tensor([1, 1]), 1, [0], after, base).lr == 0.5


def test_edit_score_rejects_group_without_held_out_image() -> None:
    with pytest.raises(ValueError, match="GR needs"):
        edit_score(torch.tensor([1, 1]), 1, [0, 1], torch.tensor([0]), torch.tensor([0]))


def test_overall_averages_groups_equally_not_edits() -> None:
    big = group_result("a", [EditScore(1.0, 1.0, 1.0)] * 9)
    small = group_result("b", [EditScore(0.0, 0.0, 0.5)])
    assert big == GroupResult("a", 9, 1.0, 1.0, 1.0)
    assert overall([big, small]) == EditScore(0.5, 0.5, 0.75)


def test_pareto_front_drops_dominated_points_and_sorts_by_lr() -> None:
    a, b = FrontPoint(0.1, 1.0, 0.9, 0.80), FrontPoint(0.05, 1.0, 0.7, 0.95)
    dominated = FrontPoint(0.5, 1.0, 0.6, 0.79)
    assert pareto_front([dominated, b, a]) == [a, b]


def test_best_gr_at_lr_picks_highest_gr_among_points_with_enough_locality() -> None:
    points = [
        FrontPoint(0.5, 1.0, 0.95, 0.85),
        FrontPoint(0.1, 1.0, 0.80, 0.91),
        FrontPoint(0.05, 1.0, 0.60, 0.97),
    ]
    assert best_gr_at_lr(points, 0.9) == points[1]
    assert best_gr_at_lr(points, 0.99) is None
    assert best_gr_at_lr([FrontPoint(None, 1.0, math.nan, 0.95)]) is None


def test_patched_predictions_restore_model_exactly() -> None:
    model = tiny_vit()
    sites = Sites.for_model(model)
    split = SplitForward(model, sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = sites.params(model)[1]  # fc2 of the first site: columns are neurons
    values = torch.randn(w.shape[0], 2) * 50
    patch = Patch(sites, {sites.matrices[1].param: (torch.tensor([0, 5]), values)})
    tokens = split.prefix(torch.randn(6, 1, 28, 28))
    (patched,) = patched_predictions(split, patch, [tokens])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(patched, split.logits(tokens).argmax(1))


def test_evalset_scores_an_empty_patch_as_no_change() -> None:
    model = tiny_vit()
    split = SplitForward(model, Sites.for_model(model))
    images = torch.randn(4, 1, 28, 28)
    label = int(model(images[:1]).argmax(1))
    evalset = EvalSet.prepare(split, [("g", label, images)], torch.randn(8, 1, 28, 28))
    score = evalset.score(Patch(Sites.for_model(model), {}), 0, [0])
    preds = model(images).argmax(1)
    assert score == EditScore(1.0, (preds[1:] == label).float().mean().item(), 1.0)
