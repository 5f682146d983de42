"""Meta-training the hypernetwork: the decoupled bi-level loop of docs/method.md section 3.

Per iteration, on a batch of B CutMix episodes (x, x~, f(x)):

1. fresh mask logits s ~ U(-1, 1), shape (B, n_entries) in Sites order; soft mask m = sigmoid(10 s);
2. S outer steps of RMSprop on s. Each starts every episode from the pristine weights W0 and takes
   K masked SGD steps on its loss L = T^2 KL(softmax(f(x)/T) || softmax(f(x~; W)/T)):
   W <- W - eta * m * grad (gradients detached: no graph through the inner steps). So the final
   weights are W0 + m * D with D = -eta * sum_k grad_k (``inner_optimiser="rmsprop"``: the sum
   of RMSprop's steps instead, the edit's own optimiser), and the outer loss
   J = sum_e L_e(W0 + m_e * D_e) + lambda * mean(m) reaches s only through m;
3. R regression steps of the hypernetwork on the same batch: 0.1 * BCE(H(cls(x~)), sigmoid(3 s))
   (``regression_target="movement"``: sigmoid(3 (s - s0)), what the search added to its start).

``target_source="edits"`` (not in the paper) replaces step 2's search by real edits of candidate
hard masks, scored by their outcome ("targets from real edits" below; docs/method.md section 3).

Speed without changing the maths: the frozen prefix runs once per batch (SplitForward); the B
episodes run together in one batch, each with its own site weights W0 + m_e * D_e, where D_e is
kept as the low-rank sum of its per-token gradient terms (:class:`Factors`, :class:`DeltaLinear`)
instead of B dense copies (or dense, :class:`DenseDelta`, where that is smaller: ViT-B); the first inner gradient (at W0, independent of m) is computed once
per batch and reused by the S outer steps. :func:`search_masks_reference` is the straightforward
loop (one deep copy per episode, full forward passes), kept for the benchmark and the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.func import functional_call

from models.backbones import Backbone
from models.errors import DataError, HypernetworkMismatchError, MetaTrainingUnhealthy
from models.forward import SplitForward
from models.hypernet.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from models.hypernet.cutmix import CutMixSampler, Episodes, ImagePool
from models.hypernet.episodes import (
    Anchors,
    BatchedEpisodes,
    Delta,
    DenseDelta,
    episode_kl,
    margins,
    one_hot_logits,
)
from models.hypernet.network import (
    HypernetConfig,
    Hypernetwork,
    cls_features,
    feature_dim,
    row_ranks,
    target_features,
)
from models.sites import Sites
from models.spill import (
    MAX_ANCHORS,
    CleanAnchors,
    SpillReference,
    spill_ranking,
)

log = logging.getLogger(__name__)


class EpisodeSampler(Protocol):
    """Where episodes come from: :class:`CutMixSampler` (the paper's) or another source with
    the same interface (a seeded ``generator`` saved in checkpoints, a ``pool`` of images)."""

    generator: torch.Generator
    pool: ImagePool

    def sample(self, batch: int) -> Episodes: ...


INNER_OPTIMISERS = ("sgd", "rmsprop")
REGRESSION_TARGETS = ("logits", "movement")
OUTER_OPTIMISERS = ("rmsprop", "sgd")
SEARCH_STARTS = ("uniform", "zero")
TARGET_SOURCES = ("search", "edits")
TARGET_PICKS = ("spill", "sibling-per-spill")
# Each candidate holds dense per-episode deltas, RMSprop state and gradients (about 5 MB per
# episode on the built-in worlds, 170 MB on ViT-B's default sites): past this no batch fits.
MAX_CANDIDATES = 64
KL_FLOOR = 1e-8  # sibling-per-spill divides by the anchor KL: an edit that spills nothing
MAX_EDIT_STEPS = 10_000  # the most steps an edit may take (EditConfig.max_steps's bound)
SPILL_POOL_DRAW = 4096  # pool images the spill candidate's anchors are chosen from, at most
MARGIN_CHUNK = 256  # pool images per forward pass when their margins are first taken
MAX_ANCHOR_DRAWS = 65_536  # pool images drawn per iteration for the episodes' anchors, at most
# torch.optim.RMSprop's own defaults (read, not copied), as the edit runs it
_RMSPROP = inspect.signature(torch.optim.RMSprop).parameters
RMSPROP_ALPHA, RMSPROP_EPS = _RMSPROP["alpha"].default, _RMSPROP["eps"].default


@dataclass(frozen=True)
class MetaTrainConfig:
    """The paper's defaults; small backbones may need others (docs/method.md section 3)."""

    iterations: int = 10_000
    batch: int = 8  # B episodes per iteration
    outer_steps: int = 10  # S
    outer_lr: float = 0.1  # RMSprop on s
    # "rmsprop" (the paper's): every entry of s moves about outer_lr / sqrt(1 - alpha) per step,
    # whatever its gradient, so the final s keeps its random start's order (docs/method.md).
    # "sgd": s moves in proportion to dJ/ds, so the order carries how much each entry helps.
    outer_optimiser: str = "rmsprop"
    # "uniform" (the paper's): s0 ~ U(-1, 1), so m = sigmoid(10 s0) starts saturated for most
    # entries and dJ/ds carries the start's m (1 - m). "zero": s0 = 0, every entry at m = 0.5 with
    # the same slope, so the first step reads the episode alone (the draw is still made, so the
    # episodes stay those of a uniform-start run with the same seed).
    search_start: str = "uniform"
    inner_steps: int = 5  # K
    inner_lr: float = 1e-3  # eta
    # "sgd" (the paper's): D = -eta * sum_k grad_k, steps proportional to the gradient. "rmsprop":
    # the edit's own optimiser (models/editing/optimize.py: torch's RMSprop, defaults but the lr),
    # whose steps are about eta * sign(grad) per entry, so a masked entry with a small gradient
    # moves as far as one with a large gradient, as it does in the edit.
    inner_optimiser: str = "sgd"
    temperature: float = 5.0  # T
    sparsity: float = 1.0  # lambda
    sharpness: float = 10.0  # m = sigmoid(sharpness * s)
    regression_steps: int = 4
    regression_lr: float = 1e-4
    regression_weight: float = 0.1
    # "logits" (the paper's): regress onto sigmoid(3 s). "movement": onto sigmoid(3 (s - s0)),
    # s0 the search's random start. With lambda 1 the final s keeps the start's ranking (rank
    # correlation 0.65 with s0 on Tiny-ImageNet; scripts/search_anatomy.py), and its top 1% is
    # mostly the start's; the movement is the part the episode decided.
    regression_target: str = "logits"
    schedule_iterations: int | None = None  # cosine length; None = 2 x iterations (ref 20k/10k)
    seed: int = 0
    # Not in the paper (0 = its objective): mu * mean KL on `anchors` clean pool images per episode,
    # the lowest-margin of `anchors * anchor_draws` drawn, added to J: masks that spill less.
    locality: float = 0.0
    anchors: int = 2
    anchor_draws: int = 4
    # Where the regression targets come from. "search" (the paper's): the mask search above.
    # "edits" (not in the paper; docs/method.md section 3): `candidates` hard masks per episode,
    # each the top `edit_rho` of a ranking (the hypernetwork's own, saliency's, and mixes of the
    # two), are each run as the real edit (RMSprop at inner_lr on the episode target's CE at
    # T = 1, until it falls to `edit_stop` or `edit_steps` are spent); the target is the mask that
    # fixes the episode with the least KL on `anchors` sensitive clean images per episode (if
    # none fixes it, the one that comes closest). A target scored by the edit's own outcome.
    target_source: str = "search"
    edit_rho: float = 0.02
    candidates: int = 4
    edit_steps: int = 50
    edit_stop: float = 0.5
    # Not in the paper, with "edits" only (0 = off): one more candidate per episode, the top
    # `edit_rho` by first-order edit-loss descent per first-order margin loss on this many fixed
    # lowest-margin pool images (models/spill.py; scripts/spill_saliency.py's `saliency-spill`).
    spill_anchors: int = 0
    # Not in the paper, with "edits" only (True = as before): False still runs the network's own
    # mask as a candidate (logged) but never picks it as the target, so the regression never
    # fits the network's own output back onto itself.
    own_target: bool = True
    # How "edits" picks among the candidates that fix the episode. "spill" (as before): the least
    # anchor KL. "sibling-per-spill" (not in the paper; natural failures only): the most CE the
    # edit takes off the episode's sibling (another failure of the same true and predicted
    # class, what a benchmark group generalizes to) per unit of anchor KL, i.e. generalization
    # per spill, the headline's GR at matched LR in one episode; where the failure has no
    # sibling, the least anchor KL.
    target_pick: str = "spill"

    def __post_init__(self) -> None:
        positive = (
            "iterations",
            "batch",
            "outer_steps",
            "inner_steps",
            "regression_steps",
            "anchors",
            "anchor_draws",
        )
        rates = ("outer_lr", "inner_lr", "regression_lr", "temperature", "sharpness", "edit_stop")
        weights = ("sparsity", "regression_weight", "locality")  # 0 turns a term off
        problems = [(n, "must be at least 1") for n in positive if getattr(self, n) < 1]
        top = torch.finfo(torch.float32).max  # torch's optimisers take rates as float32
        problems += [
            (n, "must be positive and finite") for n in rates if not 0 < getattr(self, n) < top
        ]
        problems += [
            (n, "must be 0 or more and finite") for n in weights if not 0 <= getattr(self, n) < top
        ]
        choices = {
            "inner_optimiser": INNER_OPTIMISERS,
            "outer_optimiser": OUTER_OPTIMISERS,
            "search_start": SEARCH_STARTS,
            "regression_target": REGRESSION_TARGETS,
            "target_source": TARGET_SOURCES,
            "target_pick": TARGET_PICKS,
        }
        problems += [
            (n, f"must be one of {', '.join(allowed)}")
            for n, allowed in choices.items()
            if getattr(self, n) not in allowed
        ]
        if not 0 < self.edit_rho <= 1:
            problems.append(("edit_rho", "must be in (0, 1]"))
        if not 2 <= self.candidates <= MAX_CANDIDATES:
            problems.append(
                ("candidates", f"must be 2 (its own mask and saliency's) to {MAX_CANDIDATES}")
            )
        if not 1 <= self.edit_steps <= MAX_EDIT_STEPS:
            problems.append(("edit_steps", f"must be 1 to {MAX_EDIT_STEPS}"))
        if not 0 <= self.spill_anchors <= MAX_ANCHORS:
            problems.append(("spill_anchors", f"must be 0 (off) to {MAX_ANCHORS}"))
        if self.batch * self.anchors * self.anchor_draws > MAX_ANCHOR_DRAWS:
            problems.append(
                (
                    "anchor_draws",
                    f"batch x anchors x anchor_draws must be at most {MAX_ANCHOR_DRAWS:,} pool "
                    "images an iteration",
                )
            )
        if self.spill_anchors and (self.target_source != "edits" or self.candidates < 3):
            problems.append(("spill_anchors", "needs targets from edits and 3 or more candidates"))
        if not self.own_target and self.target_source != "edits":
            problems.append(("own_target", "False needs targets from edits"))
        if self.target_pick != "spill" and self.target_source != "edits":
            problems.append(("target_pick", f"{self.target_pick!r} needs targets from edits"))
        if self.target_source == "edits" and self.inner_optimiser != "rmsprop":
            problems.append(("inner_optimiser", "must be rmsprop (the edit's own) for edits"))
        if problems:
            what = "; ".join(f"{n} {why}" for n, why in problems)
            got = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in problems)
            raise ValueError(f"invalid meta-training config: {what} (got {got})")

    def regression_lr_at(self, iteration: int) -> float:
        length = self.schedule_iterations or 2 * self.iterations
        return 0.5 * self.regression_lr * (1 + math.cos(math.pi * min(iteration, length) / length))


