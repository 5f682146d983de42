"""scripts/spill_saliency.py: its fix and spill are the first-order effects of one sign step of
an entry (checked against the model moved by that step), the ranking reduces to the fix ranking
without spill, and the script benches ``saliency-spill`` beside the registered methods."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from models.backbones import Backbone
from models.editing.optimize import site_logits
from models.editing.registry import EditTask
from models.editing.saliency import edit_gradients
from models.sites import Sites
from scripts.spill_saliency import CleanAnchors, fix_and_spill, spill_scores
from tests.scripts import run_script

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
    fix, spill = fix_and_spill(task, anchors)
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


def spill_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("spill_saliency", *args)


def test_the_script_benches_saliency_spill_beside_saliency_on_the_demo_world(
    tmp_path: Path,
) -> None:
    run = spill_bench(
        "--anchors", "4", "bench", "--world", "demo", "--methods", "saliency-spill,saliency",
        "--quick", "--out", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"saliency-spill", "saliency"}
    points = results["methods"]["saliency-spill"]["points"]
    assert len(points) == 2 and all(0 <= p["sr"] <= 1 and p["groups"] for p in points)
    assert {p["config"]["rho"] for p in points} == {
        p["config"]["rho"] for p in results["methods"]["saliency"]["points"]
    }


def test_anchor_counts_out_of_range_and_a_missing_world_are_refused_in_one_line() -> None:
    for args in (["--anchors", "0"], ["--anchors", "100000"]):
        run = spill_bench(*args, "bench", "--world", "demo")
        assert run.returncode != 0 and "--anchors" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    run = spill_bench("bench")
    assert run.returncode != 0 and "--world" in run.stderr
