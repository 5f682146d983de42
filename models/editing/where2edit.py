"""Where-to-edit (docs/method.md section 4): a hypernetwork picks the neurons to fine-tune.

Scores = hypernetwork(cls features of the edit images), averaged over the images; one global
ranking keeps the top ``rho`` of all entries (fc1 rows and fc2 columns of every site); the shared
masked RMSprop loop then edits only those neurons, so everything else stays bit-identical.
``rho`` is the user's generalization/locality knob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.editing.optimize import masked_finetune
from models.editing.random_mask import MaskConfig
from models.editing.registry import EditOutcome, EditTask, StepCallback, register
from models.editing.saliency import edit_gradients, entry_norms
from models.errors import HypernetworkMismatchError, MaskScoresNotFinite
from models.hypernet.network import Hypernetwork
from models.sites import Sites, top_rho_mask
from models.spill import spill_ranking


@dataclass(frozen=True)
class Where2EditConfig(MaskConfig):
    """The hypernetwork's top ``rho`` of all mask entries (default 0.1)."""


def learned_masks(hypernet: Hypernetwork, task: EditTask, rho: float) -> list[torch.Tensor]:
    """One bool (hidden,) mask per matrix in Sites order: the top ``rho`` of the mean scores."""
    return task.sites.split(top_rho_mask(learned_scores(hypernet, task), rho))


def learned_scores(
    hypernet: Hypernetwork, task: EditTask, grads: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """(n_entries,) the hypernetwork's scores averaged over the edit images, once it is checked
    to fit the edit's sites (HypernetworkMismatchError otherwise). ``grads``: the edit's
    :func:`~models.editing.saliency.edit_gradients` where the caller has them already (what
    the network's optional inputs are read from; taken here otherwise)."""
    expected = tuple(m.hidden for m in task.sites.matrices)
    if hypernet.config.hidden != expected:
        raise HypernetworkMismatchError(
            f"the hypernetwork scores matrices of sizes {list(hypernet.config.hidden)}, but the "
            f"edit's sites {list(task.sites.mlps)} have {list(expected)}; use its sites"
        )
    hypernet.check_sites(task.sites)
    gradient, spill = learned_inputs(hypernet, task, grads)
    scores = hypernet.mask_scores(task.model, task.images, task.targets, gradient, spill)
    bad = int((~scores.isfinite()).sum())
    if bad:  # top-rho of NaN picks arbitrary neurons: never edit with such a mask
        raise MaskScoresNotFinite(
            f"the hypernetwork scored {bad} of {scores.numel()} neurons NaN or inf, so it "
            "cannot pick where to edit; nothing was edited. Edit with a method that needs no "
            "hypernetwork (e.g. method=saliency), and register the model again with a "
            "hypernetwork whose weights are finite"
        )
    return scores


def learned_inputs(
    hypernet: Hypernetwork, task: EditTask, grads: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the network reads beyond the images and targets, each (n_entries,) or None: the
    edit's gradient norms (saliency's, for a ``gradient_input`` network) and its fix per spill
    on the network's own anchors (for a ``spill_input`` one; models/spill.py). ``grads``: the
    edit's gradients, taken here (one backward) if needed and not given."""
    c = hypernet.config
    if grads is None and (c.gradient_input or c.spill_input):
        grads = edit_gradients(task)
    gradient = entry_norms(grads, task.sites) if c.gradient_input else None
    spill = None
    if c.spill_input:
        spill = spill_ranking(grads, hypernet.spill_reference(task.model, task.sites), task.sites)
    return gradient, spill


def mask_counts(sites: Sites, masks: list[torch.Tensor]) -> dict[str, int]:
    """Selected neurons per matrix, keyed by parameter name (for reports)."""
    return {m.param: int(mask.sum()) for m, mask in zip(sites.matrices, masks, strict=True)}


@register(
    "where2edit",
    Where2EditConfig,
    needs_hypernetwork=True,
    description="masked fine-tuning of the neurons a meta-trained hypernetwork selects",
)
def where2edit(
    task: EditTask, config: Where2EditConfig, on_step: StepCallback | None = None
) -> EditOutcome:
    masks = learned_masks(task.hypernetwork, task, config.rho)
    outcome = masked_finetune(task, config, masks=masks, on_step=on_step)
    outcome.extra["mask_per_matrix"] = mask_counts(task.sites, masks)
    return outcome
