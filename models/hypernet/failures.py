"""Natural-failure episodes: meta-training on the backbone's own mistakes (issue 11, attempt 7).

The paper's episodes are CutMix pseudo-edits (:mod:`models.hypernet.cutmix`): x~ is x with a box
of x' pasted in, the target is the frozen backbone's own prediction on x. Real edits differ: x~
is an image the backbone misclassifies and the target is its true label. A :class:`FailureSampler`
draws such episodes from a :class:`FailureSet` (images the backbone gets wrong, with their true
labels, taken from its *training* split so the benchmark's pool is never touched) and turns each
label into a target distribution the same loss, T^2 KL(softmax(target/T) || softmax(f(x~)/T)),
can use:

- ``raise`` (default): the backbone's own logits on x~ with only the true label's logit raised,
  to where cross-entropy at T = 1 equals ``stop_ce`` (0.5: the edit setting's stop criterion).
  The smallest change of the prediction that the benchmark counts as fixed; every other class
  keeps its logit, as a CutMix target keeps the backbone's prediction on x.
- ``uniform``: ``confidence`` on the true label at temperature T, the rest spread evenly (logits
  T log(confidence (C - 1) / (1 - confidence)) on the label, 0 elsewhere).

A failure set is an ``.npz``: ``images`` uint8 (N, H, W, 3), ``labels`` and ``predictions``
int64 (N,), ``index`` (N,) the images' positions in their split, ``meta`` a JSON string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import DataError
from models.hypernet.cutmix import Episodes, patch_grid

TARGETS = ("raise", "uniform")
STOP_CE = 0.5  # the edit setting's stop criterion on the built-in worlds (CE at T = 1)
CONFIDENCE = 0.9  # the uniform target's probability of the label at temperature T


@dataclass
class FailureSet:
    """Images a backbone misclassifies, with their true labels (and its wrong predictions)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,) true labels
    predictions: np.ndarray  # int64 (N,) the backbone's top-1 on them (never the label)
    index: np.ndarray  # int64 (N,) positions in the split they were read from
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            images=self.images,
            labels=self.labels,
            predictions=self.predictions,
            index=self.index,
            meta=np.array(json.dumps(self.meta)),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FailureSet:
        try:
            with np.load(Path(path)) as data:
                out = cls(
                    data["images"],
                    data["labels"].astype(np.int64),
                    data["predictions"].astype(np.int64),
                    data["index"].astype(np.int64),
                    json.loads(str(data["meta"])),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a failure set ({exc})") from exc
        if not (len(out.images) == len(out.labels) == len(out.predictions) == len(out.index)):
            raise DataError(f"{path}: images, labels, predictions and index differ in length")
        if len(out) < 1:
            raise DataError(f"{path}: the failure set is empty")
        return out


def failures_of(
    logits_fn: Callable[[np.ndarray], torch.Tensor],
    images: np.ndarray,
    labels: np.ndarray,
    batch: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, predictions) of the images whose top-1 under ``logits_fn`` is not the label."""
    preds = np.concatenate(
        [
            logits_fn(images[i : i + batch]).argmax(-1).cpu().numpy()
            for i in range(0, len(images), batch)
        ]
    )
    wrong = np.flatnonzero(preds != labels)
    return wrong, preds[wrong].astype(np.int64)


def uniform_target(
    labels: torch.Tensor, num_classes: int, temperature: float, confidence: float = CONFIDENCE
) -> torch.Tensor:
    """(N, C) logits whose softmax at ``temperature`` puts ``confidence`` on the label, the rest
    evenly on the other classes."""
    if not 1.0 / num_classes < confidence < 1.0:
        raise ValueError(f"confidence must lie in (1/C, 1), got {confidence}")
    top = temperature * math.log(confidence * (num_classes - 1) / (1.0 - confidence))
    out = torch.zeros(len(labels), num_classes)
    out[torch.arange(len(labels)), labels] = top
    return out


def raised_target(
    logits: torch.Tensor, labels: torch.Tensor, stop_ce: float = STOP_CE
) -> torch.Tensor:
    """``logits`` (N, C) with only the label's logit moved to where CE at T = 1 is ``stop_ce``:
    softmax(z)_label = exp(-stop_ce), i.e. z_label = log(q / (1 - q)) + logsumexp of the others."""
    if stop_ce <= 0:
        raise ValueError(f"stop_ce must be positive, got {stop_ce}")
    q = math.exp(-stop_ce)
    rows = torch.arange(len(labels), device=logits.device)
    others = logits.clone()
    others[rows, labels] = -math.inf
    out = logits.clone()
    out[rows, labels] = math.log(q / (1.0 - q)) + others.logsumexp(dim=-1)
    return out


def sibling_index(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """(N,) for each failure, the next failure (cyclically, in file order) with the same true
    and predicted class: a benchmark group's pair. A failure alone in its pair is its own
    sibling. Deterministic, so a resumed run pairs as the first one did."""
    keys = labels.long() * (int(predictions.max()) + 1) + predictions.long()
    order = torch.argsort(keys, stable=True)  # groups contiguous, file order within each
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = starts.cumsum(0) - 1
    first = torch.nonzero(starts).flatten()
    sizes = torch.diff(torch.cat([first, torch.tensor([len(keys)])]))
    position = torch.arange(len(keys)) - first[group]
    nxt = first[group] + (position + 1) % sizes[group]
    out = torch.empty_like(order)
    out[order] = order[nxt]
    return out


class FailureSampler:
    """Draws batches of natural-failure episodes (x~ = a failure, target = its true label) with
    its own seeded generator, as :class:`models.hypernet.cutmix.CutMixSampler` does (same
    :class:`Episodes`; ``clean`` = ``mixed`` = the failure, ``boxes`` the whole grid). Given the
    failures' ``predictions``, each episode also carries its sibling (:func:`sibling_index`)."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        seed: int = 0,
        target: str = "raise",
        stop_ce: float = STOP_CE,
        confidence: float = CONFIDENCE,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        predictions: torch.Tensor | None = None,
    ) -> None:
        if len(images) != len(labels) or len(images) < 1:
            raise DataError(f"{len(images)} failure images for {len(labels)} labels")
        if predictions is not None and len(predictions) != len(labels):
            raise DataError(f"{len(predictions)} predictions for {len(labels)} failure labels")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.model, self.images, self.labels = model, images, labels.long()
        self.temperature, self.target, self.stop_ce = temperature, target, stop_ce
        self.confidence, self.transform = confidence, transform
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = self  # the images episodes draw from (an ImagePool too; its size is logged)
        self.sibling = None if predictions is None else sibling_index(labels, predictions)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.images[indices]
        return self.transform(x) if self.transform is not None else x

    @torch.no_grad()
    def sample(self, batch: int) -> Episodes:
        idx = torch.randint(len(self), (batch,), generator=self.generator)
        x, labels = self.get(idx).to(self.device), self.labels[idx].to(self.device)
        logits = self.model(x)
        if self.target == "raise":
            target = raised_target(logits, labels, self.stop_ce)
        else:
            target = uniform_target(
                labels.cpu(), logits.shape[-1], self.temperature, self.confidence
            )
            target = target.to(logits)
        grid = patch_grid(self.model)[1]
        boxes = torch.tensor([[0, 0, grid, grid]]).expand(batch, 4).clone()
        if self.sibling is None:
            return Episodes(x, x, target, boxes)
        # no draw from the generator: the episode stream is the same with or without siblings
        sib = self.sibling[idx]
        siblings = self.get(sib).to(self.device)
        return Episodes(x, x, target, boxes, siblings, (sib != idx).to(self.device))
