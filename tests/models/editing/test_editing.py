"""Editors: they edit, leave the shared model bit-identical, and return exact patches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.editing import finetune, lora, random_mask, saliency  # noqa: F401  (registration)
from models.editing.finetune import half_sq_l2_distance, l1_distance
from models.editing.optimize import masked_finetune
from models.editing.random_mask import random_masks
from models.editing.registry import EditConfig, EditTask, get_editor, make_config, run_edit
from models.errors import EditCanceled, EditConfigError
from models.forward import SplitForward
from models.sites import Patch, Sites
from tests.conftest import tiny_vit

BASELINES = {
    "ft": {},
    "ft-l1": {"c": 0.001},
    "ft-l2": {"c": 0.01},
    "random": {"rho": 0.25},
    "lora": {"rank": 2},
    "saliency": {"rho": 0.25},
}


@pytest.fixture
def model() -> nn.Module:
    return tiny_vit()


def make_task(model: nn.Module, n_images: int = 1, seed: int = 1) -> EditTask:
    """A task whose target is not the model's current prediction on any edit image."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 1, 28, 28, generator=gen)
    with torch.no_grad():
        targets = (model(images).argmax(1) + 3) % 10
    return EditTask.build(model, Sites.for_model(model), images, targets)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"editor modified {changed}"


def edit(name: str, task: EditTask, **options: float) -> tuple[EditConfig, object]:
    config = make_config(name, lr=1e-3, max_steps=8, stop_loss=0.05, **BASELINES[name], **options)
    return config, get_editor(name).fn(task, config, None)  # bare function: no run_edit safety net


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_editor_leaves_model_bit_identical_and_flags_unchanged(model: nn.Module, name: str) -> None:
    task = make_task(model)
    before = state(model)
    flags = [p.requires_grad for p in model.parameters()]
    edit(name, task)
    assert_same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_patch_on_fresh_copy_reproduces_edited_loss_exactly(
    model: nn.Module, name: str, tmp_path: Path
) -> None:
    task = make_task(model, n_images=2)
    fresh = copy.deepcopy(model)
    _, outcome = edit(name, task)
    assert outcome.patch.n_neurons > 0
    outcome.patch.save(tmp_path / "patch.safetensors")
    patch, _ = Patch.load(tmp_path / "patch.safetensors")
    patch.apply(fresh)
    split = SplitForward(fresh, task.sites)
    with torch.no_grad():
        logits = split.suffix(split.prefix(task.images))
    assert F.cross_entropy(logits, task.targets).item() == outcome.loss


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_editor_flips_several_edit_images_to_their_targets(model: nn.Module, name: str) -> None:
    task = make_task(model, n_images=3)
    # a random-init ViT has tiny logits (LayerNorm + small head): stop on the predictions alone
    config = make_config(name, lr=1e-3, max_steps=60, stop_loss=2.3, **BASELINES[name])
    outcome = run_edit(name, task, config)
    backup = outcome.patch.apply(model)
    with torch.no_grad():
        preds = model(task.images).argmax(1)
    outcome.patch.revert(model, backup)
    assert torch.equal(preds, task.targets)
    assert outcome.steps < 60 and outcome.extra["stopped_early"]


def test_random_mask_keeps_unselected_rows_and_columns_bit_identical(model: nn.Module) -> None:
    task = make_task(model)
    before = [p.detach().clone() for p in task.sites.params(model)]
    config, outcome = edit("random", task)
    masks = random_masks(task.sites, config.rho, config.seed)
    outcome.patch.apply(model)
    after = task.sites.params(model)
    for m, mask, w0, w1 in zip(task.sites.matrices, masks, before, after, strict=True):
        keep = (~mask).nonzero().flatten()
        assert torch.equal(w0.index_select(m.dim, keep), w1.index_select(m.dim, keep)), m.param
        if m.param in outcome.patch.entries:
            assert bool(mask[outcome.patch.entries[m.param][0]].all())
    assert outcome.mask_entries == sum(int(mask.sum()) for mask in masks)


def test_random_mask_selects_rho_of_all_entries_reproducibly(model: nn.Module) -> None:
    sites = Sites.for_model(model)
    masks = random_masks(sites, 0.1, seed=3)
    assert [m.numel() for m in masks] == [mat.hidden for mat in sites.matrices]
    assert sum(int(m.sum()) for m in masks) == round(0.1 * sites.n_entries)
    again = random_masks(sites, 0.1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(masks, again, strict=True))


