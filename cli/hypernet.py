"""``vitedit hypernet train``: meta-train a where-to-edit hypernetwork for a backbone.

    vitedit hypernet train --world demo        # regenerates the shipped demo hypernetwork
    vitedit hypernet train --backbone backbone.json --images DIR --out DIR
    vitedit hypernet train --world demo --init-from models/assets/demo/hypernet --locality 1000 \
        --out DIR                              # fine-tune it with the (optional) locality term
    vitedit hypernet failures --world tiny-imagenet --root DATA.tar.gz --out failures.npz
    vitedit hypernet train --world tiny-imagenet --episodes failures --failures failures.npz \
        --out DIR                              # natural failures instead of CutMix episodes

Options left unset take the demo recipe for ``--world demo`` and the paper's reference defaults
(``MetaTrainConfig``) otherwise; docs/method.md section 3 lists both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WORLD_CHECKPOINTS = Path.home() / ".cache" / "vitedit" / "hypernet-checkpoints"
DEMO_RECIPE: dict[str, Any] = {
    # measured on the demo backbone (the hypernetwork manifest; docs/method.md section 3):
    "inner_lr": 0.1,  # 1e-3 (ViT-B's) leaves the KL unchanged and s ~0.5% dense here
    "regression_lr": 1e-3,  # the reference 1e-4 is tuned for 10k iterations; we run ~1.3k
    "iterations": 1257,  # what a 28-minute budget reached on 2 shared cores (6 episodes/s)
    "schedule_iterations": 3000,  # the cosine of that run (planned for 1500 iterations)
    "width": 128,  # = the backbone width: no input projection, 4 heads, 0.7 M parameters
}
RECIPES: dict[str, dict[str, Any]] = {
    "demo": DEMO_RECIPE,
    # the demo's measured inner and regression lr (no separate search on this backbone yet);
    # width = the backbone width (128); iterations as a 30-minute budget allows on one thread
    "tiny-imagenet": {**DEMO_RECIPE, "iterations": 1000, "schedule_iterations": 2000},
}
_CONFIG_OPTIONS = (
    "iterations",
    "batch",
    "inner_lr",
    "inner_optimiser",
    "inner_steps",
    "outer_steps",
    "outer_lr",
    "outer_optimiser",
    "search_start",
    "sparsity",
    "regression_lr",
    "regression_target",
    "schedule_iterations",
    "seed",
    "locality",
    "anchors",
    "anchor_draws",
    "target_source",
    "edit_rho",
    "candidates",
    "edit_steps",
    "edit_stop",
    "spill_anchors",
    "own_target",
    "target_pick",
)


def register(sub: argparse._SubParsersAction) -> None:
    hypernet = sub.add_parser("hypernet", help="meta-train where-to-edit hypernetworks")
    actions = hypernet.add_subparsers(dest="hypernet_command", required=True)
    train = actions.add_parser(
        "train", help="meta-train on CutMix pseudo-edits (docs/method.md section 3)"
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--world",
        choices=["demo", "tiny-imagenet"],
        help="a built-in backbone and its CutMix pool (output: its shipped hypernetwork)",
    )
    source.add_argument("--backbone", type=Path, help="backbone manifest (JSON); needs --images")
    train.add_argument("--images", type=Path, help="unlabeled images of the backbone's domain")
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default for --world demo: the shipped assets)",
    )
    train.add_argument("--iterations", type=int, default=None, help="reference: 10000")
    train.add_argument("--batch", type=int, default=None, help="episodes per iteration, B (8)")
    train.add_argument("--inner-lr", type=float, default=None, help="inner step size, eta")
    train.add_argument(
        "--inner-optimiser",
        choices=["sgd", "rmsprop"],
        default=None,
        help="the inner steps: sgd (the paper's, default) or rmsprop (the edit's own optimiser, "
        "torch defaults but --inner-lr, which then defaults to the backbone's edit lr)",
    )
    train.add_argument("--inner-steps", type=int, default=None, help="K (5)")
    train.add_argument("--outer-steps", type=int, default=None, help="S (10)")
    train.add_argument(
        "--outer-lr", type=float, default=None, help="step size on the mask logits s (0.1)"
    )
    train.add_argument(
        "--outer-optimiser",
        choices=["rmsprop", "sgd"],
        default=None,
        help="the optimiser of the mask logits: rmsprop (the paper's, default; every entry moves "
        "alike) or sgd (entries move in proportion to their gradient; needs its own --outer-lr)",
    )
    train.add_argument(
        "--search-start",
        choices=["uniform", "zero"],
        default=None,
        help="the mask search's start: uniform, s0 ~ U(-1, 1) (the paper's, default), or zero",
    )
    train.add_argument("--sparsity", type=float, default=None, help="lambda (1.0)")
    train.add_argument("--regression-lr", type=float, default=None, help="hypernetwork RMSprop lr")
    train.add_argument(
        "--regression-target",
        choices=["logits", "movement"],
        default=None,
        help="what the hypernetwork regresses onto: the searched mask logits s (the paper's, "
        "default) or s minus the search's random start (what the episode moved)",
    )
    train.add_argument(
        "--schedule-iterations",
        type=int,
        default=None,
        help="cosine length of the regression lr (default: 2 x iterations)",
    )
    train.add_argument(
        "--locality",
        type=float,
        default=None,
        help="weight of an extra locality term (KL on sensitive clean images); 0 = the paper's",
    )
    train.add_argument(
        "--anchors",
        type=int,
        default=None,
        help="sensitive clean images per episode, for the locality term or edit targets (2)",
    )
    train.add_argument(
        "--anchor-draws",
        type=int,
        default=None,
        help="the --anchors are the lowest-margin of this many times more pool images drawn "
        "(4); more draws, anchors nearer the boundaries, as the benchmark's locality set",
    )
    train.add_argument(
        "--target-from",
        dest="target_source",
        choices=["search", "edits"],
        default=None,
        help="what the hypernetwork regresses onto: the mask search's logits (the paper's, "
        "default), or edits: of --candidates hard masks per episode (its own top --edit-rho, "
        "saliency's, mixes of the two), each run as the real edit, the one that fixes the "
        "episode with the least KL on --anchors sensitive clean images (not in the paper; "
        "needs --inner-optimiser rmsprop)",
    )
    train.add_argument(
        "--edit-rho", type=float, default=None, help="edits: share of entries a mask moves (0.02)"
    )
    train.add_argument(
        "--candidates", type=int, default=None, help="edits: masks tried per episode (4)"
    )
    train.add_argument(
        "--edit-steps",
        type=int,
        default=None,
        help="edits: most steps of each edit (default: the backbone's edit setting)",
    )
    train.add_argument(
        "--edit-stop",
        type=float,
        default=None,
        help="edits: the CE an edit stops at (default: the backbone's edit setting)",
    )
    train.add_argument(
        "--spill-anchors",
        type=int,
        default=None,
        help="edits: one more candidate per episode, saliency's ranking by first-order fix per "
        "spill on this many lowest-margin pool images (0 = off, the default; not in the paper; "
        "docs/method.md section 3)",
    )
    train.add_argument(
        "--no-own-target",
        dest="own_target",
        action="store_const",
        const=False,
        default=None,
        help="edits: the network's own mask is still tried (and logged) but never chosen as the "
        "target, so it never regresses onto its own output (not in the paper)",
    )
    train.add_argument(
        "--target-pick",
        choices=["spill", "sibling-per-spill"],
        default=None,
        help="edits: of the candidates that fix the episode, the target is the least anchor KL "
        "(spill, the default) or the most CE taken off another failure of the same true and "
        "predicted class per anchor KL (sibling-per-spill: generalization per spill; needs "
        "--episodes failures; not in the paper)",
    )
    train.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this saved hypernetwork's weights (same backbone and sites)",
    )
    train.add_argument(
        "--target-token",
        action="store_true",
        help="a hypernetwork that also reads the edit's target class (its classifier row, one "
        "more token); with --init-from, that network's weights plus the new token",
    )
    train.add_argument(
        "--gradient-input",
        action="store_true",
        help="a hypernetwork that also reads the edit's own gradient norms per neuron (what "
        "saliency ranks by), through gates that start at zero; with --init-from, that "
        "network's weights plus the gates (not in the paper)",
    )
    train.add_argument(
        "--spill-input",
        action="store_true",
        help="a hypernetwork that also reads the edit's first-order fix per spill on the "
        "--spill-anchors clean images (kept with it), through gates that start at zero; with "
        "--init-from, that network's weights plus the gates (not in the paper)",
    )
    train.add_argument(
        "--rank-feature",
        choices=["linear", "tail"],
        default=None,
        help="how --gradient-input and --spill-input read their rankings: linear, each entry's "
        "rank in [-1, 1] (default), or tail, the rank as an exponential quantile, so the top "
        "stands out (not in the paper; docs/method.md section 3)",
    )
    train.add_argument(
        "--episodes",
        choices=["cutmix", "failures"],
        default="cutmix",
        help="episode source: the paper's CutMix pseudo-edits (default), or natural failures "
        "(--failures: images the backbone gets wrong, fixed toward their true label)",
    )
    train.add_argument(
        "--failures",
        type=Path,
        default=None,
        help="failure set (.npz) for --episodes failures (vitedit hypernet failures)",
    )
    train.add_argument(
        "--failure-target",
        choices=["raise", "uniform"],
        default="raise",
        help="failures: the target distribution; raise = the backbone's own logits with the "
        "label's raised to CE 0.5 at T=1 (the edit's stop), uniform = 0.9 on the label at T",
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
    train.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the episode draws and of a fresh hypernetwork's init (default 0)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=250)
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help=f"default: OUT/checkpoint ({WORLD_CHECKPOINTS}/WORLD for --world, "
        "to keep checkpoints out of the shipped assets)",
    )
    train.add_argument("--log-every", type=int, default=25)
    train.add_argument(
        "--no-health-check",
        action="store_true",
        help="do not stop when the masks collapse or the mask search does not learn",
    )
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    train.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="forward passes in fp32 or under bf16 autocast (GPU)",
    )
    train.set_defaults(func=_train)

    failures = actions.add_parser(
        "failures",
        help="the backbone's mistakes on its own train split (episodes for --episodes failures)",
    )
    failures.add_argument("--world", choices=["tiny-imagenet"], required=True)
    failures.add_argument(
        "--root", type=Path, required=True, help="the dataset folder or its .tar.gz"
    )
    failures.add_argument("--out", type=Path, required=True, help="output .npz")
    failures.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where a .tar.gz is extracted (default: beside --out)",
    )
    failures.add_argument("--seed", type=int, default=0, help="the train split's seed (0)")
    failures.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    failures.set_defaults(func=_failures)


def _train(args: argparse.Namespace) -> int:
    import torch

    from models.hypernet.metatrain import HEALTH_AFTER, build_hypernetwork, meta_train
    from models.precision import autocast
    from models.sites import Sites
    from models.worlds.bench import edit_defaults

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, pool, out = _source(args)
    sampler, episode_source = _episode_source(args, backbone)
    options = _options(
        args, backbone.manifest.extra.get("meta_defaults") or {}, edit_defaults(backbone)
    )
    sites = Sites.for_model(backbone.model, tuple(args.blocks) if args.blocks else None)
    cfg = _config(options)
    if args.spill_input and not cfg.spill_anchors:
        raise SystemExit(
            "vitedit hypernet train: --spill-input reads fix per spill on clean anchors: give "
            "--spill-anchors N too (with --target-from edits)"
        )
    if args.init_from is not None:
        from models.hypernet.network import Hypernetwork

        # checks the backbone and the sites; loaded frozen, so unfreeze for training
        hypernet = Hypernetwork.load(args.init_from, backbone, sites).requires_grad_(True)
        if args.rank_feature is not None:
            try:
                hypernet = hypernet.with_rank_feature(args.rank_feature)
            except ValueError as exc:
                raise SystemExit(f"vitedit hypernet train: --rank-feature: {exc}") from None
        if args.target_token and not hypernet.config.target_token:
            hypernet = hypernet.with_target_token(cfg.seed)
        if args.gradient_input and not hypernet.config.gradient_input:
            hypernet = hypernet.with_gradient_input()
        if args.spill_input and not hypernet.config.spill_input:
            hypernet = hypernet.with_spill_input()
    else:
        hypernet = build_hypernetwork(
            backbone.model,
            sites,
            cfg.seed,
            width=options.get("width"),
            target_token=args.target_token,
            gradient_input=args.gradient_input,
            spill_input=args.spill_input,
            rank_feature=args.rank_feature or "linear",
        )
    if args.rank_feature and not (hypernet.config.gradient_input or hypernet.config.spill_input):
        raise SystemExit(
            "vitedit hypernet train: --rank-feature says how the rankings of --gradient-input "
            "and --spill-input are read: give one of them too"
        )
    checkpoints = args.checkpoint_dir or (WORLD_CHECKPOINTS / args.world if args.world else None)
    budget = None if args.time_budget is None else 60 * args.time_budget
    with autocast(backbone.device, args.precision):
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
            sampler=None if sampler is None else sampler(cfg),
            extra={
                "source": _describe(args),
                "episode_source": episode_source,
                "time_budget_s": budget,
                "init_from": _init_record(args.init_from, hypernet),
                "precision": args.precision,
            },
            checkpoint_dir=checkpoints,
            health_after=None if args.no_health_check else HEALTH_AFTER,
            time_budget_s=budget,
        )
    print(json.dumps({"out": str(out), "final": history[-1] if history else {}}, indent=2))
    return 0


def _episode_source(args: argparse.Namespace, backbone: Any) -> tuple[Any, dict[str, Any]]:
    """(a sampler factory of the config, or None for CutMix; the manifest's record of it)."""
    if args.episodes == "cutmix":
        if args.failures is not None:
            raise SystemExit("--failures needs --episodes failures")
        if args.target_pick == "sibling-per-spill":
            raise SystemExit(
                "--target-pick sibling-per-spill reads each failure's sibling (same true and "
                "predicted class): it needs --episodes failures --failures FILE"
            )
        return None, {"kind": "cutmix"}
    if args.failures is None:
        raise SystemExit("--episodes failures needs --failures FILE (vitedit hypernet failures)")
    import torch

    from models.hypernet.failures import CONFIDENCE, STOP_CE, FailureSampler, FailureSet
    from models.store.manifest import sha256_file

    data = FailureSet.load(args.failures)
    record = {
        "kind": "failures",
        "file": str(args.failures),
        "sha256": sha256_file(args.failures),
        "size": len(data),
        "target": args.failure_target,
        **({"stop_ce": STOP_CE} if args.failure_target == "raise" else {"confidence": CONFIDENCE}),
        "built": data.meta,
    }
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    predictions = torch.from_numpy(data.predictions)
    transform = _world_transform(args, backbone)

    def make(cfg: Any) -> FailureSampler:
        return FailureSampler(
            backbone.model,
            images,
            labels,
            cfg.temperature,
            seed=cfg.seed,
            target=args.failure_target,
            transform=transform,
            device=backbone.device,
            # siblings (same true and predicted class) only where the target pick reads them
            predictions=predictions if cfg.target_pick == "sibling-per-spill" else None,
        )

    return make, record


def _world_transform(args: argparse.Namespace, backbone: Any) -> Any:
    """uint8 (N, H, W, 3) -> the backbone's input: the world's own, else its normalisation."""
    if args.world:
        from models.worlds.catalog import get_world

        to_input = get_world(args.world).to_input  # takes numpy
        return lambda x: to_input(x.numpy())
    import torch

    cfg = backbone.model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return lambda x: (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _failures(args: argparse.Namespace) -> int:
    import torch

    from cli.world import _dataset_root
    from models.worlds import tiny_imagenet as tin

    if args.threads:
        torch.set_num_threads(args.threads)
    root = _dataset_root(args.root, args.work or args.out.parent / "tiny-imagenet-work")
    backbone = tin.load_tiny_imagenet_backbone()
    failures = tin.train_failures(backbone, root, seed=args.seed)
    failures.save(args.out)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, **failures.meta}))
    return 0


