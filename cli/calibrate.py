"""``vitedit calibrate``: measure a backbone's edit setting and meta-training inner lr.

    vitedit calibrate --backbone my-vit.json --groups edit_groups/ --locality locality/ \\
        --images train/ --write
    vitedit calibrate --world tiny-imagenet            # a built-in world's tuning half

Only the tuning groups are used: a world's "tuning" half, or a seeded half of ``--groups`` (the
names are printed and recorded, keep the others for reported figures). ``--write`` records the
choices and every measured row in the manifest (models/calibration.py says how they are chosen).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from cli.args import parse_numbers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure a backbone's edit optimiser setting and meta-training inner lr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", choices=["demo", "tiny-imagenet"], help="a built-in world")
    source.add_argument("--backbone", type=Path, help="backbone manifest (.json)")
    p.add_argument("--groups", type=Path, help="edit groups, paper layout (with --backbone)")
    p.add_argument("--locality", type=Path, help="locality images (with --backbone)")
    p.add_argument(
        "--images", type=Path, help="unlabeled images for the inner-lr search (else it is skipped)"
    )
    add_search_options(p)
    p.add_argument("--write", action="store_true", help="record the choices in the manifest")
    p.set_defaults(func=run_calibrate)


def add_search_options(p: argparse.ArgumentParser) -> None:
    """What the calibration tries (shared by ``vitedit models add --calibrate``)."""
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="edit learning rates to try")
    p.add_argument("--max-steps", default="50", help="edit step limits to try")
    p.add_argument("--stop-losses", default="0.1,0.5", help="edit stop losses (CE) to try")
    p.add_argument("--inner-lrs", default="1e-3,1e-2,1e-1,1", help="meta-training inner lrs")
    p.add_argument("--max-groups", type=int, default=6, help="tuning groups sampled (6)")
    p.add_argument("--edits", type=int, default=2, help="edit images per group (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = parse_numbers(text)
    except ValueError:
        raise SystemExit(f"{what} {text!r}: expected numbers like 1e-3,1e-2") from None
    if not values or min(values) <= 0:
        raise SystemExit(f"{what} {text!r}: give positive numbers")
    return values


def _inputs(args: argparse.Namespace, device: Any) -> tuple[Any, Any, Any, Path]:
    """(backbone, benchmark, CutMix pool or None, manifest path)."""
    from models.hypernet.cutmix import FolderPool, TensorPool

    if args.world:
        from models.worlds.catalog import get_world

        world = get_world(args.world)
        loaded = world.load_world()
        pool = TensorPool(world.to_input(loaded.pool))
        return world.load_backbone(device), loaded.benchmark, pool, world.assets / "backbone.json"
    if args.groups is None or args.locality is None:
        raise SystemExit("--backbone needs --groups DIR and --locality DIR (paper layout)")
    from models.backbones import load_backbone
    from models.store.manifest import BackboneManifest
    from models.worlds.layout import read_benchmark

    backbone = load_backbone(BackboneManifest.read(args.backbone), device)
    pool = FolderPool.from_folder(args.images, backbone.transform) if args.images else None
    return backbone, read_benchmark(args.groups, args.locality), pool, args.backbone


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from models import calibration as cal
    from models.sites import Sites

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lrs = _floats(args.lrs, "--lrs")
    steps = [int(v) for v in _floats(args.max_steps, "--max-steps")]
    stops = _floats(args.stop_losses, "--stop-losses")
    inner_lrs = _floats(args.inner_lrs, "--inner-lrs")
    backbone, benchmark, pool, manifest_path = _inputs(args, device)
    tuning = cal.tuning_groups(benchmark, args.seed)
    names = [g.name for g in tuning.groups]
    print(f"tuning groups ({len(names)}): {', '.join(names)}")

    print("\nedit setting: a 10% random mask and full fine-tuning of the sites")
    print("| lr | max steps | stop CE | method | SR % | GR % | LR % | steps | s/edit |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    edit = cal.search_edit_setting(
        backbone,
        tuning,
        lrs,
        steps,
        stops,
        groups=args.max_groups,
        edits=args.edits,
        seed=args.seed,
        progress=print_edit_row,
    )
    if edit.chosen is None:
        print(f"no setting fixed every edit (SR >= {cal.MIN_SR:.0%}): try larger --lrs or steps")
    else:
        print(
            f"chosen: lr {edit.chosen[0]:g}, max steps {edit.chosen[1]}, stop CE "
            f"{edit.chosen[2]:g} ({edit.seconds:.0f} s)"
        )

    inner = None
    if pool is not None:
        print("\nmeta-training inner lr: the mask search on CutMix pseudo-edits")
        print("| inner lr | KL first | KL last | drop % | mask density % |")
        print("|---:|---:|---:|---:|---:|")
        inner = cal.search_inner_lr(
            backbone,
            Sites.for_model(backbone.model),
            pool,
            inner_lrs,
            seed=args.seed,
            progress=_print_inner_row,
        )
        if inner.chosen is None:
            print(f"no inner lr kept masks {cal.DENSITY_RANGE} dense while lowering the KL")
        else:
            print(f"chosen: inner lr {inner.chosen:g} ({inner.seconds:.0f} s)")
    else:
        print("\nno --images: the meta-training inner lr was not measured")

    if args.write:
        command = shlex.join(["vitedit", *getattr(args, "argv", sys.argv[1:])])
        cal.write_calibration(manifest_path, edit, inner, command, names)
        print(f"\nwrote extra.edit_defaults / meta_defaults / calibration to {manifest_path}")
    return 0 if edit.chosen is not None else 1


def print_edit_row(r: dict[str, Any]) -> None:
    print(
        f"| {r['lr']:g} | {r['max_steps']} | {r['stop_loss']:g} | {r['method']} | "
        f"{100 * r['sr']:.1f} | {100 * r['gr']:.1f} | {100 * r['locality']:.1f} | "
        f"{r['steps_mean']:.1f} | {r['seconds_per_edit']:.2f} |",
        flush=True,
    )


def _print_inner_row(r: dict[str, float]) -> None:
    print(
        f"| {r['inner_lr']:g} | {r['kl_first']:.4f} | {r['kl_last']:.4f} | "
        f"{100 * r['kl_drop']:.1f} | {100 * r['s_density']:.1f} |",
        flush=True,
    )
