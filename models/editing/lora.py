"""LoRA baseline: a low-rank update W = W0 + B @ A on every site matrix.

Trained with the shared optimiser loop (RMSprop, lr, max steps, stop rule) on A and B only; the
site weights themselves are never written: the merged weights are swapped in for each forward pass
(``optimize.site_logits``). The edit is the merged weights, so its patch is dense over the
sites (every neuron a non-zero row of B @ A touches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from models.bounds import bound
from models.editing.optimize import frozen, optimise, require_finite, site_logits
from models.editing.registry import EditConfig, EditOutcome, EditTask, StepCallback, register
from models.sites import Patch

RANK_VALUES = (1, 2, 4, 8)


@dataclass(frozen=True)
class LoRAConfig(EditConfig):
    # rank of each update; scale alpha / rank = 1 (alpha = rank)
    rank: int = field(default=4, metadata=bound("int", 1, 1024))

    knob: ClassVar[str | None] = "rank"
    knob_values: ClassVar[tuple[float, ...]] = RANK_VALUES


def init_factors(
    weight: torch.Tensor, rank: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in) with PEFT's kaiming-uniform init, B (out, rank) zero: the update starts at 0."""
    out_features, in_features = weight.shape
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on a (rank, in) matrix
    a = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
    b = torch.zeros(out_features, rank)
    return (
        a.to(weight.device, weight.dtype).requires_grad_(),
        b.to(weight.device, weight.dtype).requires_grad_(),
    )


@register("lora", LoRAConfig, description="low-rank update of every site matrix (dense patch)")
def lora(task: EditTask, config: LoRAConfig, on_step: StepCallback | None = None) -> EditOutcome:
    gen = torch.Generator().manual_seed(config.seed)
    initial = [p.detach() for p in task.sites.params(task.model)]
    factors = [init_factors(w, config.rank, gen) for w in initial]  # [(A, B)] per matrix

    def merged() -> list[torch.Tensor]:
        return [w + b @ a for w, (a, b) in zip(initial, factors, strict=True)]

    logits_of = site_logits(task)
    trainable = [t for pair in factors for t in pair]
    with frozen(task.model):
        steps, loss = optimise(
            config, trainable, lambda: (logits_of(merged()), None), task.targets, on_step
        )
    with torch.no_grad():
        final = merged()
    require_finite(final, steps, config, "the merged weights W0 + B @ A")
    n_params = sum(t.numel() for t in trainable)
    return EditOutcome(
        Patch.from_diff(task.sites, initial, final),
        steps,
        loss,
        mask_entries=task.sites.n_entries,
        extra={"stopped_early": steps < config.max_steps, "lora_params": n_params},
    )
