"""SplitForward: the cached prefix + the suffix reproduce the model's forward pass."""

from __future__ import annotations

import torch
from torch import nn

from models.forward import SplitForward
from models.sites import Sites
from tests.conftest import tiny_vit


def test_suffix_of_prefix_equals_model_output() -> None:
    model = tiny_vit()
    split = SplitForward(model, Sites.for_model(model))
    x = torch.randn(5, 1, 28, 28)
    assert split.is_split and split.first_block == 1
    torch.testing.assert_close(split.suffix(split.prefix(x)), model(x), rtol=0, atol=0)


def test_batched_prefix_and_logits_match_one_batch() -> None:
    model = tiny_vit()
    split = SplitForward(model, Sites.for_model(model, (2, 3)))
    x = torch.randn(7, 1, 28, 28)
    tokens = split.prefix(x, batch_size=3)
    torch.testing.assert_close(tokens, split.prefix(x))
    torch.testing.assert_close(split.logits(tokens, batch_size=2), model(x))


def test_prefix_does_not_depend_on_site_weights() -> None:
    model = tiny_vit()
    sites = Sites.for_model(model)
    split = SplitForward(model, sites)
    x = torch.randn(3, 1, 28, 28)
    before = split.prefix(x)
    with torch.no_grad():
        for p in sites.params(model):
            p.add_(1.0)
    assert torch.equal(split.prefix(x), before)


def test_model_without_vit_parts_falls_back_to_whole_model() -> None:
    model = tiny_vit()
    sites = Sites.for_model(model)
    wrapped = nn.Sequential(model)  # no patch_embed/blocks at the top: not splittable
    split = SplitForward(wrapped, Sites(tuple(f"0.{m}" for m in sites.mlps), sites.hidden))
    x = torch.randn(2, 1, 28, 28)
    assert not split.is_split
    assert torch.equal(split.prefix(x), x)
    torch.testing.assert_close(split.suffix(split.prefix(x)), model(x), rtol=0, atol=0)
