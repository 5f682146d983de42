"""``vitedit hypernet train``: meta-train a where-to-edit hypernetwork for a backbone.

vitedit hypernet train --world demo                      # the shipped demo hypernetwork
vitedit hypernet train --backbone backbone.json --images DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEMO_WIDTH = 128  # demo backbone width is 128: no input projection, 4 heads, ~0.7 M parameters
DEMO_CHECKPOINTS = Path.home() / ".cache" / "vitedit" / "demo-hypernet-checkpoint"


def register(sub: argparse._SubParsersAction) -> None:
    hypernet = sub.add_parser("hypernet", help="meta-train where-to-edit hypernetworks")
    actions = hypernet.add_subparsers(dest="hypernet_command", required=True)
    train = actions.add_parser("train", help="meta-train on CutMix pseudo-edits (method.md sec. 3)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", choices=["demo"], help="the built-in demo backbone and its pool")
    source.add_argument("--backbone", type=Path, help="backbone manifest (JSON); needs --images")
    train.add_argument("--images", type=Path, help="unlabeled images of the backbone's domain")
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default for --world demo: the shipped assets)",
    )
    train.add_argument("--iterations", type=int, default=10_000)
    train.add_argument("--batch", type=int, default=8, help="episodes per iteration (B)")
    train.add_argument("--inner-lr", type=float, default=1e-3, help="inner SGD step (eta)")
    train.add_argument("--inner-steps", type=int, default=5, help="K")
    train.add_argument("--outer-steps", type=int, default=10, help="S")
    train.add_argument("--sparsity", type=float, default=1.0, help="lambda")
    train.add_argument("--regression-lr", type=float, default=1e-4, help="hypernetwork RMSprop lr")
    train.add_argument(
        "--schedule-iterations",
        type=int,
        default=None,
        help="cosine length of the regression lr (default: 2 x iterations)",
    )
    train.add_argument("--width", type=int, default=None, help="hypernetwork width")
    train.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="edited blocks (default: three ending at 75%% depth)",
    )
    train.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop (and save) once this much wall time is spent",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=250)
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help=f"default: OUT/checkpoint ({DEMO_CHECKPOINTS} for --world demo, "
        "to keep checkpoints out of the shipped assets)",
    )
    train.add_argument("--log-every", type=int, default=25)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--device", default="cpu")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import torch

    from models.metatrain import MetaTrainConfig, build_hypernetwork, meta_train
    from models.sites import Sites

    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, pool, out, width = _source(args)
    checkpoints = args.checkpoint_dir or (DEMO_CHECKPOINTS if args.world == "demo" else None)
    sites = Sites.for_model(backbone.model, tuple(args.blocks) if args.blocks else None)
    cfg = MetaTrainConfig(
        iterations=args.iterations,
        batch=args.batch,
        inner_lr=args.inner_lr,
        inner_steps=args.inner_steps,
        outer_steps=args.outer_steps,
        sparsity=args.sparsity,
        regression_lr=args.regression_lr,
        schedule_iterations=args.schedule_iterations,
        seed=args.seed,
    )
    hypernet = build_hypernetwork(backbone.model, sites, cfg.seed, width=args.width or width)
    _, history = meta_train(
        backbone,
        sites,
        pool,
        cfg,
        out,
        hypernet=hypernet,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        show_progress=True,
        extra={"source": _describe(args)},
        checkpoint_dir=checkpoints,
        time_budget_s=None if args.time_budget is None else 60 * args.time_budget,
    )
    print(json.dumps({"out": str(out), "final": history[-1] if history else {}}, indent=2))
    return 0


def _source(args: argparse.Namespace) -> tuple[Any, Any, Path, int | None]:
    """(backbone, CutMix pool, output folder, default width) for --world or --backbone/--images."""
    from models.cutmix import FolderPool, TensorPool

    if args.world == "demo":
        from models import demo_world
        from models.hypernetwork import DEMO_DIR

        backbone = demo_world.load_demo_backbone(args.device)
        pool = TensorPool(demo_world.normalise(demo_world.load_world().pool))
        return backbone, pool, args.out or DEMO_DIR, DEMO_WIDTH
    from models.backbones import load_backbone
    from models.errors import DataError
    from models.store.manifest import BackboneManifest

    if args.images is None or args.out is None:
        raise DataError("--backbone needs --images (a folder of unlabeled images) and --out")
    backbone = load_backbone(BackboneManifest.read(args.backbone), args.device)
    return backbone, FolderPool.from_folder(args.images, backbone.transform), args.out, None


def _describe(args: argparse.Namespace) -> str:
    if args.world:
        return f"world {args.world} (CutMix pool of unlabeled Fashion-MNIST train images)"
    return f"backbone {args.backbone}, images {args.images}"