# ------------------------------------------------------------------------ health checks

HEALTH_AFTER = 50  # iterations before the first check: the regression needs a few to start
MIN_DENSITY, MAX_DENSITY = 0.002, 0.998  # a mask this empty or this full selects nothing
MIN_KL_MOVE = 0.01  # the searched masks' edit must move the pseudo-edit's KL by >= 1% (relative)
MAX_RANK_IOU = 0.95  # top-10% masks this alike across episodes: one mask for every image


def health_problem(entry: dict[str, float], cfg: MetaTrainConfig) -> str | None:
    """What is wrong with a logged window of meta-training (None: nothing), and what to change.

    The failure it catches (docs/method.md section 3, the inner rate): with the paper's inner lr
    1e-3 on a small ViT trained from scratch the edit does not move the pseudo-edit's KL and the
    masks end empty. And a hypernetwork whose masks no longer depend on the image.
    """
    s = entry["s_density"]
    if s < MIN_DENSITY:
        return (
            f"the mask search ends with empty masks (density {s:.4f}): inner steps of lr "
            f"{cfg.inner_lr:g} barely move this backbone, so no neuron is worth selecting. "
            f"Raise --inner-lr (try {cfg.inner_lr * 10:g} or {cfg.inner_lr * 100:g})"
        )
    if s > MAX_DENSITY:
        return (
            f"the mask search ends with full masks (density {s:.4f}): the sparsity term "
            f"(lambda {cfg.sparsity:g}) is too weak for this backbone. Raise --sparsity"
        )
    return _kl_unmoved(entry, cfg) or _collapse(entry, cfg)


