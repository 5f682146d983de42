"""Fine-tuning baselines on the editable sites (docs/method.md section 5).

- ``ft``: every neuron of the sites may change; plain cross-entropy.
- ``ft-l1``: CE + c * ||W - W0||_1 over the site matrices.
- ``ft-l2``: CE + c * ||W - W0||^2 / 2 over the site matrices.
The knob is ``c``, swept over the paper's values; c = 0 is plain ``ft``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from models.bounds import bound
from models.editing.optimize import Regularizer, masked_finetune
from models.editing.registry import EditConfig, EditOutcome, EditTask, StepCallback, register

C_VALUES = (0.1, 0.05, 0.025, 0.01, 0.005, 0.001, 0.0)


@dataclass(frozen=True)
class FTConfig(EditConfig):
    """Full fine-tuning of the sites: no mask, no penalty."""


@dataclass(frozen=True)
class PenaltyConfig(EditConfig):
    # weight of the distance-to-pretrained penalty; the paper sweeps 0..0.1, and c = 1e300
    # turned the first step's loss into inf
    c: float = field(default=0.01, metadata=bound("float", 0.0, 10.0))

    knob: ClassVar[str | None] = "c"
    knob_values: ClassVar[tuple[float, ...]] = C_VALUES


@dataclass(frozen=True)
class FTL1Config(PenaltyConfig):
    """FT-L1: CE + c * ||W - W0||_1."""


@dataclass(frozen=True)
class FTL2Config(PenaltyConfig):
    """FT-L2: CE + c * ||W - W0||^2 / 2."""


def l1_distance(current: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    return sum((w - w0).abs().sum() for w, w0 in zip(current, initial, strict=True))


def half_sq_l2_distance(current: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    return sum((w - w0).pow(2).sum() for w, w0 in zip(current, initial, strict=True)) / 2


@register("ft", FTConfig, description="fine-tune every neuron of the sites")
def finetune(task: EditTask, config: FTConfig, on_step: StepCallback | None = None) -> EditOutcome:
    return masked_finetune(task, config, on_step=on_step)


@register("ft-l1", FTL1Config, description="fine-tune the sites, L1 distance to W0 as penalty")
def finetune_l1(
    task: EditTask, config: FTL1Config, on_step: StepCallback | None = None
) -> EditOutcome:
    return masked_finetune(
        task, config, regularizer=_scaled(l1_distance, config.c), on_step=on_step
    )


@register("ft-l2", FTL2Config, description="fine-tune the sites, L2 distance to W0 as penalty")
def finetune_l2(
    task: EditTask, config: FTL2Config, on_step: StepCallback | None = None
) -> EditOutcome:
    return masked_finetune(
        task, config, regularizer=_scaled(half_sq_l2_distance, config.c), on_step=on_step
    )


def _scaled(distance: Regularizer, c: float) -> Regularizer | None:
    """c * distance, or no regularizer at all when c = 0 (plain fine-tuning)."""
    if c == 0:
        return None
    return lambda current, initial: c * distance(current, initial)
