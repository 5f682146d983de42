"""Learned and gradient masks mixed: the hypernetwork's scores and the edit loss's gradient norms.

``where2edit`` reads only the edit image, never its target label; ``saliency`` reads the label
through one backward pass of the edit loss. This editor ranks every mask entry by both:

    score = mix * rank(hypernetwork's mean scores) + (1 - mix) * rank(gradient norms)

keeps the top ``rho`` of all entries in one global ranking (as both parents do), then runs the
same masked fine-tuning. ``mix`` = 1 is exactly ``where2edit``'s mask, 0 exactly ``saliency``'s
(the raw scores go into ``top_rho_mask`` then, so the two ends tie-break as their parents do).
Not in the paper: issue 11's attempt to keep the learned mask's GR and saliency's locality.

**Why ranks, not z-scores.** The two signals live on unrelated scales: the hypernetwork's scores
are sigmoids clamped to [1e-5, 1 - 1e-5], with many entries saturated at either end, while
gradient norms are heavy-tailed (a few neurons carry most of the gradient). A z-score would let
those few gradient outliers, or the saturated sigmoid plateau, outweigh ``mix`` differently at
every edit; ranks (scaled to [0, 1]) give both signals the same uniform spread whatever their
distribution, so ``mix`` weighs them the same way on every edit, and the mix is invariant to any
monotone rescaling of either signal (logits or sigmoids, norms or squared norms). Tied entries
share their average rank, so the other signal decides among them (ordinal ranks would order a
saturated plateau by entry index, i.e. by block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.bounds import bound
from models.editing.optimize import masked_finetune
from models.editing.random_mask import MaskConfig
from models.editing.registry import EditOutcome, EditTask, StepCallback, register
from models.editing.saliency import edit_gradients, entry_norms
from models.editing.where2edit import learned_scores, mask_counts
from models.sites import top_rho_mask


@dataclass(frozen=True)
class Where2EditSaliencyConfig(MaskConfig):
    """The top ``rho`` of ``mix`` x learned rank + (1 - ``mix``) x gradient-saliency rank."""

    mix: float = field(default=0.5, metadata=bound("float", 0.0, 1.0))


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` scaled to [0, 1] (0: the lowest), ties sharing their average rank."""
    flat = scores.flatten().double()
    n = flat.numel()
    values, order = flat.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # one past the last sorted position of each distinct value
    mean_position = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(flat)
    ranks[order] = mean_position[inverse]
    return (ranks / max(n - 1, 1)).view_as(scores)


def mixed_scores(learned: torch.Tensor, saliency: torch.Tensor, mix: float) -> torch.Tensor:
    """The entries' ranking scores: the raw scores at the ends, the rank mix in between."""
    if mix == 1.0:
        return learned
    if mix == 0.0:
        return saliency
    return mix * average_ranks(learned) + (1.0 - mix) * average_ranks(saliency)


def hybrid_masks(
    task: EditTask,
    rho: float,
    mix: float,
    other: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One bool (hidden,) mask per matrix in Sites order: the top ``rho`` of the mixed ranking.
    ``other``: the ranking mixed with the learned one, from the edit's gradients (default:
    saliency's gradient norms)."""
    grads = edit_gradients(task)  # one backward, read by both rankings
    learned = learned_scores(task.hypernetwork, task, grads)  # checks it fits the sites
    second = entry_norms(grads, task.sites) if other is None else other(grads)
    return task.sites.split(
        top_rho_mask(mixed_scores(learned, second.to(learned.device), mix), rho)
    )


@register(
    "where2edit-sal",
    Where2EditSaliencyConfig,
    needs_hypernetwork=True,
    description="masked fine-tuning of the neurons ranked by a mix of the hypernetwork's scores "
    "and the edit-loss gradients",
)
def where2edit_saliency(
    task: EditTask, config: Where2EditSaliencyConfig, on_step: StepCallback | None = None
) -> EditOutcome:
    masks = hybrid_masks(task, config.rho, config.mix)
    outcome = masked_finetune(task, config, masks=masks, on_step=on_step)
    outcome.extra["mask_per_matrix"] = mask_counts(task.sites, masks)
    return outcome