def test_masked_finetune_with_all_zero_mask_changes_nothing(model: nn.Module) -> None:
    task = make_task(model)
    masks = [torch.zeros(m.hidden, dtype=torch.bool) for m in task.sites.matrices]
    outcome = masked_finetune(task, EditConfig(lr=1e-3, max_steps=5), masks=masks)
    assert outcome.steps == 5 and outcome.patch.n_neurons == 0 and outcome.mask_entries == 0


def test_edit_stops_before_any_step_when_targets_already_met(model: nn.Module) -> None:
    task = make_task(model)
    with torch.no_grad():
        task.targets = model(task.images).argmax(1)
    outcome = masked_finetune(task, EditConfig(lr=1e-3, max_steps=10, stop_loss=100.0))
    assert outcome.steps == 0 and outcome.patch.n_neurons == 0


def test_on_step_cancel_propagates_and_restores_model(model: nn.Module) -> None:
    task = make_task(model)
    before = state(model)
    seen: list[tuple[int, int]] = []

    def on_step(step: int, max_steps: int, loss: float) -> None:
        seen.append((step, max_steps))
        if step == 2:
            raise EditCanceled("stop")

    for name in ("random", "lora"):
        seen.clear()
        config = make_config(name, lr=1e-3, max_steps=10)
        with pytest.raises(EditCanceled):
            get_editor(name).fn(task, config, on_step)
        assert seen == [(1, 10), (2, 10)]
        assert_same_state(model, before)


def test_penalties_measure_distance_to_initial_weights() -> None:
    w0 = [torch.zeros(2, 2), torch.zeros(3)]
    w = [torch.tensor([[1.0, -2.0], [0.0, 0.0]]), torch.tensor([0.0, 3.0, 0.0])]
    assert l1_distance(w, w0).item() == 6.0
    assert half_sq_l2_distance(w, w0).item() == (1 + 4 + 9) / 2


def test_configs_reject_out_of_range_knobs() -> None:
    for name, bad in (("random", {"rho": 0.0}), ("ft-l2", {"c": -1.0}), ("lora", {"rank": 0})):
        with pytest.raises(EditConfigError):
            make_config(name, **bad)


def test_knobs_and_their_sweep_values_match_method_md() -> None:
    assert get_editor("ft").config_cls.knob is None
    assert get_editor("ft-l1").config_cls.knob_values == (0.1, 0.05, 0.025, 0.01, 0.005, 0.001, 0.0)
    assert get_editor("random").config_cls.knob_values == (0.75, 0.5, 0.25, 0.1, 0.05)
    assert make_config("lora", rank=2.0).rank == 2


def test_lora_patch_is_dense_merged_weights_over_all_site_neurons(model: nn.Module) -> None:
    task = make_task(model)
    config, outcome = edit("lora", task)
    assert outcome.patch.n_neurons == task.sites.n_entries
    assert outcome.extra["lora_params"] == sum(
        config.rank * sum(p.shape) for p in task.sites.params(model)
    )


def test_saliency_edits_exactly_the_neurons_with_the_largest_gradient_norms(
    model: nn.Module,
) -> None:
    from models.editing.saliency import gradient_scores

    task = make_task(model, n_images=2)
    scores = gradient_scores(task)
    assert scores.shape == (task.sites.n_entries,) and bool((scores >= 0).all())
    # one entry per fc1 row / fc2 column: recompute the first fc1 row's norm by hand
    fc1 = task.sites.params(model)[0]
    w = fc1.detach().clone().requires_grad_()
    params = {n: p for n, p in model.named_parameters()}
    name = task.sites.matrices[0].param
    logits = torch.func.functional_call(model, {**params, name: w}, (task.images,))
    F.cross_entropy(logits, task.targets).backward()
    torch.testing.assert_close(scores[0], w.grad[0].norm(), rtol=1e-4, atol=1e-7)
    _, outcome = edit("saliency", task)  # rho 0.25
    changed, offset = set(), 0
    for m in task.sites.matrices:
        if m.param in outcome.patch.entries:
            changed |= {offset + i for i in outcome.patch.entries[m.param][0].tolist()}
        offset += m.hidden
    top = scores.topk(round(0.25 * task.sites.n_entries)).indices
    assert changed and changed <= set(top.tolist())
    assert outcome.mask_entries == len(top)
