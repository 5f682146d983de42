"""models/spill.py: fix and spill are the first-order effects of one sign step of an entry
(checked against the model moved by that step), batched episodes score as single ones, and the
ranking reduces to the fix ranking without spill."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from models.backbones import Backbone
from models.editing.optimize import site_logits
from models.editing.registry import EditTask
from models.editing.saliency import edit_gradients
from models.sites import Sites
from models.spill import CleanAnchors, SpillReference, entry_fix, entry_spill, spill_scores

EPS = 1e-3


def _task_and_anchors(backbone: Backbone) -> tuple[EditTask, CleanAnchors]:
    model = backbone.model
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(1, 1, 28, 28, generator=gen)
    with torch.no_grad():
        target = (model(images).argmax(1) + 3) % 10
    task = EditTask.build(model, Sites.for_model(model), images, target)
    pool = torch.randn(40, 1, 28, 28, generator=gen)
    return task, CleanAnchors.lowest_margin(model, pool, 1)


def _stepped(task: EditTask, entry: int) -> list[torch.Tensor]:
    """The site weights with one entry moved by -EPS * sign(g) (its first RMSprop step's way)."""
    weights = [p.detach().clone() for p in task.sites.params(task.model)]
    grads = edit_gradients(task)
    for k, m in enumerate(task.sites.matrices):
        if entry < m.hidden:
            index = (entry, slice(None)) if m.dim == 0 else (slice(None), entry)
            weights[k][index] -= EPS * grads[k][index].sign()
            return weights
        entry -= m.hidden
    raise IndexError(entry)


def test_fix_and_spill_are_the_first_order_effects_of_one_sign_step(
    tiny_backbone: Backbone,
) -> None:
    task, anchors = _task_and_anchors(tiny_backbone)
    grads = edit_gradients(task)
    reference = SpillReference.at(task.model, task.sites, anchors)
    fix, spill = entry_fix(grads, task.sites), entry_spill(grads, reference, task.sites)
    assert fix.shape == spill.shape == (task.sites.n_entries,)
    assert (fix > 0).all() and (spill >= 0).all() and (spill > 0).any()
    w0 = [p.detach() for p in task.sites.params(task.model)]
    on_anchor = dataclasses.replace(task, tokens=task.split.prefix(anchors.images))
    top, second = anchors.top[0], anchors.second[0]

    def loss_and_margin(weights: list[torch.Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            loss = F.cross_entropy(site_logits(task)(weights), task.targets).item()
            z = site_logits(on_anchor)(weights)[0]
        return loss, (z[top] - z[second]).item()

    loss0, margin0 = loss_and_margin(w0)
    assert abs(margin0 - anchors.margin[0].item()) < 1e-4
    for entry in (int(spill.argmax()), int(fix.argmax())):
        loss, margin = loss_and_margin(_stepped(task, entry))
        # the edit loss falls by EPS * |g_i|_1; a spilling entry lowers the margin by EPS * S_i * m
        torch.testing.assert_close(loss0 - loss, EPS * fix[entry].item(), rtol=0.05, atol=1e-7)
        lowered = EPS * spill[entry].item() * anchors.margin[0].item()
        if lowered > 0:
            torch.testing.assert_close(margin0 - margin, lowered, rtol=0.05, atol=1e-7)
        else:  # relu: this entry raises the margin
            assert margin >= margin0 - 1e-6


def test_a_batch_of_episodes_scores_each_as_it_scores_alone(tiny_backbone: Backbone) -> None:
    task, _ = _task_and_anchors(tiny_backbone)
    pool = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    reference = SpillReference.at(
        task.model, task.sites, CleanAnchors.lowest_margin(task.model, pool, 6)
    )
    gen = torch.Generator().manual_seed(5)
    batch = [torch.randn(3, *p.shape, generator=gen) for p in task.sites.params(task.model)]
    fix, spill = entry_fix(batch, task.sites), entry_spill(batch, reference, task.sites)
    assert fix.shape == spill.shape == (3, task.sites.n_entries)
    for b in range(3):
        one = [g[b] for g in batch]
        torch.testing.assert_close(fix[b], entry_fix(one, task.sites))
        torch.testing.assert_close(spill[b], entry_spill(one, reference, task.sites))
    scores = spill_scores(fix, spill)
    torch.testing.assert_close(scores[1], spill_scores(fix[1], spill[1]))


def test_without_spill_the_ranking_is_the_fix_ranking_and_spill_demotes() -> None:
    fix = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.equal(spill_scores(fix, torch.zeros(4)).argsort(), fix.argsort())
    scores = spill_scores(fix, torch.tensor([3.0, 0.0, 0.0, 1.0]))  # mean spill 1
    torch.testing.assert_close(scores, torch.tensor([1.0, 3.0, 2.0, 0.5]))


def test_anchors_are_the_lowest_margin_images_with_positive_logit_margins(
    tiny_backbone: Backbone,
) -> None:
    model = tiny_backbone.model
    pool = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    anchors = CleanAnchors.lowest_margin(model, pool, 5)
    with torch.no_grad():
        probs = model(pool).softmax(-1).topk(2).values
    gaps = probs[:, 0] - probs[:, 1]
    assert torch.equal(anchors.images, pool[gaps.argsort()[:5]])
    assert (anchors.margin > 0).all() and (anchors.top != anchors.second).all()
