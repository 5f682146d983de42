"""scripts/mask_diversity.py on the demo world: the masks' overlaps, how far the learned scores
follow the image's gradient norms, and how much a gradient-reading network's gates weigh and lift
the top of the ranking they read."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.backbones import Backbone
from models.hypernet.network import load_demo_hypernetwork
from tests.scripts import run_script


def figure(name: str, stdout: str) -> float:
    """The number after ``mean`` on the output line that starts with ``name``."""
    line = next(line for line in stdout.splitlines() if line.startswith(name))
    return float(re.search(r"mean (?:IoU )?(-?[0-9.]+)", line).group(1))


def test_the_demo_networks_scores_follow_the_gradient_partly_and_have_no_gates() -> None:
    run = run_script("mask_diversity", "--world", "demo", "--rho", "0.1")
    assert run.returncode == 0, run.stderr
    assert 0.0 < figure("where2edit vs saliency", run.stdout) < 1.0
    assert 0.0 < figure("rank correlation", run.stdout) < 1.0  # partly: it reads the image
    assert "gate x rank" not in run.stdout  # an image-only network has no gradient part


def test_a_gradient_reading_network_reports_what_its_gates_weigh(
    demo_backbone: Backbone, tmp_path: Path
) -> None:
    net = load_demo_hypernetwork(demo_backbone).with_gradient_input()
    torch.manual_seed(0)
    with torch.no_grad():
        for head, gate in zip(net.heads, net.gates, strict=True):
            head.weight.zero_(), head.bias.normal_(std=1e-3)  # nearly flat heads
            gate.bias.fill_(1.0)  # and the gradient's rank on top: saliency's order
    net.save(tmp_path, demo_backbone, net.sites)
    run = run_script("mask_diversity", "--world", "demo", "--hypernet", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert figure("the gradient input's part", run.stdout) > 100  # the gates outweigh the heads
    assert figure("rank correlation", run.stdout) > 0.99  # so the scores are the gradient's order
    assert figure("where2edit vs saliency", run.stdout) > 0.99
    # a gate of 1 on ranks in [-1, 1]: the top 10% sit at ranks 0.8-1, 0.9 above the mean of 0
    lift = re.search(r"gradient input lifts .* by ([+-][0-9.]+)", run.stdout)
    assert 0.88 < float(lift.group(1)) < 0.92


def test_a_spill_reading_network_is_compared_with_its_spill_ranking_and_with_other_networks(
    demo_backbone: Backbone, tmp_path: Path
) -> None:
    from models.worlds.demo import load_world, normalise

    parent = load_demo_hypernetwork(demo_backbone)
    anchors = normalise(load_world().pool[:4])
    net = parent.with_spill_input(anchors)
    with torch.no_grad():
        for head, gate in zip(net.heads, net.spill_gates, strict=True):
            head.weight.zero_(), head.bias.normal_(std=1e-3)  # nearly flat heads
            gate.bias.fill_(1.0)  # and the spill ranking's rank on top
    net.save(tmp_path / "spill", demo_backbone, net.sites)
    parent.save(tmp_path / "parent", demo_backbone, parent.sites)
    args = ["--world", "demo", "--hypernet", str(tmp_path / "spill")]
    run = run_script("mask_diversity", *args, "--against", str(tmp_path / "parent"))
    assert run.returncode == 0, run.stderr
    assert figure("where2edit vs the spill ranking it reads", run.stdout) > 0.99
    assert figure(f"where2edit vs {tmp_path / 'parent'} ", run.stdout) < 0.9  # flat heads moved it
    run = run_script("mask_diversity", "--world", "demo", "--against", str(tmp_path / "nowhere"))
    assert run.returncode != 0 and "nowhere" in run.stderr and "Traceback" not in run.stderr
