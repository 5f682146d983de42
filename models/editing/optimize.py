"""The one optimiser loop every fine-tuning editor runs (docs/method.md section 4).

RMSprop (torch defaults but the learning rate) on cross-entropy to the edit targets, through the
cached suffix of the split forward pass, with the early stop rule: stop as soon as every edit image
is predicted as its target and the cross-entropy is <= ``config.stop_loss``, else after
``config.max_steps`` steps. A non-finite logit, loss or weight at any step ends the edit with
:class:`~models.errors.EditDiverged` (the options are bounded, but a bound cannot promise that).

The shared model's weights are never written. The trainable tensors are the selected neurons only
(fc1 rows, fc2 columns): each step assembles ``W = W0`` with those rows/columns replaced and swaps
it in for the forward pass (``torch.func.functional_call``). That is exactly masked fine-tuning
(the gradient of a selected row is the masked gradient, the same RMSprop update), unselected
rows/columns are bit-identical by construction, and the optimiser state covers only what may change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from models.editing.registry import EditConfig, EditOutcome, EditTask, StepCallback
from models.errors import EditDiverged
from models.forward import SplitForward
from models.sites import Matrix, Patch

Regularizer = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
"""regularizer(current site weights, initial site weights) -> scalar added to the loss."""

Objective = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
"""objective() -> (logits (N, classes) of the current weights, extra loss term or None)."""


def edit_done(
    logits: torch.Tensor, targets: torch.Tensor, ce: torch.Tensor, stop_loss: float
) -> bool:
    """The early stop rule: every image predicted as its target and CE <= stop_loss."""
    return bool((logits.argmax(dim=-1) == targets).all()) and ce.item() <= stop_loss


def optimise(
    config: EditConfig,
    trainable: list[torch.Tensor],
    objective: Objective,
    targets: torch.Tensor,
    on_step: StepCallback | None = None,
) -> tuple[int, float]:
    """RMSprop on ``trainable`` until the stop rule holds; returns (steps taken, final CE).

    The loop evaluates the objective once more after the last step, so the returned CE is the one
    of the final weights.
    """
    opt = torch.optim.RMSprop(trainable, lr=config.lr)
    step = 0
    while True:
        logits, extra = objective()
        ce = F.cross_entropy(logits, targets)
        loss = ce if extra is None else ce + extra
        require_finite([logits, loss], step, config, "the logits or the loss")
        if step == config.max_steps or edit_done(logits, targets, ce, config.stop_loss):
            return step, ce.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        require_finite(trainable, step, config, "the edited weights")
        if on_step is not None:
            on_step(step, config.max_steps, ce.item())  # may raise EditCanceled


def require_finite(tensors: list[torch.Tensor], step: int, config: EditConfig, what: str) -> None:
    """Stop the edit as soon as a NaN or inf appears: a diverged edit must never be stored."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(finite):
        raise EditDiverged(
            f"the edit diverged: {what} became non-finite (NaN or inf) at step {step} of "
            f"{config.max_steps}; nothing was stored. Lower lr (it was {config.lr:g}) or the "
            "method's penalty, or send fewer steps"
        )


class _Suffix(nn.Module):
    """``split.suffix`` as a module's forward, so functional_call can swap site weights in."""

    def __init__(self, split: SplitForward) -> None:
        super().__init__()
        self.model = split.model
        self._split = split

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._split.suffix(tokens)


def site_logits(task: EditTask) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """weights -> logits of the edit images with those site matrices (Sites order) swapped in."""
    suffix = _Suffix(task.split)
    names = [f"model.{m.param}" for m in task.sites.matrices]
    return lambda weights: functional_call(
        suffix, dict(zip(names, weights, strict=True)), (task.tokens,), tie_weights=False
    )  # none are tied


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No gradient may reach the shared model's parameters; their flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _neurons(
    weight: torch.Tensor, matrix: Matrix, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(indices or None for all, trainable copy of those rows/columns) of one site matrix."""
    if mask is None:
        return None, weight.detach().clone().requires_grad_()
    idx = mask.to(weight.device).nonzero().flatten()
    return idx, weight.detach().index_select(matrix.dim, idx).requires_grad_()


def masked_finetune(
    task: EditTask,
    config: EditConfig,
    masks: list[torch.Tensor] | None = None,
    regularizer: Regularizer | None = None,
    on_step: StepCallback | None = None,
) -> EditOutcome:
    """Fine-tune the site matrices on the edit images; only masked neurons may change.

    ``masks``: one bool/0-1 tensor (hidden,) per matrix in ``task.sites.matrices`` order, or None
    for all neurons. The shared model is never written; the edit comes back as a patch.
    """
    mats = task.sites.matrices
    initial = [p.detach() for p in task.sites.params(task.model)]
    chosen = [
        _neurons(w, m, None if masks is None else k)
        for w, m, k in zip(initial, mats, masks or [None] * len(mats), strict=True)
    ]

    def weights() -> list[torch.Tensor]:
        return [
            t if idx is None else w.index_copy(m.dim, idx, t)
            for w, m, (idx, t) in zip(initial, mats, chosen, strict=True)
        ]

    logits_of = site_logits(task)

    def objective() -> tuple[torch.Tensor, torch.Tensor | None]:
        current = weights()
        return logits_of(current), None if regularizer is None else regularizer(current, initial)

    with frozen(task.model):
        steps, loss = optimise(config, [t for _, t in chosen], objective, task.targets, on_step)
    with torch.no_grad():
        final = weights()
    require_finite(final, steps, config, "the edited weights")
    n_mask = task.sites.n_entries if masks is None else sum(int(m.sum()) for m in masks)
    return EditOutcome(
        Patch.from_diff(task.sites, initial, final),
        steps,
        loss,
        mask_entries=n_mask,
        extra={"stopped_early": steps < config.max_steps},
    )
