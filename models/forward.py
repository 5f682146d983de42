"""Split a backbone's forward pass at the first edited block.

Blocks before the first editable site never change during an edit, so their output tokens are
computed once per edit (and once per evaluation set) and only the suffix runs at every step.
ViT/DeiT-style timm models (``patch_embed``, ``_pos_embed``, ``blocks``, ``norm``,
``forward_head``) are split; any other model (e.g. Swin) falls back to prefix = identity,
suffix = the whole model, which is correct, just not faster.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from models.sites import Sites

_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.mlp$")
_VIT_PARTS = (
    "patch_embed",
    "_pos_embed",
    "patch_drop",
    "norm_pre",
    "blocks",
    "norm",
    "forward_head",
)


class SplitForward:
    """``model(x) == suffix(prefix(x))``; ``prefix`` holds no editable parameter."""

    def __init__(self, model: nn.Module, sites: Sites, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.model = model
        self.batch_size = batch_size  # images per forward of prefix() and logits()
        match = _VIT_BLOCK.match(sites.mlps[0])
        vit_like = all(hasattr(model, p) for p in _VIT_PARTS) and isinstance(
            model.blocks, nn.Sequential
        )
        self.first_block = int(match.group(1)) if (match and vit_like) else None

    @property
    def is_split(self) -> bool:
        return self.first_block is not None

    @torch.no_grad()
    def prefix(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """(N, C, H, W) images -> cached tokens (N, T, D) after the frozen blocks (or x itself)."""
        if self.first_block is None:
            return x
        batch_size = batch_size or self.batch_size
        return torch.cat(
            [self._prefix(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        )

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks[: self.first_block](x)

    def suffix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cached tokens -> logits (N, num_classes), through the editable blocks and the head."""
        if self.first_block is None:
            return self.model(tokens)
        m = self.model
        x = m.norm(m.blocks[self.first_block :](tokens))
        return m.forward_head(x)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Batched, gradient-free :meth:`suffix` for evaluation sets."""
        batch_size = batch_size or self.batch_size
        return torch.cat(
            [self.suffix(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
        )
