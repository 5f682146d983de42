"""The one optimiser loop every fine-tuning editor runs (method.md section 4).

RMSprop (torch defaults but the learning rate) on cross-entropy to the edit targets, through the
cached suffix of the split forward pass, with the early stop rule: stop as soon as every edit image
is predicted as its target and the cross-entropy is <= ``config.stop_loss``, else after
``config.max_steps`` steps. Masked editors multiply each gradient by its neuron mask, so with
RMSprop (no weight decay, no momentum) an unselected row or column stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.editing.registry import EditConfig, EditOutcome, EditTask, StepCallback
from models.sites import Patch

Regularizer = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
"""regularizer(current site weights, initial site weights) -> scalar added to the loss."""


def edit_done(logits: torch.Tensor, targets: torch.Tensor, ce: torch.Tensor,
              stop_loss: float) -> bool:
    """The early stop rule: every image predicted as its target and CE <= stop_loss."""
    return bool((logits.argmax(dim=-1) == targets).all()) and ce.item() <= stop_loss


def optimise(
    config: EditConfig,
    trainable: list[torch.Tensor],
    logits_fn: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None = None,
    grad_masks: list[torch.Tensor] | None = None,
    on_step: StepCallback | None = None,
) -> tuple[int, float]:
    """RMSprop on ``trainable`` until the stop rule holds; returns (steps taken, final CE).

    ``grad_masks`` (one per trainable tensor, broadcastable) multiply the gradients before each
    step. The loop evaluates the loss once more after the last step, so the returned CE is the one
    of the final weights.
    """
    opt = torch.optim.RMSprop(trainable, lr=config.lr)
    step = 0
    while True:
        logits = logits_fn()  # (N, num_classes)
        ce = F.cross_entropy(logits, targets)
        if step == config.max_steps or edit_done(logits, targets, ce, config.stop_loss):
            return step, ce.item()
        loss = ce if penalty is None else ce + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_masks is not None:
            for p, m in zip(trainable, grad_masks, strict=True):
                p.grad.mul_(m)  # zero gradient -> zero RMSprop update: unselected stay exact
        opt.step()
        step += 1
        if on_step is not None:
            on_step(step, config.max_steps, ce.item())  # may raise EditCanceled


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter but ``params``; restore the flags, grads and site weights on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = [p.detach().clone() for p in params]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
                p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def masked_finetune(
    task: EditTask,
    config: EditConfig,
    masks: list[torch.Tensor] | None = None,
    regularizer: Regularizer | None = None,
    on_step: StepCallback | None = None,
) -> EditOutcome:
    """Fine-tune the site matrices on the edit images; only masked neurons may change.

    ``masks``: one bool/0-1 tensor (hidden,) per matrix in ``task.sites.matrices`` order, or None
    for all neurons. The shared model is left as it was found; the edit comes back as a patch.
    """
    params = task.sites.params(task.model)
    initial = [p.detach().clone() for p in params]
    grad_masks = None
    if masks is not None:
        grad_masks = [task.sites.broadcast(m.to(p.device, p.dtype), mat)
                      for m, p, mat in zip(masks, params, task.sites.matrices, strict=True)]
    penalty = None if regularizer is None else (lambda: regularizer(params, initial))
    with only_trainable(task.model, params):
        steps, loss = optimise(config, params, lambda: task.split.suffix(task.tokens), task.targets,
                               penalty, grad_masks, on_step)
        final = [p.detach().clone() for p in params]
    n_mask = task.sites.n_entries if masks is None else int(sum(int(m.sum()) for m in masks))
    return EditOutcome(Patch.from_diff(task.sites, initial, final), steps, loss,
                       mask_entries=n_mask, extra={"stopped_early": steps < config.max_steps})
