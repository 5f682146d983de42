"""Do the masks pick neurons the locality set also uses? Activity of the selected neurons.

A masked edit changes the selected neurons' fc1 rows and fc2 columns, so it moves most the
images on which those neurons fire. For every image of every group (a world's report split by
default), this takes the top-``rho`` mask of ``where2edit`` (the hypernetwork on that image),
``saliency`` (the gradient of that image's CE to its group's label) and ``random``, and prints
the mean activity (|GELU output|, mean over tokens) of the selected neurons:

- on the locality set, as a multiple of the mean neuron's activity there (1.0 = an average
  neuron; a mask of neurons the locality set relies on scores high);
- on the edit image itself, as a multiple of that image's mean neuron;
- their ratio, locality over edit image: how much of the edit's reach falls on the other images.

    .venv/bin/python scripts/neuron_spill.py --world tiny-imagenet [--hypernet DIR] [--rho 0.01]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cli.bench import add_world_arguments, open_probe_world
from cli.main import one_line_errors
from models.editing.registry import EditTask, make_config
from models.editing.saliency import edit_gradients, entry_norms
from models.editing.where2edit import learned_scores
from models.forward import SplitForward
from models.sites import Sites, top_rho_mask

KINDS = ("where2edit", "saliency", "random")


@contextmanager
def hidden_activity(model: nn.Module, sites: Sites) -> Iterator[list[torch.Tensor]]:
    """While open, each forward appends (B, n_entries): every site's hidden |activation| (the
    input of its fc2), mean over tokens, in Sites order (a neuron's fc1 row and fc2 column
    entries share its activity)."""
    out: list[torch.Tensor] = []
    parts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(name: str):  # returns a forward pre-hook
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            parts[name] = inputs[0].detach().abs().mean(dim=1)  # (B, hidden)
            if len(parts) == len(sites.mlps):
                out.append(torch.cat([parts[m] for m in sites.mlps for _ in range(2)], dim=1))
                parts.clear()

        return hook

    handles = [modules[f"{m}.fc2"].register_forward_pre_hook(keep(m)) for m in sites.mlps]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def selected_activity(mask: torch.Tensor, activity: torch.Tensor) -> float:
    """Mean activity of the selected entries, as a multiple of the mean entry's."""
    return (activity[mask].mean() / activity.mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the random masks' draws")
    add_world_arguments(parser, "tiny-imagenet")
    args = parser.parse_args()
    make_config("random", rho=args.rho)  # a rho out of (0, 1] is refused before any work
    backbone, bench, hypernet, sites = open_probe_world(args)
    if hypernet is None:
        where = f"{args.hypernet}" if args.hypernet else f"world {args.world!r}"
        raise SystemExit(f"error: no hypernetwork in {where}; give --hypernet DIR")
    model = backbone.model
    split = SplitForward(model, sites)
    with torch.no_grad(), hidden_activity(model, sites) as seen:
        for start in range(0, len(bench.locality), 100):
            model(backbone.preprocess(bench.locality[start : start + 100]))
        on_locality = torch.cat(seen).mean(dim=0)  # (n_entries,)
    gen = torch.Generator().manual_seed(args.seed)
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in KINDS}
    for group in bench.groups:
        images = backbone.preprocess(group.images)
        tokens = split.prefix(images)
        label = torch.tensor([group.label])
        for i in range(len(images)):
            x = images[i : i + 1]
            with torch.no_grad(), hidden_activity(model, sites) as seen:
                model(x)
            on_image = seen[0][0]
            task = EditTask(model, sites, split, x, label, tokens[i : i + 1])
            grads = edit_gradients(task)
            norms = entry_norms(grads, sites)
            masks = {
                "where2edit": top_rho_mask(learned_scores(hypernet, task, grads), args.rho),
                "saliency": top_rho_mask(norms, args.rho),
                "random": top_rho_mask(torch.rand(sites.n_entries, generator=gen), args.rho),
            }
            for kind, mask in masks.items():
                loc, img = on_locality[mask].mean(), on_image[mask].mean()
                rows[kind].append(
                    (
                        selected_activity(mask, on_locality),
                        selected_activity(mask, on_image),
                        (loc / img.clamp_min(1e-12)).item(),
                    )
                )
    n = len(rows["random"])
    print(
        f"{len(bench.groups)} groups, {n} images, {len(bench.locality)} locality images, ", end=""
    )
    print(f"rho {args.rho:g}\n")
    print(
        "| mask | activity on the locality set (x mean neuron) | on the edit image (x mean) "
        "| locality / edit image |"
    )
    print("|---|---:|---:|---:|")
    for kind, values in rows.items():
        means = torch.tensor(values).mean(dim=0).tolist()
        print(f"| {kind} | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} |")


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
