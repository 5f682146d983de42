"""B pseudo-edit episodes in one batch, each with its own site weights W0 + m_e * D_e.

The change D_e is kept as the sum of its per-token gradient terms (:class:`Factors`) and added
to the frozen layer's output (:class:`DeltaLinear`), so no dense per-episode copy of a matrix
is formed where the factors are smaller than the matrix (tokens x inner steps below the widths:
the built-in backbones). Where they would be larger (ViT-B/16: 197 tokens x 5 steps = 985 terms
against widths 768/3072), the change is kept dense instead (:class:`DenseDelta`, same interface;
:func:`zero_delta` picks). Either way one backward to the site layers' outputs gives every
episode's weight gradient. Used by :mod:`models.hypernet.metatrain`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.forward import SplitForward
from models.hypernet.cutmix import Episodes
from models.sites import Matrix, Sites


def episode_kl(
    logits: torch.Tensor, clean_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 KL(softmax(clean / T) || softmax(logits / T)) per row: (N,)."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(clean_logits / t, dim=-1),
        reduction="none",
        log_target=True,
    )
    return t * t * kl.sum(dim=-1)


ONE_HOT_LOW = -1e4  # a target logit whose probability is 0 in float32 (exp(-1e4) underflows)


def one_hot_logits(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) logits of one-hot distributions: :func:`episode_kl` at T = 1 against
    them is the cross-entropy of ``targets``, the edit's own loss."""
    out = torch.full((len(targets), num_classes), ONE_HOT_LOW, device=targets.device)
    return out.scatter_(1, targets.view(-1, 1), 0.0)


