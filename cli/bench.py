"""``vitedit bench``: compare edit methods on a benchmark (SR / GR / LR per knob value).

vitedit bench --world demo --quick --out bench-out
vitedit bench --world tiny-imagenet --split tuning --methods random,ft-l1 --out tuning/
vitedit bench --world tiny-imagenet --methods where2edit-sal --set where2edit-sal.mix=0.25 --out m/
vitedit bench --backbone backbone.json --groups edit_groups/ --locality locality/ --out out/
vitedit bench --backbone vit_base_patch16_224 --weights vit.safetensors --groups G --locality L
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

W2E = "where2edit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark edit methods: SR/GR/LR fronts, results.json + plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("backbone and benchmark")
    src.add_argument(
        "--world",
        choices=["demo", "tiny-imagenet"],
        help="a built-in backbone, benchmark and hypernetwork (vitedit world show NAME)",
    )
    src.add_argument(
        "--split",
        choices=["tuning", "test", "all"],
        help="groups to run: choose knobs on 'tuning', report 'test' (default: the world's "
        "report split, 'test' for tiny-imagenet; 'all' for a benchmark without halves)",
    )
    src.add_argument("--backbone", help="a backbone manifest (.json) or a timm model name")
    src.add_argument("--weights", type=Path, help="safetensors weights for a timm name")
    src.add_argument(
        "--groups", type=Path, help="edit-groups folder in the paper's layout (<true>-<tag>/*.png)"
    )
    src.add_argument("--locality", type=Path, help="locality images folder")
    add_locality_rule_argument(src)
    src.add_argument("--hypernet", type=Path, help="hypernetwork folder for where2edit")
    src.add_argument(
        "--blocks",
        help="editable blocks, e.g. 7,8,9 (default: the hypernetwork's, else the "
        "3 blocks ending at 75%% depth)",
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--methods", help="comma-separated methods (default: all available)")
    run.add_argument(
        "--knobs",
        action="append",
        default=[],
        metavar="METHOD=V1,V2",
        help="knob values for a method, e.g. random=0.1,0.05 (repeatable)",
    )
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="METHOD.OPTION=V",
        help="a method's option, fixed at every knob value, e.g. where2edit-sal.mix=0.25 "
        "(repeatable, or ';'-separated; not the knob, which --knobs sweeps, nor the shared "
        "optimiser setting below)",
    )
    run.add_argument(
        "--edits-per-group", type=int, default=10, help="edit images sampled per group (0 = all)"
    )
    run.add_argument("--max-groups", type=int, help="use at most this many groups (sampled)")
    run.add_argument(
        "--quick",
        action="store_true",
        help="a small subset: few groups, 2 edits per group, 2 knob values per method",
    )
    opt = p.add_argument_group("optimiser setting shared by all methods (default: the backbone's)")
    opt.add_argument("--lr", type=float)
    opt.add_argument("--max-steps", type=int)
    opt.add_argument("--stop-loss", type=float)
    opt.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds: each repeats the sampled edits and the mask draws (default 0,1,2)",
    )
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="forward passes in fp32 or under bf16 autocast (GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for a built-in world, whose 17-token models "
        "run fastest on one thread; else torch's choice)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="merge results.json files of runs that differ only in their methods or knob values "
        "(same backbone, sites, groups, edits, settings, hypernetwork) into --out; runs nothing",
    )
    p.add_argument(
        "--drop",
        default="",
        help="with --merge: methods to leave out of every input (e.g. --merge A.json --drop "
        "where2edit --out A2, then --merge A2/results.json B.json: B's where2edit in their place)",
    )
    p.set_defaults(func=run_bench_command)


def add_world_arguments(parser: Any, world: str = "demo") -> None:
    """The probe scripts' choice of world, hypernetwork, split and locality set (scripts/)."""
    parser.add_argument("--world", default=world, choices=["demo", "tiny-imagenet"])
    parser.add_argument("--hypernet", type=Path, help="hypernetwork folder (default: the world's)")
    parser.add_argument(
        "--split", help="groups: tuning, test or all (default: the world's report split)"
    )
    add_locality_rule_argument(parser)


