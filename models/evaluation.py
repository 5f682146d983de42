"""Edit metrics (docs/method.md section 6): SR, GR, LR, their aggregation, GR-vs-LR fronts.

For an error group G of failure images with true label y, each edit starts from the same model and
uses edit image(s) E of G (one image in the paper's protocol):

- SR (reliability): share of E the edited model predicts as y;
- GR (generalization): accuracy of the edited model on G without E (divides by |G| - |E|; the
  reference code divides by |G|, a bug we do not copy);
- LR (locality): share of the locality images whose top-1 prediction the edit leaves unchanged.

Numbers are averaged over the edits of a group, then over groups. Prefix tokens of the groups and
of the locality set are computed once (:class:`EvalSet`), and so are the base locality predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.forward import SplitForward
from models.sites import Patch

METRIC_DEFINITIONS = {
    "SR": "reliability: share of the edit images the edited model predicts as their group's "
    "true label",
    "GR": "generalization: accuracy of the edited model on the edit image's group without the edit "
    "image(s), i.e. divided by |G| - 1 for one edit image",
    "LR": "locality: share of the locality images whose top-1 prediction is unchanged by the edit",
    "aggregation": "each image of a group edited independently from the same model; averaged over "
    "the edits of a group, then over groups",
}


@dataclass(frozen=True)
class EditScore:
    sr: float
    gr: float
    lr: float


def predictions(
    split: SplitForward, tokens: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Top-1 predictions (N,) of the model from cached prefix tokens."""
    return split.logits(tokens, batch_size).argmax(dim=-1)


def edit_score(
    group_preds: torch.Tensor,
    label: int,
    edit_idx: Sequence[int],
    locality_preds: torch.Tensor,
    base_locality_preds: torch.Tensor,
) -> EditScore:
    """SR, GR, LR of one edit from the edited model's predictions on its group and locality set."""
    is_edit = torch.zeros(len(group_preds), dtype=torch.bool)
    is_edit[list(edit_idx)] = True
    if bool(is_edit.all()):
        raise ValueError("GR needs at least one group image that is not an edit image")
    correct = (group_preds.cpu() == label).float()
    unchanged = (locality_preds.cpu() == base_locality_preds.cpu()).float()
    return EditScore(
        sr=correct[is_edit].mean().item(),
        gr=correct[~is_edit].mean().item(),
        lr=unchanged.mean().item(),
    )


@dataclass(frozen=True)
class GroupTokens:
    name: str
    label: int
    tokens: torch.Tensor  # (N, T, D) prefix tokens of the group's images


@dataclass
class EvalSet:
    """A benchmark prepared for repeated evaluation: prefix tokens and base locality predictions."""

    split: SplitForward
    groups: list[GroupTokens]
    locality_tokens: torch.Tensor  # (L, T, D)
    base_locality_preds: torch.Tensor  # (L,) predictions of the unedited model

    @classmethod
    def prepare(
        cls,
        split: SplitForward,
        groups: Sequence[tuple[str, int, torch.Tensor]],
        locality_images: torch.Tensor,
    ) -> EvalSet:
        """``groups``: (name, true label, preprocessed images (N, C, H, W)) per group."""
        tokens = [
            GroupTokens(name, int(label), split.prefix(images)) for name, label, images in groups
        ]
        locality = split.prefix(locality_images)
        return cls(split, tokens, locality, predictions(split, locality))

    def score(self, patch: Patch, group: int, edit_idx: Sequence[int]) -> EditScore:
        """Apply ``patch``, score the edit of group ``group`` made from ``edit_idx``, revert."""
        g = self.groups[group]
        group_preds, locality_preds = patched_predictions(
            self.split, patch, [g.tokens, self.locality_tokens]
        )
        return edit_score(group_preds, g.label, edit_idx, locality_preds, self.base_locality_preds)


def patched_logits(
    split: SplitForward, patch: Patch, token_sets: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Logits of the patched model on each token set; the model is restored bit-exactly."""
    model: nn.Module = split.model
    backup: dict[str, torch.Tensor] = {}
    try:  # restored even if apply is cut off midway
        patch.apply(model, backup)
        return [split.logits(tokens) for tokens in token_sets]
    finally:
        patch.revert(model, backup)


def patched_predictions(
    split: SplitForward, patch: Patch, token_sets: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Top-1 predictions of the patched model on each token set (model restored bit-exactly)."""
    return [logits.argmax(dim=-1) for logits in patched_logits(split, patch, token_sets)]


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class GroupResult:
    name: str
    n_edits: int
    sr: float
    gr: float
    lr: float


def group_result(name: str, scores: Sequence[EditScore]) -> GroupResult:
    """Mean SR, GR, LR over the edits of one group."""
    if not scores:
        raise ValueError(f"group {name} has no edits to average")
    n = len(scores)
    return GroupResult(
        name,
        n,
        sum(s.sr for s in scores) / n,
        sum(s.gr for s in scores) / n,
        sum(s.lr for s in scores) / n,
    )


def overall(groups: Sequence[GroupResult]) -> EditScore:
    """Mean over groups of the per-group means (each group weighs the same)."""
    if not groups:
        raise ValueError("no groups to average")
    n = len(groups)
    return EditScore(
        sum(g.sr for g in groups) / n, sum(g.gr for g in groups) / n, sum(g.lr for g in groups) / n
    )


# --------------------------------------------------------------------------- fronts


@dataclass(frozen=True)
class FrontPoint:
    """One knob value of a method: its overall SR, GR, LR (knob None for knob-less methods)."""

    knob: float | None
    sr: float
    gr: float
    lr: float

    def to_json(self) -> dict:
        return asdict(self)


def pareto_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """Points no other point beats on both GR and LR (ties kept), sorted by increasing LR."""

    def dominated(p: FrontPoint) -> bool:
        return any(q.gr >= p.gr and q.lr >= p.lr and (q.gr > p.gr or q.lr > p.lr) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p.lr, -p.gr))


def best_gr_at_lr(points: Sequence[FrontPoint], min_lr: float = 0.9) -> FrontPoint | None:
    """The point with the highest GR among those with LR >= ``min_lr`` (None if there is none)."""
    eligible = [p for p in points if p.lr >= min_lr and not math.isnan(p.gr)]
    return max(eligible, key=lambda p: (p.gr, p.lr), default=None)


# --------------------------------------------------------------------------- intervals


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per group).

    Groups are the unit the benchmark samples, so they are what is resampled (with replacement).
    """
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_difference_ci(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean of a - b over the same groups, and its bootstrap interval (groups resampled in pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same groups: {len(a)} vs {len(b)}")
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return sum(diff) / len(diff), bootstrap_ci(diff, n_resamples, seed)