@dataclass
class Factors:
    """A per-episode change of one matrix as a sum of outer products, D_b = sum_j a_bj b_bj^T.

    A linear layer's gradient for one episode is sum_t delta_t x_t^T over its N tokens (output
    gradients times inputs), so K inner steps add up to rank <= N * K: 85 for 17 tokens and
    K = 5, below the demo's 128/512 widths, and no dense (B, out, in) change is ever formed.
    The neuron mask acts on activations: (m * D) x = m * (D x) for fc1 rows, D (m * x) for fc2
    columns.
    """

    a_buf: torch.Tensor  # (B, capacity, out); the first r rows are in use
    b_buf: torch.Tensor  # (B, capacity, in)
    r: int
    mask: torch.Tensor | None = None  # (B, H) over fc1 rows (dim 0) or fc2 columns (dim 1)
    dim: int = 0

    @property
    def a(self) -> torch.Tensor:
        return self.a_buf[:, : self.r]

    @property
    def b(self) -> torch.Tensor:
        return self.b_buf[:, : self.r]

    @classmethod
    def zeros(cls, batch: int, weight: torch.Tensor, capacity: int = 0) -> Factors:
        """D = 0, with room for ``capacity`` rank-one terms (no copying as it grows)."""
        out, inp = weight.shape
        a, b = weight.new_empty(batch, capacity, out), weight.new_empty(batch, capacity, inp)
        return cls(a, b, 0)

    def plus(self, other: Factors, scale: float) -> Factors:
        """self + scale * other (both unmasked), written in place after self's terms."""
        assert self.mask is None and other.mask is None
        end = self.r + other.r
        if end > self.a_buf.shape[1]:
            raise ValueError(f"factor buffer holds {self.a_buf.shape[1]} terms, {end} needed")
        self.a_buf[:, self.r : end] = scale * other.a
        self.b_buf[:, self.r : end] = other.b
        return Factors(self.a_buf, self.b_buf, end)

    def masked(self, mask: torch.Tensor, matrix: Matrix) -> Factors:
        return Factors(self.a_buf, self.b_buf, self.r, mask, matrix.dim)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in) -> x (m * D)^T per sample: (B, N, out)."""
        if self.mask is not None and self.dim == 1:
            x = x * self.mask.unsqueeze(1)
        y = (x @ self.b.transpose(1, 2)) @ self.a  # (B, N, r) @ (B, r, out)
        if self.mask is not None and self.dim == 0:
            y = y * self.mask.unsqueeze(1)
        return y

    def dense(self) -> torch.Tensor:
        """m * D as (B, out, in), for tests."""
        d = self.a.transpose(1, 2) @ self.b
        if self.mask is None:
            return d
        return d * (self.mask.unsqueeze(-1) if self.dim == 0 else self.mask.unsqueeze(-2))


@dataclass
class DenseDelta:
    """A per-episode change of one matrix held as (B, out, in): :class:`Factors`' interface, for
    when the factors' ``capacity * (out + in)`` would exceed ``out * in``."""

    d: torch.Tensor  # (B, out, in)
    mask: torch.Tensor | None = None
    dim: int = 0
    r: int = 0  # rank-one terms added so far (for the capacity bookkeeping of the caller)

    def plus(self, other: Factors | DenseDelta, scale: float) -> DenseDelta:
        """self + scale * other (both unmasked)."""
        assert self.mask is None and other.mask is None
        return DenseDelta(self.d + scale * other.dense(), r=self.r + other.r)

    def masked(self, mask: torch.Tensor, matrix: Matrix) -> DenseDelta:
        return DenseDelta(self.d, mask, matrix.dim, self.r)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in) -> x (m * D)^T per sample: (B, N, out)."""
        if self.mask is not None and self.dim == 1:
            x = x * self.mask.unsqueeze(1)
        y = x @ self.d.transpose(1, 2)
        if self.mask is not None and self.dim == 0:
            y = y * self.mask.unsqueeze(1)
        return y

    def dense(self) -> torch.Tensor:
        """m * D as (B, out, in)."""
        if self.mask is None:
            return self.d
        return self.d * (self.mask.unsqueeze(-1) if self.dim == 0 else self.mask.unsqueeze(-2))


Delta = Factors | DenseDelta

DELTA_FORMS = ("auto", "factors", "dense")


def zero_delta(batch: int, weight: torch.Tensor, capacity: int, form: str = "auto") -> Delta:
    """D = 0 for ``batch`` episodes: factors with room for ``capacity`` rank-one terms, or a dense
    (B, out, in) tensor when ``form`` says so or (``auto``) when it is the smaller of the two."""
    if form not in DELTA_FORMS:
        raise ValueError(f"delta form must be one of {DELTA_FORMS}, not {form!r}")
    out, inp = weight.shape
    if form == "dense" or (form == "auto" and capacity * (out + inp) > out * inp):
        return DenseDelta(weight.new_zeros(batch, out, inp))
    return Factors.zeros(batch, weight, capacity)


class DeltaLinear(nn.Module):
    """``linear`` plus a per-sample low-rank change: y_b = linear(x_b) + x_b D_b^T.

    It keeps its (detached) input and its output so that per-sample weight gradients can be read
    off as factors after ``autograd.grad(loss, output)``.
    """

    def __init__(self, linear: nn.Linear, delta: Delta) -> None:
        super().__init__()
        self.linear, self.delta = linear, delta
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, in)
        y = self.linear(flat) + self.delta.apply(flat)  # (B, N, out)
        if torch.is_grad_enabled() and not y.requires_grad:
            y.requires_grad_()  # nothing upstream needs grads: a leaf, to read the grads at
        self.input, self.output = flat.detach(), y
        return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def episode_deltas(
    model: nn.Module, sites: Sites, deltas: list[Delta]
) -> Iterator[list[DeltaLinear]]:
    """Within the block, sample b of a batch sees site matrices W0 + deltas[i][b]."""
    modules = dict(model.named_modules())
    swapped, layers = [], []
    try:
        for matrix, delta in zip(sites.matrices, deltas, strict=True):
            parent, attr = matrix.param.removesuffix(".weight").rsplit(".", 1)  # blocks.4.mlp, fc1
            linear = getattr(modules[parent], attr)
            swapped.append((modules[parent], attr, linear))
            layers.append(DeltaLinear(linear, delta))
            setattr(modules[parent], attr, layers[-1])
        yield layers
    finally:
        for parent, attr, linear in swapped:
            setattr(parent, attr, linear)


def margins(logits: torch.Tensor) -> torch.Tensor:
    """(N,) top-1 minus top-2 probability of each row of ``logits`` (N, C): how near its
    decision boundary an image sits."""
    top2 = logits.softmax(dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


@dataclass
class Anchors:
    """L clean images per episode whose predictions an edit should leave alone (locality term)."""

    tokens: torch.Tensor  # (L, B, T, D) prefix tokens: slot l of every episode
    clean_logits: torch.Tensor  # (L, B, C) the frozen backbone on them

    @classmethod
    def pick(cls, split: SplitForward, images: torch.Tensor, slots: int, batch: int) -> Anchors:
        """The ``slots * batch`` lowest-margin (top-1 minus top-2 probability) of ``images``
        (N, C, H, W), slot-major; the frozen prefix runs once for all of them."""
        with torch.no_grad():
            tokens = split.prefix(images)
            logits = split.logits(tokens)
        keep = margins(logits).argsort()[: slots * batch]
        shape = (slots, batch)
        return cls(tokens[keep].unflatten(0, shape), logits[keep].unflatten(0, shape))


class BatchedEpisodes:
    """The B episodes of one batch on shared prefix tokens, each with its own site weights."""

    def __init__(
        self,
        split: SplitForward,
        sites: Sites,
        episodes: Episodes,
        temperature: float,
        delta_form: str = "auto",
    ) -> None:
        self.split, self.sites, self.temperature = split, sites, temperature
        self.delta_form = delta_form  # see zero_delta
        self.tokens = split.prefix(episodes.mixed)  # (B, T, D), once per batch
        self.clean_logits = episodes.clean_logits  # (B, C)
        self.w0 = [p.detach() for p in sites.params(split.model)]

    def replicate(
        self, clean_logits: torch.Tensor, temperature: float, times: int = 1
    ) -> BatchedEpisodes:
        """The same images, each ``times`` in a row, under other targets (``clean_logits``, one
        row per episode) and temperature: e.g. the edit's own CE (:func:`one_hot_logits` at T =
        1), for several masks per episode. The frozen prefix is not run again."""
        out = copy.copy(self)
        out.tokens = self.tokens.repeat_interleave(times, dim=0)
        out.clean_logits = clean_logits.repeat_interleave(times, dim=0)
        out.temperature = temperature
        return out

    def zeros(self, capacity: list[int] | None = None) -> list[Delta]:
        """D = 0 per site matrix; with ``capacity`` (rank-one terms to come), in the smaller form."""
        if capacity is None:  # only read, never added to: empty factors cost nothing
            return [Factors.zeros(len(self.tokens), w) for w in self.w0]
        pairs = zip(self.w0, capacity, strict=True)
        return [zero_delta(len(self.tokens), w, c, self.delta_form) for w, c in pairs]

    def losses(self, deltas: list[Delta]) -> torch.Tensor:
        """Per-episode loss (B,) at weights W0 + deltas."""
        with episode_deltas(self.split.model, self.sites, deltas):
            logits = self.split.suffix(self.tokens)
        return episode_kl(logits, self.clean_logits, self.temperature)

    def anchor_losses(self, deltas: list[Delta], anchors: Anchors) -> torch.Tensor:
        """Per-episode mean KL (B,) on the episode's anchor images at weights W0 + deltas."""
        total = anchors.tokens.new_zeros(len(self.tokens))
        with episode_deltas(self.split.model, self.sites, deltas):
            for tokens, clean in zip(anchors.tokens, anchors.clean_logits, strict=True):
                total = total + episode_kl(self.split.suffix(tokens), clean, self.temperature)
        return total / len(anchors.tokens)

    def grads(self, deltas: list[Delta]) -> list[Factors]:
        """Per-episode weight gradients of L at W0 + deltas, as factors (output grads, inputs)."""
        return self.grads_and_losses(deltas)[0]

    def grads_and_losses(self, deltas: list[Delta]) -> tuple[list[Factors], torch.Tensor]:
        """:meth:`grads`, and the per-episode loss (B,) they were taken at, from the same forward.

        The loss is a sum over episodes and sample b only sees episode b's weights, so one
        backward to the layer outputs gives every episode's gradient, with no weight gradient
        ever formed.
        """
        with torch.enable_grad(), episode_deltas(self.split.model, self.sites, deltas) as layers:
            loss = episode_kl(self.split.suffix(self.tokens), self.clean_logits, self.temperature)
            outs = torch.autograd.grad(loss.sum(), [layer.output for layer in layers])
        factors = [
            Factors(g, layer.input, g.shape[1]) for g, layer in zip(outs, layers, strict=True)
        ]
        return factors, loss.detach()