def _kl_unmoved(entry: dict[str, float], cfg: MetaTrainConfig) -> str | None:
    """Inner steps too small to matter: an edit that leaves the pseudo-edit where the unedited
    backbone had it (the searched masks' KL against the KL at W0)."""
    first, last = entry["kl_first"], entry["kl_last"]
    unedited = entry.get("kl_unedited", math.nan)  # absent from windows logged before session 18
    advice = (
        f"the masked inner steps (lr {cfg.inner_lr:g}) change too little to tell good masks "
        "from bad. Raise --inner-lr"
    )
    if math.isfinite(unedited) and unedited > 0:
        moved = (unedited - last) / unedited
        if moved < MIN_KL_MOVE:
            return (
                f"the searched masks' edit moves the pseudo-edits' KL by only {moved:.1%} from "
                f"the unedited backbone's ({unedited:.4f} -> {last:.4f}): {advice}"
            )
        return None
    # Older windows (no KL at W0): how far the search moves the KL over its steps, either way. It
    # misreads searches whose masks stay useful while they thin out: a sparsity weight (the KL
    # rises while J falls), a zero start (m = 0.5 everywhere first, matched by the sparse end),
    # and ten inner steps (session 18: 0.0714 -> 0.0721, J 1.07 -> 0.64, masks 6% dense).
    moved = abs(first - last) / first if first > 0 else 0.0
    if moved < MIN_KL_MOVE and cfg.search_start != "zero":
        return (
            f"the mask search moves the pseudo-edits' KL by only {moved:.1%} over its "
            f"{cfg.outer_steps} steps ({first:.4f} -> {last:.4f}): {advice}"
        )
    return None


def _collapse(entry: dict[str, float], cfg: MetaTrainConfig) -> str | None:
    """The hypernetwork's part of :func:`health_problem`."""
    s, h = entry["s_density"], entry["h_density"]
    # The edit reads the hypernetwork's ranking (its top rho), not its scores against 0.5: scores
    # that all sit below 0.5 still select (the BCE optimum when the searched masks are dense and
    # unlike each other). Collapsed means the ranking no longer depends on the episode.
    if entry.get("h_iou", 0.0) >= MAX_RANK_IOU:
        return (
            f"the hypernetwork's masks collapsed: its top 10% is the same for every episode "
            f"(IoU {entry['h_iou']:.3f}; searched masks {s:.3f} dense, its own {h:.4f}), so it "
            f"no longer reads the image. Lower --regression-lr (now {cfg.regression_lr:g})"
        )
    return None


@dataclass
class MaskSearch:
    """The outcome of step 2 for one batch."""

    s: torch.Tensor  # (B, n_entries) optimised mask logits
    kl: list[float]  # mean episode loss L at each outer step
    loss: list[float]  # outer objective J at each outer step
    anchor_kl: list[float] = dataclasses.field(default_factory=list)  # with a locality term
    kl_unedited: float = math.nan  # mean episode loss L at W0, before any edit
    # (B, n_entries) each entry's gradient norm of L at W0 (fc1 row / fc2 column), what saliency
    # ranks by; a gradient_input hypernetwork reads it
    gradient: torch.Tensor | None = None


