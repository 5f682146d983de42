"""Register a model in the store: a backbone manifest, an optional hypernetwork and benchmark.

Registration runs where torch is (a worker, ``vitedit serve``): it records what the torch-free API
needs to validate requests (class names, the editors and their options) in the model's entry.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from models.errors import EditConfigError, UnknownMethodError, quoted
from models.store.manifest import BackboneManifest, MethodInfo, ModelEntry, sha256_file, utc_now
from models.store.store import Store

log = logging.getLogger(__name__)

DEFAULT_METHOD = "where2edit"  # with a hypernetwork
# without one: the training-free gradient mask, whose demo-benchmark front matches where2edit's
# (README, "Does the learned mask help?"), where plain or L2-penalised fine-tuning loses 4-6 LR points
FALLBACK_METHOD = "saliency"
# a backbone manifest may set these; rho where a tuning half showed another density better than the
# paper's 0.1 on both axes (scripts/choose_default_rho.py)
SHARED_DEFAULTS = ("lr", "max_steps", "stop_loss", "rho")


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def editor_infos(defaults: dict[str, Any] | None = None) -> dict[str, MethodInfo]:
    """Every registered editor with its options, their defaults for this model and their bounds
    (the spec the API validates requests against).

    ``defaults`` (the backbone manifest's ``extra.edit_defaults``: lr, max_steps, stop_loss and
    rho measured for this backbone) override the editors' own defaults of the same name.
    """
    import models.editing  # noqa: F401  (registers the editors)
    from models.editing.registry import EDITORS

    defaults = defaults or {}
    for ed in EDITORS.values():  # a default out of an option's bounds would fail every edit
        for name, b in ed.config_cls.bounds().items():
            if name in defaults:
                try:
                    b.check(name, defaults[name])
                except EditConfigError as exc:
                    raise EditConfigError(
                        f"the backbone manifest's extra.edit_defaults: {exc}"
                    ) from None
    return {
        name: MethodInfo(
            options={
                f.name: _jsonable(defaults.get(f.name, f.default))
                for f in dataclasses.fields(ed.config_cls)
            },
            needs_hypernetwork=ed.needs_hypernetwork,
            description=ed.description,
            bounds={k: b.to_json() for k, b in ed.config_cls.bounds().items()},
        )
        for name, ed in sorted(EDITORS.items())
    }


def _backbone_identity(manifest: BackboneManifest) -> tuple[str, int]:
    """(weights sha256, number of classes), loading the model only when the manifest can't say."""
    num_classes = manifest.overrides.get("num_classes")
    if manifest.weights_path is not None and num_classes is not None:
        sha = sha256_file(manifest.weights_path)
        manifest.check_weights_sha256(sha)
        return sha, int(num_classes)
    from models.backbones import load_backbone

    backbone = load_backbone(manifest)
    return backbone.weights_sha256, backbone.num_classes


def model_methods(
    manifest: BackboneManifest, has_hypernetwork: bool, default_method: str | None
) -> tuple[dict[str, MethodInfo], str]:
    """The editors a model's entry lists, with the manifest's measured defaults, and its default
    method; EditConfigError or UnknownMethodError (422) for what no edit could run with. Checked
    before a model's files are written, and again when its entry is."""
    measured = manifest.extra.get("edit_defaults") or {}
    if not isinstance(measured, dict):
        raise EditConfigError("the backbone manifest's extra.edit_defaults must be a JSON object")
    methods = editor_infos({k: v for k, v in measured.items() if k in SHARED_DEFAULTS})
    default = default_method or (DEFAULT_METHOD if has_hypernetwork else FALLBACK_METHOD)
    if default not in methods:
        raise UnknownMethodError(
            f"default method {quoted(default)} is not registered; choose one of {sorted(methods)}"
        )
    if methods[default].needs_hypernetwork and not has_hypernetwork:
        raise EditConfigError(f"default method {default!r} needs a hypernetwork")
    return methods, default


