"""``vitedit world ...``: build the built-in worlds (backbone + benchmark) and look at them.

    vitedit world build demo                                  # = vitedit demo train + derive
    vitedit world build tiny-imagenet --root tiny-imagenet-200/ --work ~/.cache/vitedit/tin
    vitedit world build tiny-imagenet --root data.tar.gz --stage backbone --time-budget 3600
    vitedit world build tiny-imagenet --root data.tar.gz --stage backbone --device cuda --epochs 100
    vitedit world show tiny-imagenet

Training checkpoints to ``--work`` and resumes from there: run the same command again after an
interruption or a ``--time-budget`` stop. ``--stage benchmark`` derives the groups from the
trained backbone. Both write into ``models/assets/<world>/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_WORK = Path.home() / ".cache" / "vitedit" / "worlds"
# options the demo's fixed recipe (models/worlds/demo.py) has no use for: refused there, not ignored
TINY_IMAGENET_ONLY = (
    "root",
    "work",
    "train_per_class",
    "batch_size",
    "warmup_epochs",
    "stem",
    "width",
    "tokens",
    "precision",
    "cutmix",
    "mixup",
    "crop",
    "drop_path",
    "time_budget",
    "stop_at_step",
)


def register(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="build the built-in worlds (backbone + benchmark)")
    actions = world.add_subparsers(dest="world_command", required=True)
    build = actions.add_parser(
        "build",
        help="train a world's backbone and derive its benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("name", choices=["demo", "tiny-imagenet"])
    build.add_argument(
        "--root",
        type=Path,
        help="tiny-imagenet: the dataset folder (wnids.txt, train/, val/; 64 or 32 px) or a .tar.gz of it",
    )
    build.add_argument(
        "--work", type=Path, help=f"cache and checkpoints (default {DEFAULT_WORK}/NAME)"
    )
    build.add_argument("--out", type=Path, help="output folder (default: the shipped assets)")
    build.add_argument("--stage", choices=["backbone", "benchmark", "all"], default="all")
    build.add_argument(
        "--epochs", type=int, default=None, help="training epochs (tiny-imagenet: 11)"
    )
    build.add_argument(
        "--time-budget", type=float, help="seconds of training in this run; resume later"
    )
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="tiny-imagenet: train images per class the backbone sees (default 400; the rest are "
        "bench pool)",
    )
    build.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    build.add_argument(
        "--lr", type=float, default=None, help="AdamW's peak learning rate (default 2e-3)"
    )
    build.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="epochs of linear learning-rate warm-up before the cosine (default 1)",
    )
    build.add_argument(
        "--device",
        default=None,
        help="tiny-imagenet: torch device for training and the benchmark, e.g. cuda (default "
        "cpu: the shipped recipe; a GPU draws the same batches but its arithmetic differs in the "
        "last bits); the demo trains on the CPU",
    )
    build.add_argument(
        "--stem",
        choices=["patch", "conv", "conv-stage", "conv-stages"],
        default="conv",
        help="tiny-imagenet: timm's convolutional (R+ViT hybrid) stem (default), that stem and a "
        "ResNetV2 stage of 2 blocks (conv-stage) or two stages of 2 (conv-stages, 4x4 tokens "
        "only), or linear 8x8 patches",
    )
    build.add_argument(
        "--width",
        type=int,
        default=None,
        help="tiny-imagenet: the ViT's width (default 128; a multiple of its 4 heads)",
    )
    build.add_argument(
        "--tokens",
        type=int,
        choices=[16, 64],
        default=None,
        help="tiny-imagenet: the token grid, 16 (4x4, default) or 64 (8x8: 4x the tokens per block)",
    )
    build.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="training under bf16 autocast (weights stay fp32): faster on a GPU or a CPU with "
        "bf16 instructions for wider models",
    )
    build.add_argument(
        "--cutmix",
        type=float,
        default=0.0,
        help="tiny-imagenet: share of training batches mixed with CutMix (a regulariser against "
        "overfitting; default 0)",
    )
    build.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="tiny-imagenet: share of training batches mixed with Mixup (each image blended with "
        "another, the labels weighed alike; default 0); --cutmix + --mixup <= 1",
    )
    build.add_argument(
        "--crop",
        choices=["pad", "resized"],
        default="pad",
        help="tiny-imagenet: the training crop, a random 32-px crop of the 4-px padded image "
        "(default) or a random-resized crop (25-100%% of the area, aspect 3/4 to 4/3)",
    )
    build.add_argument(
        "--drop-path",
        type=float,
        default=0.0,
        help="tiny-imagenet: stochastic depth in training, the last block's drop rate (timm's "
        "drop_path_rate; default 0)",
    )
    build.add_argument(
        "--stop-at-step", type=int, help="stop training (and checkpoint) at this step; resume later"
    )
    build.set_defaults(
        func=_build, tin_only_defaults={d: build.get_default(d) for d in TINY_IMAGENET_ONLY}
    )

    show = actions.add_parser("show", help="print a built world's summary (world.json)")
    show.add_argument("name", choices=["demo", "tiny-imagenet"])
    show.set_defaults(func=_show)


def _dataset_root(root: Path | None, work: Path) -> Path:
    """The folder holding wnids.txt: ``root`` itself, or ``root`` (a .tar.gz) extracted into work."""
    if root is None:
        raise SystemExit("tiny-imagenet needs --root: the dataset folder or its .tar.gz")
    if root.is_file():
        target = work / "dataset"
        if not (target / ".extracted").exists():
            target.mkdir(parents=True, exist_ok=True)
            try:
                with tarfile.open(root) as tar:
                    tar.extractall(target, filter="data")  # refuses absolute paths and links out
            except (tarfile.TarError, EOFError, OSError) as exc:  # not a tarball, or cut short
                raise SystemExit(
                    f"--root {root}: not a readable .tar.gz of the dataset ({exc}); give the "
                    "dataset folder or its archive"
                ) from None
            (target / ".extracted").touch()
        root = target
    found = sorted(p.parent for p in root.rglob("wnids.txt"))
    if not found:
        raise SystemExit(f"{root} holds no wnids.txt: not a Tiny-ImageNet folder")
    return found[0]


def _check_options(args: argparse.Namespace) -> None:
    """Refuse values the trainer cannot use, before any data is read."""
    if not 0.0 <= args.cutmix <= 1.0:
        raise SystemExit(f"--cutmix is a share of batches in [0, 1], got {args.cutmix}")
    if not (0.0 <= args.mixup <= 1.0 and args.cutmix + args.mixup <= 1.0 + 1e-9):  # and nan
        raise SystemExit(
            f"--mixup is a share of batches in [0, 1 - --cutmix] = [0, {1.0 - args.cutmix:g}], "
            f"got {args.mixup}"
        )
    if not 0.0 <= args.drop_path < 1.0:  # also refuses nan
        raise SystemExit(f"--drop-path is a drop rate in [0, 1), got {args.drop_path}")
    if args.width is not None and (args.width <= 0 or args.width % 4):
        raise SystemExit(f"--width must be a positive multiple of the 4 heads, got {args.width}")
    if args.stem == "conv-stages" and args.tokens not in (None, 16):
        raise SystemExit(
            f"--stem conv-stages makes a 4x4 map, one token per cell: --tokens 16 only, got "
            f"{args.tokens}"
        )
    if args.lr is not None and not 0.0 < args.lr < 1.0:  # also refuses nan and inf
        raise SystemExit(f"--lr must be in (0, 1), got {args.lr}")
    if args.warmup_epochs is not None and not 0.0 <= args.warmup_epochs < 1e6:  # and not nan
        raise SystemExit(f"--warmup-epochs must be between 0 and 1e6, got {args.warmup_epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.name == "demo" and args.device not in (None, "cpu"):
        raise SystemExit(
            f"the demo world trains on the CPU; --device {args.device} is for tiny-imagenet"
        )
    given = [
        "--" + dest.replace("_", "-")
        for dest, default in args.tin_only_defaults.items()
        if args.name == "demo" and getattr(args, dest) != default
    ]
    if given:
        raise SystemExit(
            f"{', '.join(given)}: tiny-imagenet only; the demo world trains on its fixed recipe "
            "(models/worlds/demo.py), which takes --epochs, --lr, --seed, --threads, --out and "
            "--stage"
        )


def _build(args: argparse.Namespace) -> int:
    _check_options(args)
    import torch

    torch.set_num_threads(args.threads)
    if args.name == "demo":
        return _build_demo(args)
    device = _device(args.device)
    from models.worlds import tiny_imagenet as tin
    from models.worlds import tiny_imagenet_benchmark as bench
    from models.worlds.training import TrainConfig

    work = args.work or DEFAULT_WORK / args.name
    root = _dataset_root(args.root, work)
    out = args.out or tin.ASSETS
    per_class = args.train_per_class or tin.TRAIN_PER_CLASS
    if args.stage in ("backbone", "all"):
        cfg = TrainConfig(
            epochs=args.epochs or tin.EPOCHS,
            batch_size=args.batch_size or TrainConfig.batch_size,
            lr=args.lr or TrainConfig.lr,
            warmup_epochs=TrainConfig.warmup_epochs
            if args.warmup_epochs is None
            else args.warmup_epochs,
            seed=args.seed,
            precision=args.precision,
            cutmix=args.cutmix,
            mixup=args.mixup,
            crop=args.crop,
            drop_path=args.drop_path,
        )
        result = tin.train_backbone(
            root,
            work,
            cfg,
            per_class,
            out_dir=out,
            time_budget=args.time_budget,
            stop_at_step=args.stop_at_step,
            stem=args.stem,
            width=args.width or tin.WIDTH,
            tokens=args.tokens or tin.TOKENS,
            device=device,
        )
        print(
            json.dumps(
                {
                    "finished": result.finished,
                    "steps": result.steps,
                    "seconds": round(result.seconds),
                    "history": result.history,
                },
                indent=1,
            )
        )
        if not result.finished:
            return 3  # stopped by the budget: run again to resume
    if args.stage in ("benchmark", "all"):
        from models.backbones import load_backbone
        from models.store.manifest import BackboneManifest

        backbone = load_backbone(BackboneManifest.read(out / "backbone.json"), device)
        summary = bench.derive_world(
            backbone,
            root,
            bench.DeriveConfig(seed=args.seed, train_per_class=per_class),
            out / "world.npz",
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "groups"}, indent=1))
    return 0


def _device(name: str | None) -> torch.device:
    """The torch device to train on (default cpu, where the shipped backbone was trained); one
    torch does not know or cannot reach is refused by name."""
    from models.backbones import resolve_device

    try:
        return resolve_device(name or "cpu")
    except ValueError as exc:
        raise SystemExit(f"--device {exc}") from None


def _build_demo(args: argparse.Namespace) -> int:
    from models.backbones import load_backbone
    from models.store.manifest import BackboneManifest
    from models.worlds import demo

    out = args.out or demo.ASSETS
    if args.stage in ("backbone", "all"):
        cfg = demo.TrainConfig(
            epochs=args.epochs or demo.TrainConfig.epochs,
            lr=args.lr or demo.TrainConfig.lr,
            seed=args.seed,
        )
        print(json.dumps(demo.train_backbone(cfg, out_dir=out, progress=print), indent=2))
    if args.stage in ("benchmark", "all"):
        backbone = load_backbone(BackboneManifest.read(out / "backbone.json"))  # the one just built
        summary = demo.derive_world(backbone, demo.DeriveConfig(seed=args.seed), out / "world.npz")
        print(json.dumps(summary, indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    from models.store.manifest import read_json
    from models.worlds.catalog import get_world

    world = get_world(args.name)
    summary = read_json(world.assets / "world.json")
    backbone = read_json(world.assets / "backbone.json")
    print(
        json.dumps(
            {
                "backbone": {k: backbone.get(k) for k in ("name", "timm_name", "overrides")},
                "backbone_extra": {
                    k: v for k, v in backbone.get("extra", {}).items() if k != "history"
                },
                **{k: v for k, v in summary.items() if k != "terms"},
            },
            indent=1,
        )
    )
    return 0
