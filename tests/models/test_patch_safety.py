"""Applying a patch never leaves a model half-written: every entry is checked before the first
write, and a caller's backup holds each old value before its write, so a revert in ``finally``
undoes an apply cut off midway."""

from __future__ import annotations

import pytest
import torch

from models.backbones import Backbone
from models.errors import PatchError
from models.sites import Patch, Sites


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def two_entries(sites: Sites, second: tuple[torch.Tensor, torch.Tensor]) -> Patch:
    """A valid fc1 row of the first site, then ``second`` on the first site's fc2."""
    fc1, fc2 = sites.matrices[0], sites.matrices[1]
    good = (torch.tensor([0, 1]), torch.ones(2, 32))  # tiny ViT: fc1 is (64, 32)
    return Patch(sites, {fc1.param: good, fc2.param: second})


@pytest.mark.parametrize(
    "second",
    [
        (torch.tensor([0]), torch.ones(32, 2)),  # 2 columns for 1 index
        (torch.tensor([64]), torch.ones(32, 1)),  # index past the hidden width
        (torch.tensor([-1]), torch.ones(32, 1)),  # negative index
        (torch.tensor([3, 3]), torch.ones(32, 2)),  # the same neuron twice
        (torch.tensor([0.0]), torch.ones(32, 1)),  # float indices
        (torch.tensor([[0]]), torch.ones(32, 1)),  # 2-d indices
    ],
    ids=["shape", "too-high", "negative", "duplicate", "float-index", "2d-index"],
)
def test_a_bad_entry_is_refused_before_any_entry_is_written(
    tiny_backbone: Backbone, second: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = tiny_backbone.model
    before = snapshot(model)
    patch = two_entries(Sites.for_model(model), second)
    with pytest.raises(PatchError, match="another model or is damaged"):
        patch.apply(model)
    assert unchanged(model, before)


class CutOff(Exception):
    """Stands for RQ's job timeout, which arrives as an exception at whatever line runs."""


def test_revert_in_finally_undoes_an_apply_cut_off_midway(
    tiny_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_backbone.model
    before = snapshot(model)
    sites = Sites.for_model(model)
    patch = two_entries(sites, (torch.tensor([5]), torch.ones(32, 1)))
    original, calls = torch.Tensor.index_copy_, []

    def cut_off_second_write(self: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise CutOff
        return original(self, *args)

    monkeypatch.setattr(torch.Tensor, "index_copy_", cut_off_second_write)
    backup: dict[str, torch.Tensor] = {}
    with pytest.raises(CutOff):
        try:
            patch.apply(model, backup)
        finally:
            patch.revert(model, backup)
    assert len(calls) > 2  # the revert wrote back what the first write changed
    assert unchanged(model, before)