def _init_record(path: Path | None, hypernet: Any) -> dict[str, Any] | None:
    """Where a continued training started: the folder named, and what was in it then (the
    folder may be overwritten by this very run, as for a built-in world's)."""
    if path is None:
        return None
    return {
        "path": str(path),
        "weights_sha256": hypernet.weights_sha256,
        "episodes": hypernet.training_episodes,
    }


def _config(options: dict[str, Any]) -> Any:
    """The meta-training config of the resolved options; a bad value exits saying which."""
    from models.hypernet.metatrain import MetaTrainConfig

    try:
        return MetaTrainConfig(**{k: options[k] for k in _CONFIG_OPTIONS if k in options})
    except ValueError as exc:
        raise SystemExit(f"vitedit hypernet train: {exc}") from None


def _options(
    args: argparse.Namespace, calibrated: dict[str, Any], edit: dict[str, float]
) -> dict[str, Any]:
    """Explicit options win; then what `vitedit calibrate` measured for this backbone (the
    manifest's ``extra.meta_defaults``); then the world's recipe (--world); then config defaults.
    Those inner lrs are SGD's: with --inner-optimiser rmsprop and no --inner-lr, the inner lr is
    the backbone's edit lr (``edit``: models.worlds.bench.edit_defaults), as the edit's own
    optimiser runs it; edit targets take its steps and stop unless given."""
    base = dict(RECIPES[args.world]) if args.world else {}
    measured = {k: v for k, v in calibrated.items() if k in _CONFIG_OPTIONS}
    given = {
        k: getattr(args, k) for k in (*_CONFIG_OPTIONS, "width") if getattr(args, k) is not None
    }
    options = {**base, **measured, **given}
    if options.get("inner_optimiser") == "rmsprop" and args.inner_lr is None:
        options["inner_lr"] = edit["lr"]
    if options.get("target_source") == "edits":
        options.setdefault("edit_steps", int(edit["max_steps"]))
        options.setdefault("edit_stop", edit["stop_loss"])
    return options


def _source(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """(backbone, CutMix pool, output folder) for --world NAME or --backbone/--images."""
    from models.hypernet.cutmix import FolderPool, TensorPool

    if args.world:
        from models.worlds.catalog import get_world

        world = get_world(args.world)
        backbone = world.load_backbone(args.device)
        pool = TensorPool(world.to_input(world.load_world().pool))
        return backbone, pool, args.out or world.hypernet_dir
    from models.backbones import load_backbone
    from models.errors import DataError
    from models.store.manifest import BackboneManifest

    if args.images is None or args.out is None:
        raise DataError("--backbone needs --images (a folder of unlabeled images) and --out")
    backbone = load_backbone(BackboneManifest.read(args.backbone), args.device)
    return backbone, FolderPool.from_folder(args.images, backbone.transform), args.out


def _describe(args: argparse.Namespace) -> str:
    if args.world:
        return f"world {args.world} (CutMix pool of unlabeled train images of its backbone)"
    return f"backbone {args.backbone}, images {args.images}"
