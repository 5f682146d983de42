"""``vitedit demo ...``: regenerate the built-in demo backbone and benchmark, or export them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets" / "demo"
"""The shipped demo world (models.worlds.demo.ASSETS, without importing torch to find it)."""


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the built-in demo world (Fashion-MNIST ViT + benchmark)")
    actions = demo.add_subparsers(dest="demo_command", required=True)

    train = actions.add_parser("train", help="train the demo backbone from scratch (CPU, ~25 min)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a busy 2-core machine)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--out", type=Path, default=None, help="folder (default: the shipped assets)"
    )
    train.set_defaults(func=_train)

    derive = actions.add_parser("derive", help="derive edit groups, locality and held-out sets")
    derive.add_argument("--seed", type=int, default=0)
    derive.set_defaults(func=_derive)

    export = actions.add_parser("export", help="write the benchmark in the paper's folder layout")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=_export)

    failure = actions.add_parser(
        "failure", help="write one shipped failure image and its true label"
    )
    failure.add_argument("--group", default=None, help="group name (default: the first)")
    failure.add_argument("--index", type=int, default=0)
    failure.add_argument("--out", type=Path, required=True, help="PNG file to write")
    failure.set_defaults(func=_failure)


def _train(args: argparse.Namespace) -> int:
    import torch

    from models.worlds import demo as demo_world

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or demo_world.ASSETS
    result = demo_world.train_backbone(
        demo_world.TrainConfig(epochs=args.epochs, seed=args.seed), out_dir=out, progress=print
    )
    print(json.dumps(result, indent=2))
    return 0


def _derive(args: argparse.Namespace) -> int:
    from models.worlds import demo as demo_world

    summary = demo_world.derive_world(
        demo_world.load_demo_backbone(), demo_world.DeriveConfig(seed=args.seed)
    )
    print(json.dumps(summary, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from models.worlds import demo as demo_world

    demo_world.export_world(demo_world.load_world(), args.out)
    print(f"wrote {args.out}/edit_groups and {args.out}/locality")
    return 0


def _failure(args: argparse.Namespace) -> int:
    """Torch-free: reads one group out of the shipped world.npz (importing the demo world's
    module would import torch, timm and torchvision, seconds for one PNG)."""
    from PIL import Image

    from models.store.manifest import read_json
    from models.worlds.layout import read_world_arrays, split_groups

    groups = split_groups(read_world_arrays(DEMO_ASSETS / "world.npz"))
    name = args.group or next(iter(groups))
    if name not in groups:
        print(f"unknown group {name!r}; groups: {sorted(groups)}", file=sys.stderr)
        return 2
    size = len(groups[name])
    if not 0 <= args.index < size:
        print(f"--index {args.index}: group {name} has images 0 to {size - 1}", file=sys.stderr)
        return 2
    pixels = groups[name][args.index]
    label = int(name.split("-")[0])
    class_names = read_json(DEMO_ASSETS / "backbone.json")["class_names"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(args.out)
    result = {"file": str(args.out), "group": name, "label": label}
    print(json.dumps({**result, "label_name": class_names[label]}))
    return 0