def register_model(
    store: Store,
    name: str,
    backbone: Path,
    *,
    hypernetwork: Path | None = None,
    benchmark: dict[str, Any] | None = None,
    default_method: str | None = None,
    blocks: tuple[int, ...] | None = None,
    relative_to: Path | None = None,
) -> ModelEntry:
    """Write (or replace) the entry of model ``name`` in the store's registry.

    With ``relative_to`` (the store root) the files are recorded as keys relative to it, which
    every host resolves against its own mount of the store (:meth:`Store._resolve`)."""
    manifest = BackboneManifest.read(backbone)
    sha, num_classes = _backbone_identity(manifest)
    hypernetwork_id = None
    if hypernetwork is not None:
        from models.hypernet.network import check_compatible, read_manifest

        hyper = read_manifest(hypernetwork)
        check_compatible(hyper, sha, None)
        hypernetwork_id = hyper["weights_sha256"]
    methods, default = model_methods(manifest, hypernetwork is not None, default_method)
    classes = manifest.class_names or tuple(str(i) for i in range(num_classes))

    def key(path: Path) -> str:
        full = Path(path).resolve()
        return full.relative_to(relative_to.resolve()).as_posix() if relative_to else str(full)

    entry = ModelEntry(
        name=name,
        backbone=key(backbone),
        weights_sha256=sha,
        num_classes=num_classes,
        class_names=tuple(classes),
        default_method=default,
        methods=methods,
        hypernetwork=key(hypernetwork) if hypernetwork else None,
        hypernetwork_id=hypernetwork_id,
        benchmark=benchmark or {},
        blocks=blocks,
        registered_at=utc_now(),
        backbone_name=manifest.name,
        timm_name=manifest.timm_name,
    )
    store.register_model(entry)
    log.info(
        "registered model %s (backbone %s, default method %s, hypernetwork %s)",
        name,
        manifest.name,
        default,
        hypernetwork_id[:12] if hypernetwork_id else None,
    )
    return entry


DEMO_MODEL = "demo-vit"
DEMO_BENCH_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "results.json"
"""The demo backbone's measured benchmark (README): the fronts its review pages draw."""


def register_demo(store: Store) -> ModelEntry:
    """Register the shipped demo backbone (+ hypernetwork and benchmark when shipped) as demo-vit.

    Until the demo backbone is shipped, a deterministic random-init stand-in is registered, so the
    service can be developed and tested end to end (its edits are meaningless).
    """
    from models.errors import HypernetworkMismatchError
    from models.hypernet.network import DEMO_DIR, MANIFEST_FILE
    from models.worlds import demo as demo_world

    if not demo_world.BACKBONE_MANIFEST.is_file():
        log.warning("the demo backbone is not shipped yet: registering a random-init stand-in")
        backbone = _random_demo_backbone(store.root / "backbones" / "demo-vit-random")
        return register_model(store, DEMO_MODEL, backbone)
    benchmark = {"kind": "demo"} if demo_world.WORLD_FILE.is_file() else {}
    if benchmark and DEMO_BENCH_RESULTS.is_file():
        benchmark["results"] = str(DEMO_BENCH_RESULTS)  # checked against the weights' sha256
    hypernetwork = DEMO_DIR if (DEMO_DIR / MANIFEST_FILE).is_file() else None
    try:
        return register_model(
            store,
            DEMO_MODEL,
            demo_world.BACKBONE_MANIFEST,
            hypernetwork=hypernetwork,
            benchmark=benchmark,
        )
    except HypernetworkMismatchError as exc:
        log.warning(
            "the shipped demo hypernetwork does not fit the demo backbone (%s); "
            "registering demo-vit without it",
            exc,
        )
        return register_model(store, DEMO_MODEL, demo_world.BACKBONE_MANIFEST, benchmark=benchmark)


def _random_demo_backbone(folder: Path) -> Path:
    """Write seed-0 random weights of the demo architecture once; returns the manifest path."""
    import torch
    from safetensors.torch import save_file

    from models.backbones import create_model
    from models.worlds.demo import demo_manifest

    path = folder / "backbone.json"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(demo_manifest(weights=None))
    weights = folder / "backbone.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(weights),
        metadata={"note": "random init stand-in for the demo backbone"},
    )
    manifest = demo_manifest(weights=weights.name, sha=sha256_file(weights))
    BackboneManifest(**{**manifest.__dict__, "base_dir": None}).write(path)
    return path


WORLD_MODELS = {"tiny-imagenet": "tiny-imagenet-vit"}  # built-in worlds served next to demo-vit


def register_world(store: Store, world: str) -> ModelEntry:
    """Register a built-in world's shipped backbone (+ hypernetwork when shipped, + benchmark)."""
    from models.hypernet.network import MANIFEST_FILE
    from models.worlds.catalog import get_world

    found = get_world(world)
    hypernetwork = found.hypernet_dir if (found.hypernet_dir / MANIFEST_FILE).is_file() else None
    benchmark: dict[str, Any] = {"kind": "world", "world": world}
    results = DEMO_BENCH_RESULTS.parent / world / "results.json"  # its measured front, if any
    if results.is_file():
        benchmark["results"] = str(results)  # checked against the weights' sha256 when read
    return register_model(
        store,
        WORLD_MODELS[world],
        found.assets / "backbone.json",
        hypernetwork=hypernetwork,
        benchmark=benchmark,
    )


def register_builtin(store: Store) -> list[ModelEntry]:
    """demo-vit, and every other built-in world whose assets are shipped."""
    from models.worlds.catalog import WORLDS

    entries = [register_demo(store)]
    entries += [register_world(store, w) for w in WORLD_MODELS if WORLDS[w].available]
    return entries
