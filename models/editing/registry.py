"""The editor registry: a method name -> (config dataclass, edit function), all with one signature.

    outcome = run_edit("ft-l2", task, make_config("ft-l2", c=0.01), on_step=callback)

An edit function reads an :class:`EditTask`, returns an :class:`EditOutcome` holding a sparse
:class:`~models.sites.Patch`, and leaves ``task.model`` exactly as it found it. ``run_edit``
enforces that last promise by restoring the site weights in ``finally``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from models.errors import EditConfigError, UnknownMethodError
from models.forward import SplitForward
from models.sites import Patch, Sites

StepCallback = Callable[[int, int, float], None]
"""on_step(step, max_steps, loss): progress; may raise EditCanceled to stop the edit."""


@dataclass(frozen=True)
class EditConfig:
    """Options every editor shares: the optimiser and its stop rule (method.md section 4)."""

    lr: float = 2e-5
    max_steps: int = 100
    stop_loss: float = 0.01  # stop when every image is predicted as its target and CE <= this
    seed: int = 0

    knob: ClassVar[str | None] = None  # the field a benchmark sweeps (rho, c, rank, ...)
    knob_values: ClassVar[tuple[float, ...]] = ()

    def validate(self) -> None:
        if not self.lr > 0:
            raise EditConfigError(f"lr must be > 0, got {self.lr}")
        if not 1 <= self.max_steps <= 10_000:
            raise EditConfigError(f"max_steps must be in [1, 10000], got {self.max_steps}")
        if self.stop_loss < 0:
            raise EditConfigError(f"stop_loss must be >= 0, got {self.stop_loss}")


@dataclass
class EditTask:
    """One edit: failure images of one group and their target labels, on a frozen backbone."""

    model: nn.Module  # shared, frozen, eval mode; editors must leave it unchanged
    sites: Sites
    split: SplitForward
    images: torch.Tensor  # (N, C, H, W) preprocessed edit images
    targets: torch.Tensor  # (N,) long target labels
    tokens: torch.Tensor  # (N, T, D) = split.prefix(images), computed once
    hypernetwork: Any = None  # models.hypernet.network.Hypernetwork for methods that need one

    @classmethod
    def build(
        cls,
        model: nn.Module,
        sites: Sites,
        images: torch.Tensor,
        targets: torch.Tensor,
        hypernetwork: Any = None,
        split: SplitForward | None = None,
    ) -> EditTask:
        split = split or SplitForward(model, sites)
        return cls(model, sites, split, images, targets, split.prefix(images), hypernetwork)


@dataclass
class EditOutcome:
    patch: Patch
    steps: int  # optimiser steps taken
    loss: float  # final cross-entropy on the edit images
    mask_entries: int | None = None  # mask entries the method was allowed to change
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class EditFn(Protocol):
    def __call__(
        self, task: EditTask, config: Any, on_step: StepCallback | None
    ) -> EditOutcome: ...


@dataclass(frozen=True)
class Editor:
    name: str
    config_cls: type[EditConfig]
    fn: EditFn
    needs_hypernetwork: bool = False
    description: str = ""


EDITORS: dict[str, Editor] = {}


def register(
    name: str,
    config_cls: type[EditConfig],
    *,
    needs_hypernetwork: bool = False,
    description: str = "",
) -> Callable[[EditFn], EditFn]:
    """Decorator: ``@register("ft-l2", FTL2Config)`` on an edit function."""

    def wrap(fn: EditFn) -> EditFn:
        if name in EDITORS:
            raise ValueError(f"editor {name!r} registered twice")
        EDITORS[name] = Editor(name, config_cls, fn, needs_hypernetwork, description)
        return fn

    return wrap


def get_editor(name: str) -> Editor:
    try:
        return EDITORS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown edit method {name!r}; choose one of {sorted(EDITORS)}"
        ) from None


def make_config(name: str, **options: Any) -> EditConfig:
    """Build and validate a method's config from plain options (``None`` = keep the default)."""
    cls = get_editor(name).config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise EditConfigError(
            f"method {name!r} has no option(s) {unknown}; it takes {sorted(fields)}"
        )
    clean = {}
    for key, value in options.items():
        if value is None:
            continue
        kind = type(fields[key].default)
        try:
            clean[key] = kind(value) if kind in (int, float, str, bool) else value
        except (TypeError, ValueError):
            raise EditConfigError(f"option {key}={value!r} must be a {kind.__name__}") from None
    config = cls(**clean)
    config.validate()
    return config


def run_edit(
    name: str, task: EditTask, config: EditConfig, on_step: StepCallback | None = None
) -> EditOutcome:
    """Run an editor; the shared model's site weights are restored whatever happens."""
    editor = get_editor(name)
    if not isinstance(config, editor.config_cls):
        raise EditConfigError(
            f"{name} needs a {editor.config_cls.__name__}, got {type(config).__name__}"
        )
    if editor.needs_hypernetwork and task.hypernetwork is None:
        raise EditConfigError(f"method {name!r} needs a hypernetwork trained for this backbone")
    params = task.sites.params(task.model)
    saved = [p.detach().clone() for p in params]
    grad_flags = [p.requires_grad for p in params]
    try:
        torch.manual_seed(config.seed)
        return editor.fn(task, config, on_step)
    finally:
        with torch.no_grad():
            for p, w, flag in zip(params, saved, grad_flags, strict=True):
                p.copy_(w)
                p.requires_grad_(flag)
                p.grad = None
