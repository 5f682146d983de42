"""First-order spill of an edit on clean images, per neuron entry (docs/worlds.md, Q29).

A masked edit's RMSprop steps start along ``sign(g)`` elementwise (``g``: the gradient of the
edit loss at the unedited weights W0). To first order, entry ``i``'s first step

- lowers the edit loss by ``|g_i|_1`` (its *fix*), and
- lowers a clean image ``a``'s top-1 minus top-2 logit margin by ``<h_ai, sign g_i>``
  (``h_a``: that margin's gradient at W0).

Its *spill* is ``S_i = mean_a relu(<h_ai, sign g_i>) / margin_a`` over clean anchors: the share
of their margins it eats, counting only losses. ``spill_scores`` ranks entries by fix per spill,
``|g_i|_1 / (S_i + mean S)``: an entry that lowers no margin keeps its place in the fix ranking,
one that lowers them as much as the mean entry has its score halved.

``h_a`` is taken at W0, so for fixed anchors it is computed once per backbone
(:func:`margin_gradients`); each edit then costs one contraction with its own ``sign(g)``.
Used by ``scripts/spill_saliency.py`` (the ``saliency-spill`` mask) and by meta-training's
``spill`` candidate (``models/hypernet/metatrain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.sites import Sites

MAX_ANCHORS = 4096  # one margin gradient of every site matrix each, kept in memory


@dataclass(frozen=True)
class CleanAnchors:
    """Clean images an edit should leave alone, with the two classes of their margin."""

    images: torch.Tensor  # (A, C, H, W) model input
    top: torch.Tensor  # (A,) the backbone's top-1 class
    second: torch.Tensor  # (A,) its top-2 class
    margin: torch.Tensor  # (A,) top-1 minus top-2 logit, > 0

    @classmethod
    def lowest_margin(cls, model: nn.Module, images: torch.Tensor, n: int) -> CleanAnchors:
        """The ``n`` of ``images`` with the smallest top-1 minus top-2 probability (the
        meta-trainer's rule for its sensitive anchors)."""
        if not 1 <= n <= len(images):
            raise ValueError(f"{n} anchors asked of {len(images)} images")
        with torch.no_grad():
            logits = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
        top2 = logits.softmax(dim=-1).topk(2, dim=-1)
        keep = (top2.values[:, 0] - top2.values[:, 1]).argsort()[:n]
        top, second = top2.indices[keep, 0], top2.indices[keep, 1]
        rows = torch.arange(n, device=logits.device)
        margin = logits[keep][rows, top] - logits[keep][rows, second]
        return cls(images[keep], top, second, margin.clamp_min(1e-6))


@dataclass(frozen=True)
class SpillReference:
    """Each anchor's margin gradient at W0, per site matrix: what one edit's spill reads."""

    gradients: tuple[torch.Tensor, ...]  # (A, *matrix shape) per site matrix, Sites order
    margin: torch.Tensor  # (A,)

    @classmethod
    def at(cls, model: nn.Module, sites: Sites, anchors: CleanAnchors) -> SpillReference:
        """One forward and backward per anchor through ``model`` (its weights untouched)."""
        params = sites.params(model)
        images = anchors.images.to(params[0].device)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)
        per_anchor = []
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for a in range(len(images)):
                    z = model(images[a : a + 1])[0]
                    margin = z[anchors.top[a]] - z[anchors.second[a]]
                    per_anchor.append(torch.autograd.grad(margin, params))
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        gradients = tuple(torch.stack(parts) for parts in zip(*per_anchor, strict=True))
        return cls(gradients, anchors.margin.to(params[0].device))


class SpillReferences:
    """:class:`SpillReference` of fixed anchor images, per model and sites, at the weights the
    model holds now: taken once, and again only when the site weights differ from those it was
    taken at (a worker that activates a parent version). Weights written in place and back (an
    evaluation that applies a patch and reverts it) keep it."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images  # (A, C, H, W): the anchors, ordered again by margin on each model
        self._kept: dict[tuple[int, tuple[str, ...]], _Kept] = {}

    def at(self, model: nn.Module, sites: Sites) -> SpillReference:
        key, params = (id(model), sites.mlps), sites.params(model)
        # torch counts in-place writes per tensor: the same storage at the same count is the
        # same weights; after a write, the weights themselves are compared
        state = tuple((p.data_ptr(), p._version) for p in params)
        kept = self._kept.get(key)
        if kept is not None and kept.state != state:
            same = all(torch.equal(w, p) for w, p in zip(kept.weights, params, strict=True))
            kept = _Kept(state, kept.weights, kept.reference) if same else None
        if kept is None:
            images = self.images.to(params[0].device)
            anchors = CleanAnchors.lowest_margin(model, images, len(images))
            weights = tuple(p.detach().clone() for p in params)
            kept = _Kept(state, weights, SpillReference.at(model, sites, anchors))
        self._kept[key] = kept
        return kept.reference


@dataclass(frozen=True)
class _Kept:
    state: tuple  # (storage, write count) of each site weight
    weights: tuple[torch.Tensor, ...]  # their values
    reference: SpillReference


def entry_fix(grads: list[torch.Tensor] | tuple[torch.Tensor, ...], sites: Sites) -> torch.Tensor:
    """(..., n_entries) ``|g_i|_1`` of each entry; ``grads`` per site matrix, (..., *shape)."""
    # a neuron owns an fc1 row (dim 0) or an fc2 column (dim 1): sum over the other dimension
    parts = zip(grads, sites.matrices, strict=True)
    return torch.cat([g.abs().sum(dim=-1 if m.dim == 0 else -2) for g, m in parts], dim=-1)


def entry_spill(
    grads: list[torch.Tensor] | tuple[torch.Tensor, ...], reference: SpillReference, sites: Sites
) -> torch.Tensor:
    """(..., n_entries) ``S_i`` of the step along ``sign(grads)`` (per site matrix, (...,
    *shape); a leading batch dimension is optional)."""
    weight = 1.0 / reference.margin
    parts = []
    for g, h, m in zip(grads, reference.gradients, sites.matrices, strict=True):
        d = g.sign()
        batched = d.dim() == 3
        d = d if batched else d.unsqueeze(0)
        rule = "aij,bij->bai" if m.dim == 0 else "aij,bij->baj"  # per neuron: its row or column
        dots = torch.einsum(rule, h.to(d.dtype), d).clamp_min(0.0)  # (B, A, hidden)
        s = (dots * weight.to(d).view(1, -1, 1)).mean(dim=1)
        parts.append(s if batched else s[0])
    return torch.cat(parts, dim=-1)


def spill_scores(fix: torch.Tensor, spill: torch.Tensor) -> torch.Tensor:
    """The ranking: fix per spill, the spill offset by its mean over entries (no spill = the fix
    ranking). Rows of a batch are ranked each on their own."""
    return fix / (spill + spill.mean(dim=-1, keepdim=True).clamp_min(1e-12))


def spill_ranking(
    grads: list[torch.Tensor] | tuple[torch.Tensor, ...], reference: SpillReference, sites: Sites
) -> torch.Tensor:
    """(..., n_entries) each entry's first-order fix per spill, from the edit's gradients per
    site matrix (saliency-spill's ranking; what a ``spill_input`` hypernetwork reads)."""
    return spill_scores(entry_fix(grads, sites), entry_spill(grads, reference, sites))
