"""Gradient-saliency mask: where to edit without a hypernetwork.

Scores each neuron entry by the norm of the gradient of the edit loss (CE of the edit images to
their targets, at the unedited weights) over its fc1 row or fc2 column, keeps the top ``rho`` of
all entries in one global ranking, then runs the same masked fine-tuning as ``where2edit`` and
``random``. Not in the paper: a training-free reference for what a learned mask must beat, and a
usable method for backbones that have no meta-trained hypernetwork yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.editing.optimize import frozen, masked_finetune, site_logits
from models.editing.random_mask import MaskConfig
from models.editing.registry import EditOutcome, EditTask, StepCallback, register
from models.sites import Sites, top_rho_mask


@dataclass(frozen=True)
class SaliencyConfig(MaskConfig):
    """The top ``rho`` of all entries by gradient norm on the edit images."""


def edit_gradients(task: EditTask) -> tuple[torch.Tensor, ...]:
    """The gradient of the CE of ``task``'s images to its targets, per site matrix (Sites order),
    at the unedited weights."""
    weights = [p.detach().clone().requires_grad_() for p in task.sites.params(task.model)]
    with frozen(task.model), torch.enable_grad():
        loss = F.cross_entropy(site_logits(task)(weights), task.targets)
        return torch.autograd.grad(loss, weights)


def entry_norms(grads: tuple[torch.Tensor, ...], sites: Sites) -> torch.Tensor:
    """(n_entries,) the norm of each neuron entry's part of ``grads`` (per site matrix)."""
    # a neuron owns an fc1 row (dim 0) or an fc2 column (dim 1): norm over the other dimension
    pairs = zip(grads, sites.matrices, strict=True)
    return torch.cat([g.norm(dim=1 - m.dim) for g, m in pairs])


def gradient_scores(task: EditTask) -> torch.Tensor:
    """(n_entries,) per-neuron gradient norms of the CE of ``task``'s images to its targets."""
    return entry_norms(edit_gradients(task), task.sites)


@register(
    "saliency",
    SaliencyConfig,
    description="masked fine-tuning of the neurons with the largest edit-loss gradients",
)
def saliency(
    task: EditTask, config: SaliencyConfig, on_step: StepCallback | None = None
) -> EditOutcome:
    masks = task.sites.split(top_rho_mask(gradient_scores(task), config.rho))
    return masked_finetune(task, config, masks=masks, on_step=on_step)
