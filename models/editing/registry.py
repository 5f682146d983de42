"""The editor registry: a method name -> (config dataclass, edit function), all with one signature.

    outcome = run_edit("ft-l2", task, make_config("ft-l2", c=0.01), on_step=callback)

An edit function reads an :class:`EditTask`, returns an :class:`EditOutcome` holding a sparse
:class:`~models.sites.Patch`, and leaves ``task.model`` exactly as it found it. ``run_edit``
enforces that last promise by restoring the site weights in ``finally``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from models.bounds import SEED_MAX, Bound, bound, bounds_of
from models.errors import EditConfigError, UnknownMethodError
from models.forward import SplitForward
from models.sites import Patch, Sites

StepCallback = Callable[[int, int, float], None]
"""on_step(step, max_steps, loss): progress; may raise EditCanceled to stop the edit."""


@dataclass(frozen=True)
class EditConfig:
    """Options every editor shares: the optimiser and its stop rule (docs/method.md section 4).

    Every numeric option is bounded (:mod:`models.bounds`): an lr or a penalty without a ceiling
    can drive the weights to inf/NaN within a few steps. The bounds are exported with the model's
    registry entry, so the API refuses what :meth:`validate` would.
    """

    # RMSprop's lr; 1 already moves every weight by about 1 per step
    lr: float = field(default=2e-5, metadata=bound("float", 0.0, 1.0, low_open=True))
    max_steps: int = field(default=100, metadata=bound("int", 1, 10_000))
    # stop when every image is predicted as its target and CE <= this
    stop_loss: float = field(default=0.01, metadata=bound("float", 0.0, 100.0))
    seed: int = field(default=0, metadata=bound("int", 0, SEED_MAX))

    knob: ClassVar[str | None] = None  # the field a benchmark sweeps (rho, c, rank, ...)
    knob_values: ClassVar[tuple[float, ...]] = ()

    @classmethod
    def bounds(cls) -> dict[str, Bound]:
        """Every numeric option's bound: the spec the API validates requests against."""
        return bounds_of(dataclasses.fields(cls))

    def validate(self) -> None:
        """Every bounded option in its range (EditConfigError names the first one out of it)."""
        for name, b in self.bounds().items():
            b.check(name, getattr(self, name))


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
    given = {k: v for k, v in options.items() if v is not None}
    bounds = cls.bounds()
    clean = {}
    for key, value in given.items():
        kind = type(fields[key].default)
        if key in bounds:
            clean[key] = bounds[key].check(key, value)
        elif kind in (str, bool) and not isinstance(value, kind):
            raise EditConfigError(f"option {key}={value!r} must be a {kind.__name__}")
        else:
            clean[key] = value
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