def open_probe_world(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(backbone, benchmark, hypernetwork or None, sites) of :func:`add_world_arguments`'s
    choice, on one CPU thread (the probes' setting), warnings only."""
    import torch

    from models.worlds.catalog import open_world

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    return open_world(args.world, args.split, args.hypernet, args.locality_rule)


def add_locality_rule_argument(parser: Any) -> None:
    """``--locality-rule``, for the bench and the probe scripts (scripts/*_probe.py)."""
    parser.add_argument(
        "--locality-rule",
        choices=["smallest", "reference"],
        help="tiny-imagenet: its locality set, the 500 correct images with the smallest top-1 "
        "minus top-2 gaps (default: 'smallest', the shipped front's) or the paper's reference "
        "rule, 500 drawn from those with a gap below 0.05 ('reference'; docs/worlds.md)",
    )


def parse_knobs(items: list[str]) -> dict[str, tuple[float, ...]]:
    """["random=0.1,0.05", "lora=1,4;ft-l2=0.01"] -> {"random": (0.1, 0.05), ...}."""
    knobs: dict[str, tuple[float, ...]] = {}
    for item in (part for raw in items for part in raw.split(";") if part.strip()):
        method, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise SystemExit(f"--knobs {item!r}: expected METHOD=V1,V2")
        try:
            knobs[method.strip()] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--knobs {item!r}: values must be numbers") from None
    return knobs


def parse_sets(items: list[str]) -> dict[str, dict[str, float]]:
    """["where2edit-sal.mix=0.25"] -> {"where2edit-sal": {"mix": 0.25}} (checked by BenchConfig)."""
    options: dict[str, dict[str, float]] = {}
    for item in (part.strip() for raw in items for part in raw.split(";") if part.strip()):
        target, sep, value = item.partition("=")
        method, dot, key = target.strip().rpartition(".")
        if not sep or not dot or not method or not key or not value.strip():
            raise SystemExit(f"--set {item!r}: expected METHOD.OPTION=VALUE")
        try:
            options.setdefault(method, {})[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: the value must be a number") from None
    return options


def _load_backbone(args: argparse.Namespace, device: Any) -> Any:
    from models.backbones import backbone_from_name, load_backbone
    from models.store.manifest import BackboneManifest

    if args.world:
        from models.worlds.catalog import get_world

        return get_world(args.world).load_backbone(device)
    if not args.backbone:
        raise SystemExit("give --world NAME, or --backbone (a manifest .json or a timm name)")
    if args.backbone.endswith(".json"):
        return load_backbone(BackboneManifest.read(args.backbone), device)
    return backbone_from_name(args.backbone, weights=args.weights, device=device)


def _load_benchmark(args: argparse.Namespace) -> Any:
    if args.world:
        from models.worlds.catalog import get_world

        return get_world(args.world).benchmark(args.split, args.locality_rule)
    if args.groups is None or args.locality is None:
        raise SystemExit("give --groups DIR and --locality DIR (paper layout), or --world NAME")
    from models.worlds.layout import read_benchmark

    return read_benchmark(args.groups, args.locality).select(args.split or "all")


def _load_hypernetwork(args: argparse.Namespace, backbone: Any) -> tuple[Any, Any]:
    """(hypernetwork, its sites) for where2edit, or (None, None) with a logged note."""
    from models.hypernet import network as hn

    directory = args.hypernet
    if directory is None and args.world:
        from models.worlds.catalog import get_world

        directory = get_world(args.world).hypernet_dir
        if not (directory / hn.MANIFEST_FILE).is_file():
            log.info("world %s ships no hypernetwork yet: %s is skipped", args.world, W2E)
            return None, None
    if directory is None:
        log.info("no --hypernet given: %s is skipped", W2E)
        return None, None
    return hn.Hypernetwork.load(directory, backbone), hn.recorded_sites(directory)


def _wants_hypernetwork(args: argparse.Namespace, named: tuple[str, ...]) -> bool:
    """Whether to load a hypernetwork: not when ``--methods`` names only methods that need none and
    no ``--hypernet`` is given, so baselines run on a backbone no hypernetwork was trained for yet."""
    if args.methods is None or args.hypernet is not None:
        return True
    from models.editing import EDITORS

    return any(EDITORS[m].needs_hypernetwork for m in named)


def _named_methods(args: argparse.Namespace) -> tuple[str, ...]:
    """The methods ``--methods`` names (empty when it is not given), refused before anything
    loads when one is unknown or the list names none."""
    from models.editing import EDITORS

    if args.methods is None:
        return ()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise SystemExit(f"--methods {args.methods!r} names no method")
    for m in methods:
        if m not in EDITORS:
            raise SystemExit(f"unknown method {m!r}; choose from {sorted(EDITORS)}")
    return methods


def _methods(args: argparse.Namespace, hypernet: Any) -> tuple[str, ...]:
    """The methods to run: those ``--methods`` names (checked by :func:`_named_methods`), or
    every available one."""
    from models.editing import EDITORS

    if args.methods is not None:
        methods = _named_methods(args)
        for m in methods:
            if EDITORS[m].needs_hypernetwork and hypernet is None:
                raise SystemExit(f"{m} needs a hypernetwork: give --hypernet DIR")
        return methods
    from models.worlds.headline import VARIANTS

    return tuple(
        m
        for m, e in EDITORS.items()
        if (hypernet is not None or not e.needs_hypernetwork) and m not in VARIANTS
    )


def merge_command(args: argparse.Namespace) -> int:
    from models.store.manifest import read_json
    from models.worlds.bench import merge_results, write_results

    drop = [m.strip() for m in args.drop.split(",") if m.strip()]
    results = merge_results([read_json(path) for path in args.merge], drop=drop)
    json_path, png_path = write_results(results, args.out)
    print_table(results)
    print(f"wrote {json_path} and {png_path}")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    if args.merge:
        return merge_command(args)
    import torch

    from models.sites import Sites
    from models.worlds.bench import BenchConfig, edit_defaults, run_bench, write_results

    try:  # the run's own settings first: a typo is refused before anything loads
        seeds = tuple(int(v) for v in args.seeds.split(",") if v.strip())
    except ValueError:
        seeds = ()
    if not seeds:
        raise SystemExit(f"--seeds {args.seeds!r}: expected integers like 0,1,2")
    knobs, sets = parse_knobs(args.knobs), parse_sets(args.sets)
    named = _named_methods(args)
    if args.locality_rule and not args.world:
        raise SystemExit("--locality-rule chooses a built-in world's locality set: give --world")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if args.world and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    backbone = _load_backbone(args, device)
    benchmark = _load_benchmark(args)
    hypernet, sites = (
        _load_hypernetwork(args, backbone) if _wants_hypernetwork(args, named) else (None, None)
    )
    methods = _methods(args, hypernet)
    if args.blocks:
        sites = Sites.for_model(backbone.model, tuple(int(b) for b in args.blocks.split(",")))
    defaults = edit_defaults(backbone)
    shared = {
        k: getattr(args, k) if getattr(args, k) is not None else defaults[k]
        for k in ("lr", "max_steps", "stop_loss")
    }
    options = dict(
        knobs=knobs,
        options=sets,
        seeds=seeds,
        precision=args.precision,
        **shared,
    )
    if args.quick:
        config = BenchConfig.quick_run(methods, **options)
    else:
        config = BenchConfig(
            methods,
            edits_per_group=args.edits_per_group or None,
            max_groups=args.max_groups,
            **options,
        )
    log.info("benchmark: %s; methods %s; %s", benchmark.describe(), ", ".join(methods), shared)
    results = _run_with_progress(
        lambda progress: run_bench(backbone, benchmark, config, hypernet, sites, progress)
    )
    json_path, png_path = write_results(results, args.out)
    print_table(results)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _run_with_progress(fn: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("edits", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:24])

        return fn(progress)


def with_ci(point: dict[str, Any], metric: str) -> str:
    """'45.4 [41.0, 49.9]': a metric in % with its 95% interval, when the results have one."""
    text = f"{100 * point[metric]:.1f}"
    if "ci95" in point:
        lo, hi = point["ci95"][metric]
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = results["settings"]
    table = Table(
        title=f"{results['backbone']['name']}: lr {s['lr']:g}, "
        f"max {s['max_steps']} steps, stop CE <= {s['stop_loss']:g}"
    )
    for col in (
        "method",
        "knob",
        "SR %",
        "GR % [95% CI]",
        "LR % [95% CI]",
        "s / edit",
        "steps",
        "edits",
    ):
        table.add_column(col, justify="left" if col in ("method", "knob") else "right")
    for method, entry in results["methods"].items():
        for p in entry["points"]:
            knob = "" if entry["knob"] is None else f"{entry['knob']}={p['knob_value']:g}"
            table.add_row(
                method,
                knob,
                f"{100 * p['sr']:.1f}",
                with_ci(p, "gr"),
                with_ci(p, "lr"),
                f"{p['seconds_per_edit']:.2f}",
                f"{p['steps_mean']:.1f}",
                str(p["n_edits"]),
            )
    summary = Table(title="best GR at LR >= 90%")
    for col in ("method", "knob", "SR %", "GR %", "LR %"):
        summary.add_column(col)
    for method, entry in results["methods"].items():
        best = entry["best_at_lr90"]
        if best is None:
            summary.add_row(method, "-", "-", "no point with LR >= 90%", "-")
        else:
            knob = "" if best["knob"] is None else f"{best['knob']:g}"
            summary.add_row(
                method,
                knob,
                f"{100 * best['sr']:.1f}",
                f"{100 * best['gr']:.1f}",
                f"{100 * best['lr']:.1f}",
            )
    console = Console()
    console.print(table)
    console.print(summary)
    for name, cmp in results.get("headline", {}).items():
        # on_fronts: GR at the bar on each method's upper hull (models/worlds/headline.py)
        at = "LR =" if name.endswith("_on_fronts") else "LR >="
        if "gr_difference" not in cmp:
            console.print(f"headline {name} ({at} {100 * cmp['min_lr']:.1f}%): {cmp['verdict']}")
            continue
        lo, hi = cmp["ci95"]
        console.print(
            f"headline {name} ({at} {100 * cmp['min_lr']:.1f}%, SR 100%): where2edit minus "
            f"{cmp['best_baseline']}: GR {100 * cmp['gr_difference']:+.1f} points, 95% CI "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] ({'separated' if cmp['separated'] else 'overlapping'})"
        )
