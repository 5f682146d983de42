"""Random-mask baseline: the same masked fine-tuning as where2edit, with a uniformly random mask.

The paper's ablation: if a learned mask does not beat a random one at the same ``rho``, the
hypernetwork has learned nothing. The mask keeps ``rho`` of all entries (fc1 rows and fc2 columns
of every site, one global ranking of random scores), drawn from ``config.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from models.bounds import bound
from models.editing.optimize import masked_finetune
from models.editing.registry import EditConfig, EditOutcome, EditTask, StepCallback, register
from models.sites import Sites, top_rho_mask

RHO_VALUES = (0.75, 0.5, 0.25, 0.1, 0.05)


@dataclass(frozen=True)
class MaskConfig(EditConfig):
    """Options of a masked editor: ``rho``, the fraction of all mask entries that may change."""

    rho: float = field(default=0.1, metadata=bound("float", 0.0, 1.0, low_open=True))

    knob: ClassVar[str | None] = "rho"
    knob_values: ClassVar[tuple[float, ...]] = RHO_VALUES


@dataclass(frozen=True)
class RandomMaskConfig(MaskConfig):
    """A uniformly random mask at ``rho``."""


def random_masks(sites: Sites, rho: float, seed: int) -> list[torch.Tensor]:
    """One bool (hidden,) mask per matrix, together keeping the top ``rho`` of random scores."""
    scores = torch.rand(sites.n_entries, generator=torch.Generator().manual_seed(seed))
    return sites.split(top_rho_mask(scores, rho))


@register("random", RandomMaskConfig, description="masked fine-tuning with a uniformly random mask")
def random_mask(
    task: EditTask, config: RandomMaskConfig, on_step: StepCallback | None = None
) -> EditOutcome:
    masks = random_masks(task.sites, config.rho, config.seed)
    return masked_finetune(task, config, masks=masks, on_step=on_step)