def search_masks(
    batch: BatchedEpisodes, s0: torch.Tensor, cfg: MetaTrainConfig, anchors: Anchors | None = None
) -> MaskSearch:
    """Step 2, all episodes at once. ``s0``: (B, n_entries) initial logits; ``anchors`` add
    ``cfg.locality`` times their mean KL to J (the optional locality term)."""
    s = s0.clone().requires_grad_()
    opt = outer_optimiser([s], cfg)
    # the first inner gradient does not depend on m; its forward also gives the KL before any edit
    grad_at_w0, loss_at_w0 = batch.grads_and_losses(batch.zeros())
    kl_unedited = loss_at_w0.mean().item()
    dense = [g.dense() for g in grad_at_w0]
    gradient = entry_norms(batch.sites, dense)
    if cfg.inner_optimiser == "rmsprop":  # elementwise state: dense per episode
        grad_at_w0 = [DenseDelta(d) for d in dense]
    kls, losses, anchor_kls = [], [], []
    for _ in range(cfg.outer_steps):
        m = torch.sigmoid(cfg.sharpness * s)  # (B, n_entries)
        steps = _inner_steps(batch, m.detach(), grad_at_w0, cfg)  # D, detached from s
        final = _masked(batch.sites, m, steps)
        kl = batch.losses(final)  # (B,), graph to s through m
        loss = kl.sum() + cfg.sparsity * m.mean()
        if anchors is not None:
            anchor_kl = batch.anchor_losses(final, anchors)
            loss = loss + cfg.locality * anchor_kl.sum()
            anchor_kls.append(anchor_kl.mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        kls.append(kl.mean().item())
        losses.append(loss.item())
    return MaskSearch(s.detach(), kls, losses, anchor_kls, kl_unedited, gradient)


def entry_norms(sites: Sites, grads: list[torch.Tensor]) -> torch.Tensor:
    """(B, n_entries) from per-episode weight gradients (B, out, in) per matrix: the norm over
    each fc1 row (dim 0) or fc2 column (dim 1), as saliency scores a neuron."""
    pairs = zip(grads, sites.matrices, strict=True)
    return torch.cat([g.norm(dim=2 - matrix.dim) for g, matrix in pairs], dim=1)


def outer_optimiser(params: list[torch.Tensor], cfg: MetaTrainConfig) -> torch.optim.Optimizer:
    """The optimiser of the mask logits s: torch's RMSprop (the paper's) or plain SGD."""
    if cfg.outer_optimiser == "sgd":
        return torch.optim.SGD(params, lr=cfg.outer_lr)
    return torch.optim.RMSprop(params, lr=cfg.outer_lr)


def _inner_steps(
    batch: BatchedEpisodes, m: torch.Tensor, grad_at_w0: list[Delta], cfg: MetaTrainConfig
) -> list[Delta]:
    """D after K inner steps at weights W0 + m * D (m a constant): sgd's -eta * sum_k grad_k, kept
    as factors where smaller, or RMSprop's per-entry steps (dense)."""
    if cfg.inner_optimiser == "sgd":
        steps = batch.zeros([g.r * cfg.inner_steps for g in grad_at_w0])  # rank after K steps
        for k in range(cfg.inner_steps):
            grads = grad_at_w0 if k == 0 else batch.grads(_masked(batch.sites, m, steps))
            steps = [d.plus(g, -cfg.inner_lr) for d, g in zip(steps, grads, strict=True)]
        return steps
    steps = [DenseDelta(torch.zeros_like(g.d)) for g in grad_at_w0]
    square_avg = [torch.zeros_like(g.d) for g in grad_at_w0]
    for k in range(cfg.inner_steps):
        grads = grad_at_w0 if k == 0 else batch.grads(_masked(batch.sites, m, steps))
        for d, g, v in zip(steps, grads, square_avg, strict=True):  # in place: no graph here
            dense = g.dense()
            v.mul_(RMSPROP_ALPHA).addcmul_(dense, dense, value=1 - RMSPROP_ALPHA)
            d.d.addcdiv_(dense, v.sqrt().add_(RMSPROP_EPS), value=-cfg.inner_lr)
    return steps


def _masked(sites: Sites, m: torch.Tensor, steps: list[Delta]) -> list[Delta]:
    """m * D per matrix, from the flat (B, n_entries) mask."""
    parts = zip(sites.split(m), steps, sites.matrices, strict=True)
    return [d.masked(mk, matrix) for mk, d, matrix in parts]


def _broadcast(sites: Sites, m: torch.Tensor) -> list[torch.Tensor]:
    """Flat mask (..., n_entries) -> per matrix, broadcastable over fc1 rows / fc2 columns."""
    pairs = zip(sites.split(m), sites.matrices, strict=True)
    return [Sites.broadcast(mk, mat) for mk, mat in pairs]


def search_masks_reference(
    model: nn.Module, sites: Sites, episodes: Episodes, s0: torch.Tensor, cfg: MetaTrainConfig
) -> MaskSearch:
    """Step 2, the straightforward way: one deep copy of the model per episode, full forwards.

    Same maths as :func:`search_masks` (RMSprop is elementwise, so one optimiser per episode
    slice equals one over the whole batch); used only to benchmark and test the batched loop.
    """
    n_total = s0.numel()  # lambda * mean(m) over the whole batch
    kls, losses = torch.zeros(cfg.outer_steps), torch.zeros(cfg.outer_steps)
    finals, kl_unedited, gradient = [], 0.0, []
    for e in range(len(s0)):
        episode = copy.deepcopy(model)
        params = sites.params(episode)
        for p in params:
            p.requires_grad_()
        w0 = [p.detach().clone() for p in params]
        image, clean = episodes.mixed[e : e + 1], episodes.clean_logits[e : e + 1]
        loss = episode_kl(episode(image), clean, cfg.temperature).sum()
        kl_unedited += loss.item() / len(s0)
        grads = torch.autograd.grad(loss, params)  # at W0
        gradient.append(entry_norms(sites, [g.unsqueeze(0) for g in grads]))
        s = s0[e : e + 1].clone().requires_grad_()
        opt = outer_optimiser([s], cfg)
        for step in range(cfg.outer_steps):
            m = torch.sigmoid(cfg.sharpness * s)[0]
            masks = _broadcast(sites, m)
            steps = [torch.zeros_like(w) for w in w0]  # D = -eta * sum_k grad_k for sgd
            inner = torch.optim.RMSprop(steps, lr=cfg.inner_lr)  # used for "rmsprop" only
            for _ in range(cfg.inner_steps):
                with torch.no_grad():  # inner weights W0 + m * D, m taken as a constant
                    for p, w, mk, d in zip(params, w0, masks, steps, strict=True):
                        p.copy_(w + mk.detach() * d)
                loss = episode_kl(episode(image), clean, cfg.temperature).sum()
                grads = torch.autograd.grad(loss, params)
                if cfg.inner_optimiser == "rmsprop":  # torch's own, as the edit runs it
                    for d, g in zip(steps, grads, strict=True):
                        d.grad = g
                    inner.step()
                else:
                    steps = [d - cfg.inner_lr * g for d, g in zip(steps, grads, strict=True)]
            final = {
                mat.param: w + mk * d
                for mat, w, mk, d in zip(sites.matrices, w0, masks, steps, strict=True)
            }
            kl = episode_kl(functional_call(episode, final, (image,)), clean, cfg.temperature).sum()
            opt.zero_grad(set_to_none=True)
            loss = kl + cfg.sparsity * m.sum() / n_total
            loss.backward()
            opt.step()
            kls[step] += kl.item() / len(s0)
            losses[step] += loss.item()
        finals.append(s.detach())
    return MaskSearch(
        torch.cat(finals),
        kls.tolist(),
        losses.tolist(),
        kl_unedited=kl_unedited,
        gradient=torch.cat(gradient),
    )


# ------------------------------------------------------------ targets from real edits (not the paper's)

CANDIDATE_KINDS = ("own", "saliency", "spill", "mixed")  # in candidate order; spill if asked


def top_masks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 masks (..., n) of the top ``k`` entries of each row of ``scores`` (..., n)."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def candidate_masks(
    own_logits: torch.Tensor,
    saliency: torch.Tensor,
    k: int,
    candidates: int,
    generator: torch.Generator,
    spill: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, candidates, n) 0/1 masks of k entries each: the top k of the hypernetwork's logits,
    of saliency's gradient norms, of ``spill``'s scores if given (fix per spill), then masks
    between the first two: the top k of a * own rank + (1 - a) * saliency's rank, a ~ U(0, 1)
    per mask (``where2edit-sal``'s rule at a random mix; ranks, as the two scores have unrelated
    scales)."""
    ends = [top_masks(own_logits, k), top_masks(saliency, k)]
    if spill is not None:
        ends.append(top_masks(spill, k))
    mix = torch.rand((own_logits.shape[0], candidates - len(ends), 1), generator=generator)
    mix = mix.to(own_logits.device)
    own_rank, saliency_rank = row_ranks(own_logits).unsqueeze(1), row_ranks(saliency).unsqueeze(1)
    mixed = top_masks(mix * own_rank + (1 - mix) * saliency_rank, k)
    return torch.cat([torch.stack(ends, dim=1), mixed], dim=1)


def candidate_kinds(candidates: int, spill: bool) -> list[str]:
    """The kind of each candidate of :func:`candidate_masks`, in order."""
    ends = ["own", "saliency", "spill"] if spill else ["own", "saliency"]
    return (ends + ["mixed"] * candidates)[:candidates]


@dataclass
class EditOutcomes:
    """Real edits of one batch, one row per (episode, mask)."""

    steps: torch.Tensor  # (N,) optimiser steps taken
    loss: torch.Tensor  # (N,) the edit's loss at its end
    fixed: torch.Tensor  # (N,) bool: loss <= the stop
    anchor_kl: torch.Tensor  # (N,) mean KL on the episode's anchor images at its end
    deltas: list[DenseDelta]  # D per site matrix, (N, out, in); the edit is W0 + m * D
    probe: torch.Tensor | None = None  # (N,) mean loss on the probe images at its end, if given


def edit_outcomes(
    batch: BatchedEpisodes,
    masks: torch.Tensor,
    anchors: Anchors,
    cfg: MetaTrainConfig,
    probe: Anchors | None = None,
) -> EditOutcomes:
    """Run the edit on every row of ``batch`` (its loss: the edit's CE, :meth:`replicate`) with
    that row's hard mask ``masks`` (N, n_entries): torch's RMSprop at ``cfg.inner_lr``, each row
    stopping once its loss is at or below ``cfg.edit_stop`` (checked before each step, as the
    edit does) or after ``cfg.edit_steps`` steps. Entries outside the mask never reach the
    weights (m * D), so their RMSprop state does not matter. The edit's rule also asks for the
    target's prediction; one image at a CE below ln 2 (0.69) has it, so with the built-in worlds'
    stop (0.5) the two rules agree, and a larger stop may end a row before its prediction
    flips. With ``probe`` (images and target logits, as anchors are) the final weights' mean
    loss on them is returned too."""
    sites = batch.sites
    steps = [DenseDelta(torch.zeros(len(masks), *w.shape, device=w.device)) for w in batch.w0]
    square_avg = [torch.zeros_like(d.d) for d in steps]
    taken = torch.zeros(len(masks), device=masks.device)
    stopped = False  # every row at its stop: the last loss is the final weights' loss
    for _ in range(cfg.edit_steps):
        grads, loss = batch.grads_and_losses(_masked(sites, masks, steps))
        active = loss > cfg.edit_stop
        if not active.any():
            stopped = True
            break
        taken += active
        rows = active.to(masks.dtype).view(-1, 1, 1)
        for d, g, v in zip(steps, grads, square_avg, strict=True):  # in place: no graph here
            dense = g.dense()
            v.mul_(RMSPROP_ALPHA).addcmul_(dense, dense, value=1 - RMSPROP_ALPHA)
            d.d.addcdiv_(dense * rows, v.sqrt().add_(RMSPROP_EPS), value=-cfg.inner_lr)
    final = _masked(sites, masks, steps)
    with torch.no_grad():
        if not stopped:  # the last step came after the last loss
            loss = batch.losses(final)
        anchor_kl = batch.anchor_losses(final, anchors)
        probed = None if probe is None else batch.anchor_losses(final, probe)
    return EditOutcomes(taken, loss, loss <= cfg.edit_stop, anchor_kl, steps, probed)


def pick_edits(
    outcomes: EditOutcomes,
    candidates: int,
    own: bool = True,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) the chosen candidate per episode: of those that fix it, the least anchor KL; if none
    does, the lowest loss. With ``own`` False the first candidate (the network's own mask) is
    never chosen. With ``gain`` (N,) (the CE each edit takes off the episode's sibling; NaN
    where the episode has none), the fixing candidate with the most gain per anchor KL instead,
    where the episode has a sibling."""
    eligible = torch.ones(candidates, dtype=torch.bool, device=outcomes.fixed.device)
    eligible[0] = own
    fixed = outcomes.fixed.view(-1, candidates) & eligible
    kl = outcomes.anchor_kl.view(-1, candidates)
    spill = kl.masked_fill(~fixed, math.inf)
    closest = outcomes.loss.view(-1, candidates).masked_fill(~eligible, math.inf).argmin(dim=1)
    best = spill.argmin(dim=1)
    if gain is not None:
        gain = gain.view(-1, candidates)
        per_spill = (gain / kl.clamp_min(KL_FLOOR)).masked_fill(~fixed, -math.inf)
        best = torch.where(gain.isnan().any(dim=1), best, per_spill.argmax(dim=1))
    return torch.where(fixed.any(dim=1), best, closest)


def _candidate_log(
    outcomes: EditOutcomes,
    winner: torch.Tensor,
    kinds: list[str],
    gain: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per kind of candidate (own, saliency, spill, mixed): the share of episodes it won, the
    share it fixed, its mean steps and its mean anchor KL; with ``gain``, its mean sibling CE
    gain over the episodes that have a sibling."""
    n = len(kinds)
    fixed = outcomes.fixed.view(-1, n).float()
    steps, spill = outcomes.steps.view(-1, n), outcomes.anchor_kl.view(-1, n)
    out = {}
    if gain is not None:
        gain = gain.view(-1, n)
        has = ~gain.isnan().any(dim=1)
        out["siblings"] = has.float().mean().item()
    for kind in dict.fromkeys(kinds):
        mine = torch.tensor([k == kind for k in kinds], device=winner.device)
        if gain is not None:  # 0 where no episode of the batch has a sibling
            out[f"sibling_gain_{kind}"] = gain[has][:, mine].mean().item() if has.any() else 0.0
        out[f"won_{kind}"] = mine[winner].float().mean().item()
        out[f"fixed_{kind}"] = fixed[:, mine].mean().item()
        out[f"steps_{kind}"] = steps[:, mine].mean().item()
        out[f"anchor_kl_{kind}"] = spill[:, mine].mean().item()
    return out


# --------------------------------------------------------------------------- the training loop


def mask_iou(scores: torch.Tensor, rho: float = 0.1) -> float:
    """Mean pairwise IoU of the rows' top-rho masks: 1.0 = every episode got the same mask."""
    k = max(1, round(rho * scores.shape[1]))
    return jaccard(torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0))


def jaccard(masks: torch.Tensor) -> float:
    """Mean pairwise IoU of the rows of a (B, n) 0/1 mask (nan for B < 2; 0 for empty pairs)."""
    if len(masks) < 2:
        return float("nan")
    masks = masks.float()
    inter = masks @ masks.T
    sizes = masks.sum(dim=1)
    union = (sizes[:, None] + sizes[None, :] - inter).clamp_min(1.0)
    off_diagonal = ~torch.eye(len(masks), dtype=torch.bool, device=masks.device)
    return (inter / union)[off_diagonal].mean().item()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the rank (Spearman) correlation of two (B, n) tensors (ties ordinal)."""
    ra, rb = row_ranks(a.float()), row_ranks(b.float())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    corr = (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return corr.mean().item()


def regression_logits(s: torch.Tensor, s0: torch.Tensor, cfg: MetaTrainConfig) -> torch.Tensor:
    """The logits step 3 regresses onto: the searched s, or (``regression_target="movement"``)
    s - s0, what the search added to its random start."""
    return s - s0 if cfg.regression_target == "movement" else s


def regress(
    hypernet: Hypernetwork,
    opt: torch.optim.Optimizer,
    features: torch.Tensor,
    s: torch.Tensor,
    cfg: MetaTrainConfig,
    target_rows: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
    spill: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """Step 3: fit H(cls(x~)) to sigmoid(3 s) (a ``target_token`` network also reads the
    episodes' target rows, a ``gradient_input`` one their gradient norms at W0, a
    ``spill_input`` one their fix per spill). Returns the last BCE and the scores it saw."""
    target = torch.sigmoid(hypernet.config.score_scale * s)
    for _ in range(cfg.regression_steps):
        scores = hypernet(features, target_rows, gradient, spill)  # (B, n_entries)
        loss = cfg.regression_weight * F.binary_cross_entropy(scores, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item(), scores.detach()


class MetaTrainer:
    """Owns the hypernetwork, its optimiser and the episode stream; :meth:`step` = one iteration."""

    def __init__(
        self,
        backbone: Backbone,
        sites: Sites,
        pool: ImagePool | None,
        hypernet: Hypernetwork,
        cfg: MetaTrainConfig,
        impl: str = "batched",
        delta_form: str = "auto",
        sampler: EpisodeSampler | None = None,
    ) -> None:
        if impl not in ("batched", "reference"):
            raise ValueError(f"impl must be 'batched' or 'reference', got {impl!r}")
        if impl == "reference" and (cfg.locality > 0 or cfg.target_source != "search"):
            raise ValueError(
                "the reference loop implements the paper's objective only (locality 0, targets "
                "from the mask search)"
            )
        needs_anchors = cfg.locality > 0 or cfg.target_source == "edits"
        if pool is None and (needs_anchors or sampler is None):
            raise ValueError(
                "a pool of clean images is needed for CutMix, the locality term and edit targets"
            )
        self.backbone, self.sites, self.hypernet, self.cfg = backbone, sites, hypernet, cfg
        self.impl, self.delta_form = impl, delta_form  # delta_form: episodes.zero_delta
        self.model = backbone.model
        self.split = SplitForward(self.model, sites)
        self.pool = pool  # clean unlabeled images: CutMix's sources and the locality term's anchors
        # the paper's CutMix episodes unless another source is given (e.g. natural failures)
        self.sampler = sampler or CutMixSampler(
            self.model, pool, seed=cfg.seed, device=backbone.device
        )
        self.opt = torch.optim.RMSprop(hypernet.parameters(), lr=cfg.regression_lr)
        if hypernet.config.spill_input and not cfg.spill_anchors:
            raise ValueError(
                "a spill_input hypernetwork reads fix per spill on clean anchors: give "
                "--spill-anchors N (targets from edits)"
            )
        self.spill = self._spill_reference() if cfg.spill_anchors else None
        self._margins: torch.Tensor | None = None  # pool images' margins, as first drawn
        self.iteration = 0
        self.history: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        cfg, gen = self.cfg, self.sampler.generator
        episodes = self.sampler.sample(cfg.batch)
        s0 = torch.rand(cfg.batch, self.sites.n_entries, generator=gen) * 2 - 1  # U(-1, 1)
        if cfg.search_start == "zero":
            s0 = torch.zeros_like(s0)
        s0 = s0.to(self.backbone.device)
        features = cls_features(self.model, episodes.mixed)  # (B, feature_dim)
        rows = None
        if self.hypernet.config.target_token:  # the class each episode's edit moves it to
            rows = target_features(self.model, episodes.targets)
        spill = None
        if cfg.target_source == "edits":
            target, gradient, entry, spill = self._edit_targets(episodes, features, rows)
        else:
            target, gradient, entry = self._search_targets(episodes, s0)
        for group in self.opt.param_groups:
            group["lr"] = cfg.regression_lr_at(self.iteration)
        self.hypernet.train()
        reads = gradient if self.hypernet.config.gradient_input else None
        spill = spill if self.hypernet.config.spill_input else None
        bce, scores = regress(self.hypernet, self.opt, features, target, cfg, rows, reads, spill)
        if not math.isfinite(bce):
            raise MetaTrainingUnhealthy(
                f"meta-training diverged at iteration {self.iteration}: the regression loss is "
                f"not finite. Lower --regression-lr (now {cfg.regression_lr:g})"
            )
        self.iteration += 1
        return {
            **entry,
            "bce": bce,
            "h_density": (scores > 0.5).float().mean().item(),
            "h_iou": mask_iou(scores),  # top-10% overlap of the hypernetwork's masks; 1 = collapsed
            "h_std": scores.std(dim=0).mean().item(),  # spread of scores across episodes
            # how far the hypernetwork's ranking follows the episode's gradient norms (saliency's)
            "h_grad_corr": rank_correlation(scores, gradient),
        }

    def _search_targets(
        self, episodes: Episodes, s0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Step 2, the paper's: (regression logits, the episodes' gradient norms at W0, log)."""
        cfg = self.cfg
        if self.impl == "batched":
            batch = BatchedEpisodes(
                self.split, self.sites, episodes, cfg.temperature, self.delta_form
            )
            search = search_masks(batch, s0, cfg, self._anchors() if cfg.locality > 0 else None)
        else:
            search = search_masks_reference(self.model, self.sites, episodes, s0, cfg)
        if not (math.isfinite(search.kl[-1]) and torch.isfinite(search.s).all()):
            raise MetaTrainingUnhealthy(
                f"meta-training diverged at iteration {self.iteration}: the mask search's KL or "
                f"mask logits are not finite (inner lr {cfg.inner_lr:g}, outer lr "
                f"{cfg.outer_lr:g}). Lower --inner-lr or --outer-lr"
            )
        entry = {
            "outer_loss_first": search.loss[0],
            "outer_loss_last": search.loss[-1],
            "kl_first": search.kl[0],
            "kl_last": search.kl[-1],
            "kl_unedited": search.kl_unedited,
            "s_density": (search.s > 0).float().mean().item(),  # share of entries with m > 0.5
            "s_iou": jaccard(search.s > 0),  # overlap of episodes' selected sets (m > 0.5)
            **({"anchor_kl_last": search.anchor_kl[-1]} if search.anchor_kl else {}),
        }
        return regression_logits(search.s, s0, cfg), search.gradient, entry

    def _edit_targets(
        self, episodes: Episodes, features: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], torch.Tensor | None]:
        """Targets from real edits (``target_source="edits"``): (regression logits, +1 on the
        chosen mask's entries and -1 elsewhere; the episodes' CE gradient norms at W0, what
        saliency ranks by at edit time; log; their fix per spill with ``spill_anchors``). The log
        keeps the search's keys: ``kl_*`` and ``outer_loss_*`` are the loss the edits descend,
        the edit's CE, before any edit and after the chosen one (the tempered KL to a raise
        target can rise while the CE falls to the stop); ``s_*`` the chosen masks' density and
        overlap."""
        cfg, n = self.cfg, self.cfg.candidates
        batch = BatchedEpisodes(self.split, self.sites, episodes, cfg.temperature, self.delta_form)
        num_classes = episodes.clean_logits.shape[1]
        targets = one_hot_logits(episodes.targets, num_classes)
        ce = batch.replicate(targets, 1.0)
        grads, ce_at_w0 = ce.grads_and_losses(ce.zeros())
        dense = [g.dense() for g in grads]
        gradient = entry_norms(self.sites, dense)
        spill = None
        if self.spill is not None:  # fix per spill of each episode's own gradient
            spill = spill_ranking(dense, self.spill, self.sites)
        self.hypernet.eval()
        with torch.no_grad():
            c = self.hypernet.config
            reads = gradient if c.gradient_input else None
            spill_reads = spill if c.spill_input else None
            own = c.score_scale * self.hypernet.logits(features, rows, reads, spill_reads)
        k = max(1, round(cfg.edit_rho * self.sites.n_entries))
        masks = candidate_masks(own, gradient, k, n, self.sampler.generator, spill)
        anchors = self._anchors()
        anchors = Anchors(
            anchors.tokens.repeat_interleave(n, dim=1),
            anchors.clean_logits.repeat_interleave(n, dim=1),
        )
        probe, sibling_ce0 = self._sibling_probe(episodes, targets, n)
        outcomes = edit_outcomes(
            batch.replicate(targets, 1.0, times=n), masks.flatten(0, 1), anchors, cfg, probe
        )
        if not torch.isfinite(outcomes.loss).all():
            raise MetaTrainingUnhealthy(
                f"meta-training diverged at iteration {self.iteration}: a candidate edit's loss "
                f"is not finite (inner lr {cfg.inner_lr:g}). Lower --inner-lr"
            )
        gain = None
        if probe is not None:  # the CE each edit takes off the sibling; NaN where there is none
            gain = sibling_ce0.repeat_interleave(n) - outcomes.probe
            has = episodes.has_sibling.repeat_interleave(n)
            gain = gain.masked_fill(~has, math.nan)
        winner = pick_edits(outcomes, n, own=cfg.own_target, gain=gain)
        chosen = winner + n * torch.arange(len(winner), device=winner.device)  # rows of B x n
        chosen_masks = masks.flatten(0, 1)[chosen]
        before, after = ce_at_w0.mean().item(), outcomes.loss[chosen].mean().item()
        entry = {
            "outer_loss_first": before,
            "outer_loss_last": after,
            "kl_first": before,
            "kl_last": after,
            "kl_unedited": before,
            "s_density": chosen_masks.mean().item(),
            "s_iou": jaccard(chosen_masks > 0),
            "anchor_kl_last": outcomes.anchor_kl[chosen].mean().item(),
            **_candidate_log(outcomes, winner, candidate_kinds(n, spill is not None), gain),
        }
        return 2 * chosen_masks - 1, gradient, entry, spill

    def _sibling_probe(
        self, episodes: Episodes, targets: torch.Tensor, n: int
    ) -> tuple[Anchors | None, torch.Tensor]:
        """With ``target_pick="sibling-per-spill"``: each episode's sibling as a one-image probe
        under the episode's CE target, replicated for its ``n`` candidates, and the siblings' CE
        at W0 (B,); else (None, an empty tensor)."""
        if self.cfg.target_pick != "sibling-per-spill":
            return None, torch.empty(0)
        if episodes.siblings is None or episodes.has_sibling is None:
            raise DataError(
                "--target-pick sibling-per-spill reads each failure's sibling (same true and "
                "predicted class): it needs --episodes failures"
            )
        with torch.no_grad():
            tokens = self.split.prefix(episodes.siblings)  # (B, T, D)
            ce0 = episode_kl(self.split.logits(tokens), targets, 1.0)
        probe = Anchors(
            tokens.unsqueeze(0).repeat_interleave(n, dim=1),
            targets.unsqueeze(0).repeat_interleave(n, dim=1),
        )
        return probe, ce0

    def _spill_reference(self) -> SpillReference:
        """The spill candidate's anchors: the ``spill_anchors`` lowest-margin of up to 4,096 pool
        images (its own generator: the episode stream stays as without it), and their margin
        gradients at W0, taken once. A ``spill_input`` network keeps them (they are saved with
        it); one that has anchors already (``--init-from`` a spill_input network) uses its own."""
        cfg = self.cfg
        own = self.hypernet.anchor_images if self.hypernet.config.spill_input else None
        if own is not None:
            if len(own) != cfg.spill_anchors:
                raise HypernetworkMismatchError(
                    f"--spill-anchors {cfg.spill_anchors}: this spill_input hypernetwork reads "
                    f"spill on its own {len(own)} anchors; give --spill-anchors {len(own)}"
                )
            return self.hypernet.spill_reference(self.model, self.sites)
        gen = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(self.pool), generator=gen)[:SPILL_POOL_DRAW]
        if len(idx) < cfg.spill_anchors:
            raise DataError(
                f"--spill-anchors {cfg.spill_anchors}: the pool holds only {len(idx)} images; "
                f"give at most {len(idx)}"
            )
        images = self.pool.get(idx).to(self.backbone.device)
        anchors = CleanAnchors.lowest_margin(self.model, images, cfg.spill_anchors)
        if self.hypernet.config.spill_input:
            self.hypernet.anchor_images = anchors.images.detach().cpu()
        return SpillReference.at(self.model, self.sites, anchors)

    def _anchors(self) -> Anchors:
        """B x L sensitive clean pool images: the lowest-margin of ``anchor_draws`` times more.
        Always from ``pool``, never the episodes' own source: natural-failure episodes draw
        misclassified images, and sparing those would fight the edit's generalization."""
        cfg = self.cfg
        draws = cfg.batch * cfg.anchors * cfg.anchor_draws
        idx = torch.randint(len(self.pool), (draws,), generator=self.sampler.generator)
        keep = idx[self._pool_margins(idx).argsort()[: cfg.batch * cfg.anchors]]
        images = self.pool.get(keep).to(self.backbone.device)
        return Anchors.pick(self.split, images, cfg.anchors, cfg.batch)

    def _pool_margins(self, idx: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's margins on pool images ``idx``. The backbone never changes
        while meta-training, so each image's margin is computed the first time it is drawn and
        kept (one float per pool image): the draws cost a forward pass only for images not seen
        before, and only the anchors kept run through the prefix each iteration."""
        if self._margins is None:
            self._margins = torch.full((len(self.pool),), math.nan)
        new = idx.unique()
        new = new[self._margins[new].isnan()]
        chunks = new.split(MARGIN_CHUNK) if len(new) else ()  # an empty split is one chunk
        for chunk in chunks:
            images = self.pool.get(chunk).to(self.backbone.device)
            with torch.no_grad():
                logits = self.split.logits(self.split.prefix(images))
            self._margins[chunk] = margins(logits).float().cpu()
        return self._margins[idx]

    def train(
        self,
        checkpoint_dir: Path,
        checkpoint_every: int = 500,
        log_every: int = 10,
        show_progress: bool = False,
        time_budget_s: float | None = None,
        health_after: int | None = HEALTH_AFTER,
    ) -> list[dict[str, float]]:
        """Run to ``cfg.iterations`` (or until ``time_budget_s`` is spent), logging window means
        and checkpointing to ``checkpoint_dir``. From iteration ``health_after`` on (None: never)
        each logged window is checked by :func:`health_problem`; a problem stops the run with
        :class:`MetaTrainingUnhealthy` (a checkpoint is written first)."""
        window: list[dict[str, float]] = []
        start, first = time.perf_counter(), self.iteration
        deadline = math.inf if time_budget_s is None else start + time_budget_s
        with _progress(show_progress) as bar:
            task = bar.add_task(
                "meta-training", total=self.cfg.iterations, completed=self.iteration
            )
            while self.iteration < self.cfg.iterations:
                window.append(self.step())
                bar.update(
                    task,
                    advance=1,
                    description=f"KL {window[-1]['kl_last']:.3f} BCE {window[-1]['bce']:.4f}",
                )
                out_of_time = time.perf_counter() > deadline
                if len(window) == log_every or self.iteration == self.cfg.iterations or out_of_time:
                    self._log(window, (self.iteration - first) / (time.perf_counter() - start))
                    window = []
                    if health_after is not None and self.iteration >= health_after:
                        self._check_health(checkpoint_dir if checkpoint_every else None)
                if checkpoint_every and (self.iteration % checkpoint_every == 0 or out_of_time):
                    save_checkpoint(self, Path(checkpoint_dir))
                if out_of_time:
                    log.info(
                        "time budget spent at iteration %d of %d",
                        self.iteration,
                        self.cfg.iterations,
                    )
                    break
        return self.history

    def _check_health(self, checkpoint_dir: Path | None) -> None:
        problem = health_problem(self.history[-1], self.cfg)
        if problem is None:
            return
        if checkpoint_dir is not None:
            save_checkpoint(self, Path(checkpoint_dir))
        raise MetaTrainingUnhealthy(
            f"meta-training stopped at iteration {self.iteration}: {problem} "
            "(or pass --no-health-check to go on)"
        )

    def _log(self, window: list[dict[str, float]], iterations_per_s: float) -> None:
        entry = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        entry.update(iteration=self.iteration, episodes_per_s=iterations_per_s * self.cfg.batch)
        self.history.append(entry)
        log.info(
            "it %d: KL %.4f unedited, %.4f -> %.4f searched, J %.4f -> %.4f, BCE %.4f, "
            "density s %.3f h %.3f, IoU s %.3f h %.3f, rank corr h~gradient %.3f, "
            "%.1f episodes/s",
            entry["iteration"],
            entry.get("kl_unedited", math.nan),
            entry["kl_first"],
            entry["kl_last"],
            entry["outer_loss_first"],
            entry["outer_loss_last"],
            entry["bce"],
            entry["s_density"],
            entry["h_density"],
            entry["s_iou"],
            entry["h_iou"],
            entry.get("h_grad_corr", math.nan),
            entry["episodes_per_s"],
        )
        if "anchor_kl_last" in entry:
            log.info("it %d: anchor KL %.3g", entry["iteration"], entry["anchor_kl_last"])
        kinds = [k for k in CANDIDATE_KINDS if f"won_{k}" in entry]
        if kinds:  # targets from real edits
            log.info(
                "it %d: edits won / fixed / steps / anchor KL: %s",
                entry["iteration"],
                "; ".join(
                    f"{k} {entry[f'won_{k}']:.2f} / {entry[f'fixed_{k}']:.2f} / "
                    f"{entry[f'steps_{k}']:.1f} / {entry[f'anchor_kl_{k}']:.3g}"
                    for k in kinds
                ),
            )
        if "siblings" in entry:  # target_pick="sibling-per-spill"
            log.info(
                "it %d: sibling CE gain (%.0f%% of episodes have a sibling): %s",
                entry["iteration"],
                100 * entry["siblings"],
                "; ".join(f"{k} {entry[f'sibling_gain_{k}']:.3f}" for k in kinds),
            )


# --------------------------------------------------------------------------- entry point


def build_hypernetwork(
    model: nn.Module,
    sites: Sites,
    seed: int = 0,
    width: int | None = None,
    heads: int | None = None,
    target_token: bool = False,
    gradient_input: bool = False,
    spill_input: bool = False,
    rank_feature: str = "linear",
) -> Hypernetwork:
    """A fresh hypernetwork for this backbone and these sites, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = HypernetConfig.for_sites(
        feature_dim(model),
        sites,
        width=width,
        heads=heads,
        target_token=target_token,
        gradient_input=gradient_input,
        spill_input=spill_input,
        rank_feature=rank_feature,
    )
    return Hypernetwork(config).to(next(model.parameters()).device)


def meta_train(
    backbone: Backbone,
    sites: Sites,
    pool: ImagePool | None,
    cfg: MetaTrainConfig,
    out_dir: Path,
    hypernet: Hypernetwork | None = None,
    resume: bool = False,
    checkpoint_every: int = 500,
    log_every: int = 10,
    show_progress: bool = False,
    extra: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    time_budget_s: float | None = None,
    health_after: int | None = HEALTH_AFTER,
    sampler: EpisodeSampler | None = None,
) -> tuple[Hypernetwork, list[dict[str, float]]]:
    """Meta-train (or resume) a hypernetwork, then save it to ``out_dir`` with its manifest.

    Checkpoints go to ``checkpoint_dir`` (default ``out_dir / "checkpoint"``). With
    ``time_budget_s`` the run stops early once that much wall time is spent (the schedule is
    still the one of ``cfg.iterations``; resume continues it). ``sampler`` replaces the CutMix
    episodes drawn from ``pool`` (e.g. :class:`models.hypernet.failures.FailureSampler`).
    """
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir or out_dir / CHECKPOINT_DIR)
    hypernet = hypernet or build_hypernetwork(backbone.model, sites, cfg.seed)
    trainer = MetaTrainer(backbone, sites, pool, hypernet, cfg, sampler=sampler)
    if resume and (checkpoint_dir / "state.json").is_file():
        load_checkpoint(trainer, checkpoint_dir)
    start = time.perf_counter()
    history = trainer.train(
        checkpoint_dir, checkpoint_every, log_every, show_progress, time_budget_s, health_after
    )
    seconds = time.perf_counter() - start
    summary = {
        "config": dataclasses.asdict(cfg),
        "iterations": trainer.iteration,
        "episodes": trainer.iteration * cfg.batch,
        "seconds_this_run": round(seconds, 1),
        "final": history[-1] if history else {},
        "pool_size": len(trainer.sampler.pool),
        **(extra or {}),
    }
    hypernet.eval().save(out_dir, backbone, sites, training=summary)
    return hypernet, history


@contextmanager
def _progress(show: bool) -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show) as bar:
        yield bar
