"""scripts/neuron_spill.py: the activity hooks read each site's hidden layer, and on the demo
world a random mask's neurons are as active as the mean neuron while the chosen masks' are not."""

from __future__ import annotations

import subprocess

import torch

from models.backbones import Backbone
from models.sites import Sites
from scripts.neuron_spill import hidden_activity
from tests.scripts import run_script


def test_the_hooks_read_each_sites_hidden_activity_twice_in_sites_order(
    demo_backbone: Backbone,
) -> None:
    model = demo_backbone.model
    sites = Sites.for_model(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), hidden_activity(model, sites) as seen:
        model(x)
    assert len(seen) == 1 and seen[0].shape == (2, sites.n_entries)
    parts = sites.split(seen[0])  # fc1 entries then fc2 entries of the same neurons, per MLP
    for fc1, fc2 in zip(parts[::2], parts[1::2], strict=True):
        assert torch.equal(fc1, fc2)
    mlp = dict(model.named_modules())[sites.mlps[0]]
    captured = []
    handle = mlp.fc2.register_forward_pre_hook(lambda _, i: captured.append(i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(parts[0], captured[0].abs().mean(dim=1))
    with torch.no_grad():
        model(x)
    assert len(seen) == 1  # the hooks are gone once the block closes


def spill(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("neuron_spill", "--world", "demo", *args)


def test_on_the_demo_world_a_random_mask_is_an_average_neuron_and_the_chosen_are_not() -> None:
    run = spill("--rho", "0.1")
    assert run.returncode == 0, run.stderr
    rows = {
        cells[1].strip(): [float(c) for c in cells[2:5]]
        for cells in (line.split("|") for line in run.stdout.splitlines())
        if len(cells) == 6 and cells[1].strip() in ("where2edit", "saliency", "random")
    }
    assert set(rows) == {"where2edit", "saliency", "random"}
    assert all(0.8 < v < 1.25 for v in rows["random"])
    assert rows["where2edit"][1] > 1.5 and rows["saliency"][1] > 1.5  # they pick active neurons


def test_a_density_outside_0_1_is_refused_before_any_work() -> None:
    run = spill("--rho", "2")
    assert run.returncode != 0 and "rho" in run.stderr and len(run.stderr.splitlines()) == 1
