"""``vitedit models``: add, list and remove the models of a store (run where the store is mounted).

    vitedit models add my-vit --backbone my-vit.json [--hypernet my-hypernet/] \\
        [--groups edit_groups/ --locality locality/ [--calibrate [--images train/]]] \\
        [--default-method saliency]
    vitedit models list
    vitedit models remove my-vit [--purge]
    vitedit models add my-vit --backbone my-vit.json --server http://api:8000   # over HTTP

``add`` loads the model as a worker would and refuses it, with the reason, if it does not load;
then it copies the files into the store (``models/<name>/base/``) and registers them by
store-relative keys, which every worker on every host resolves against its own mount of the store.
Running workers and the API see the new entry with their next request. ``--calibrate`` runs
``vitedit calibrate`` on the stored copy (the benchmark's tuning half; ``--images`` for the
meta-training inner lr) before the model is published, so its edits use the measured setting. The store is ``--store``,
else ``$VITEDIT_STORE``, else ``var/store`` (what ``vitedit serve`` uses).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.calibrate import add_search_options

if TYPE_CHECKING:
    from models.store.store import Store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="add, list and remove the models of a store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="models_command", required=True)
    add = actions.add_parser("add", help="check a model, copy its files into the store, register")
    add.add_argument("name", help="the model's name in the API (letters, digits, . _ -)")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--backbone", type=Path, help="backbone manifest (.json)")
    what.add_argument(
        "--source",
        help="instead of local files: a folder of the store under incoming/ (e.g. incoming/my-vit,"
        " put there with `aws s3 cp` or a copy) holding backbone.json and its weights, "
        "optionally hypernet/ and benchmark/{edit_groups,locality}/",
    )
    add.add_argument("--hypernet", type=Path, help="a hypernetwork folder meta-trained for it")
    add.add_argument("--groups", type=Path, help="benchmark edit groups (paper layout)")
    add.add_argument("--locality", type=Path, help="benchmark locality images")
    add.add_argument("--default-method", help="default editor (where2edit with a hypernetwork)")
    add.add_argument("--replace", action="store_true", help="replace a registered model's files")
    add.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the edit setting (and, with --images, the inner lr) on the benchmark's "
        "tuning half and record it (vitedit calibrate --help)",
    )
    add.add_argument("--images", type=Path, help="unlabeled images for --calibrate's inner lr")
    add_search_options(add.add_argument_group("calibration (with --calibrate)"))
    lst = actions.add_parser("list", help="the registered models")
    rm = actions.add_parser("remove", help="unregister a model and delete its files")
    rm.add_argument("name")
    rm.add_argument("--purge", action="store_true", help="also delete the model's versions")
    for action in (add, lst, rm):
        where = action.add_mutually_exclusive_group()
        where.add_argument("--store", type=Path, help="the store folder (this host's mount)")
        where.add_argument(
            "--server",
            help="a vitedit API instead of a store mount: POST/DELETE /v1/models (registering "
            "needs an admin tenant's key where the server has keys)",
        )
        action.add_argument(
            "--api-key",
            default=os.environ.get("VITEDIT_API_KEY"),
            help="with --server: the Bearer key (default: $VITEDIT_API_KEY)",
        )
    p.set_defaults(func=run_models)


def _store(args: argparse.Namespace) -> Store:
    from workers.settings import WorkerSettings

    settings = WorkerSettings()  # VITEDIT_STORE_URL: the bucket, with --store as its cache
    settings = settings.model_copy(update={"store": args.store or settings.store})
    if args.models_command != "add" and not settings.store_url and not settings.store.is_dir():
        raise SystemExit(  # list and remove only read: they do not create a store
            f"there is no store at {settings.store}: give --store (or $VITEDIT_STORE), or add a "
            "model there first with `vitedit models add`"
        )
    return settings.open_store()


def _calibrate(args: argparse.Namespace, manifest: Path, groups: Path, locality: Path) -> None:
    """``vitedit calibrate --write`` on the staged copy of the model."""
    from cli.calibrate import run_calibrate

    staged = {"backbone": manifest, "groups": groups, "locality": locality}
    calibration = argparse.Namespace(**{**vars(args), **staged, "world": None, "write": True})
    if run_calibrate(calibration) != 0:
        print(
            "calibration found no setting that fixes every tuning edit: the model keeps the "
            "default edit setting (try larger --lrs or --max-steps, then --replace)"
        )


def run_models(args: argparse.Namespace) -> int:
    if args.server:
        return _over_http(args)
    store = _store(args)
    if args.models_command == "add":
        from workers.model_files import add_model, source_files

        calibrate = (lambda *paths: _calibrate(args, *paths)) if args.calibrate else None
        if args.source:
            options = {"default_method": args.default_method, "replace": args.replace}
            files = source_files(store, args.source)
            entry = add_model(store, args.name, **files, **options, calibrate=calibrate)
        else:
            entry = add_model(
                store, args.name, args.backbone, **_model_files(args), calibrate=calibrate
            )
        print(
            f"added {entry.name}: {entry.timm_name}, {entry.num_classes} classes, default method "
            f"{entry.default_method}, weights sha256 {entry.weights_sha256[:12]}..., "
            f"files in {store.model_files(entry.name)}"
        )
    elif args.models_command == "list":
        entries = store.models()
        if not entries:
            print(
                f"no models are registered in the store at {store.root}: add one with "
                "`vitedit models add NAME --backbone MANIFEST`, or give --store (or $VITEDIT_STORE)",
                file=sys.stderr,
            )
        for entry in entries:
            print(
                f"{entry.name}\t{entry.timm_name}\t{entry.num_classes} classes\t"
                f"default {entry.default_method}\t{len(store.versions(entry.name))} versions"
            )
    else:
        store.unregister_model(args.name, purge=args.purge)
        print(f"removed {args.name}")
    return 0


def _model_files(args: argparse.Namespace) -> dict[str, Any]:
    """What ``add`` passes on, to the store here or to a server."""
    return {
        "hypernetwork": args.hypernet,
        "groups": args.groups,
        "locality": args.locality,
        "default_method": args.default_method,
        "replace": args.replace,
    }


def _over_http(args: argparse.Namespace) -> int:
    """The same three commands against a server (any host): the worker there loads the model."""
    from cli.api import _with_client

    if args.models_command == "add" and args.calibrate:
        raise SystemExit(
            "--calibrate runs here, on this host's CPU or GPU: run `vitedit calibrate --backbone "
            "... --write` first, then send the manifest it wrote with --server"
        )

    def go(client: Any) -> int:
        if args.models_command == "add" and args.source:
            model = client.register_model_from_store(
                args.name, args.source, default_method=args.default_method, replace=args.replace
            )
            print(f"added {model.name} on {args.server} from {args.source}")
        elif args.models_command == "add":
            model = client.register_model(args.name, args.backbone, **_model_files(args))
            print(
                f"added {model.name} on {args.server}: {model.backbone['timm_name']}, "
                f"{model.num_classes} classes, default method {model.default_method}"
            )
        elif args.models_command == "list":
            for model in client.models():
                print(
                    f"{model.name}\t{model.backbone['timm_name']}\t{model.num_classes} classes\t"
                    f"default {model.default_method}"
                )
        else:
            client.remove_model(args.name, purge=args.purge)
            print(f"removed {args.name} from {args.server}")
        return 0

    return _with_client(args, go)
