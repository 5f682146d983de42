"""``vitedit models add``: copy a model's files into the store and register them there.

The files land in ``models/<name>/base/`` of the store (backbone manifest + safetensors, an
optional hypernetwork, optional benchmark folders in the paper's layout) and the registry records
them by store-relative keys, so every worker on every host that mounts the store resolves them.
Before anything is copied the model is loaded as a worker would load it (timm name, overrides,
weights' shapes and sha256, finite weights; the hypernetwork against this backbone; the benchmark
folders readable): a model that does not load is refused here, with the reason, never later in a
worker. Only safetensors weights are accepted: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.bounds import shown
from models.errors import (
    DataError,
    IntegrityError,
    ManifestError,
    StoreError,
    VitEditError,
    quoted,
)
from models.store.manifest import BackboneManifest, ModelEntry, sha256_file
from models.store.store import Store, check_new_name
from workers.registration import model_methods, register_model

if TYPE_CHECKING:
    from models.backbones import Backbone

log = logging.getLogger(__name__)

BACKBONE_MANIFEST = "backbone.json"
BACKBONE_WEIGHTS = "backbone.safetensors"


def _their_manifest(path: Path) -> BackboneManifest:
    """A backbone manifest the user sent: what is wrong with it is theirs to fix (422)."""
    try:
        return BackboneManifest.read(path)
    except ManifestError as exc:
        raise DataError(str(exc)) from exc


def _check_loads(
    manifest: BackboneManifest,
    hypernetwork: Path | None,
    groups: Path | None,
    locality: Path | None,
) -> None:

    from models.backbones import load_backbone, non_finite

    if manifest.weights_path is None:
        raise DataError(
            "the backbone manifest names no weights file: store its safetensors next to it and "
            'set "weights" (hub weights are not copied into the store)'
        )
    try:
        backbone = load_backbone(manifest)
    except IntegrityError as exc:  # the user's files disagree with each other: a bad request
        raise DataError(
            f"{exc}; send the weights the manifest was written for, or drop its weights_sha256"
        ) from exc
    except VitEditError:
        raise
    except Exception as exc:  # timm, safetensors: say which file and why
        raise DataError(f"the backbone does not load: {type(exc).__name__}: {exc}") from exc
    bad = non_finite(backbone.model.state_dict())
    if bad:
        raise DataError(f"the backbone's weights hold NaN or inf in {bad[:5]}")
    names = manifest.class_names
    if names is not None and len(names) != backbone.num_classes:
        raise DataError(
            f"the backbone manifest names {len(names)} classes, its model has "
            f"{backbone.num_classes}: give one class name per output, in order"
        )
    _check_runs(backbone)
    if hypernetwork is not None:
        from models.hypernet.network import Hypernetwork

        try:
            Hypernetwork.load(hypernetwork, backbone)  # refuses another backbone's
        except (ManifestError, IntegrityError, OSError) as exc:  # the files sent disagree
            # its files named from its folder, not from where this host keeps the folder
            where = f"{Path(hypernetwork).parent}/"
            raise DataError(
                f"the hypernetwork does not load: {str(exc).replace(where, '')}"
            ) from exc
        except VitEditError:
            raise  # already says what to fix, with its status (another backbone's: 422)
        except Exception as exc:  # safetensors: say which file and why
            raise DataError(f"the hypernetwork does not load: {type(exc).__name__}: {exc}") from exc
    if groups is not None and locality is not None:
        from models.worlds.layout import MAX_SERVED_IMAGES, read_benchmark

        bench = read_benchmark(groups, locality, max_images=MAX_SERVED_IMAGES)
        for group in bench.groups:  # its name's class: the target of every edit it measures
            if group.label >= backbone.num_classes:
                raise DataError(
                    f"the benchmark's edit group {quoted(group.name)} names true class "
                    f"{group.label}, and the model has {backbone.num_classes} classes "
                    f"(0-{backbone.num_classes - 1}): name each group's folder by its true "
                    "class index, like '3-noise'"
                )


def _check_runs(backbone: Backbone) -> None:
    """One grey image through the eval transform and the model, as an edit would send it: a data
    config the model does not take (an input size its patch embedding refuses) fails here, not
    at the first edit."""
    import torch
    from PIL import Image

    _, height, width = backbone.data_config["input_size"]
    try:
        with torch.no_grad():
            logits = backbone.model(backbone.preprocess([Image.new("RGB", (width, height), 128)]))
    except Exception as exc:  # timm's own message says which size it expected
        raise DataError(
            f"the backbone does not run on its data config's input {height}x{width} "
            f"({type(exc).__name__}: {exc}); set pretrained_cfg_overlay.input_size in its "
            "manifest to the size the model was built for"
        ) from exc
    if tuple(logits.shape) != (1, backbone.num_classes) or not torch.isfinite(logits).all():
        raise DataError(
            f"the backbone answers one image with {tuple(logits.shape)} outputs"
            f"{'' if torch.isfinite(logits).all() else ' that are not finite'}: "
            f"a classifier of {backbone.num_classes} classes gives (1, {backbone.num_classes})"
        )


DEFINING = ("timm_name", "overrides", "pretrained_cfg_overlay", "pretrained", "class_names")
"""The backbone manifest's fields that define a model, besides its weights: the network built,
the data config that turns an image into its input, the classes its outputs name. A model with
versions keeps them on ``replace`` (its versions' patches and predictions were made on them); the
rest may change: ``name`` (display only), ``extra`` (calibrated edit defaults and their evidence,
read by later edits only), ``weights``/``weights_sha256`` (the file's name; its content is compared
by sha256), and, outside the manifest, the hypernetwork, the benchmark and the default method."""


def _defining_changes(store: Store, name: str, new: BackboneManifest) -> list[str]:
    """What ``new`` changes of :data:`DEFINING` against model ``name``'s registered manifest, one
    line per field. A registered manifest that no longer reads is compared by what its entry
    records (timm name, class names)."""
    entry = store.model(name)
    try:
        store.fetch_model_files(name)
        old: Any = BackboneManifest.read(Path(entry.backbone))
    except (ManifestError, OSError) as exc:
        log.warning("model %s: its registered backbone manifest does not read (%s)", name, exc)
        classes = new.class_names or tuple(str(i) for i in range(entry.num_classes))
        fields = {"timm_name": (entry.timm_name, new.timm_name)}
        fields["class_names"] = (entry.class_names, tuple(classes))
    else:
        fields = {f: (getattr(old, f), getattr(new, f)) for f in DEFINING}
    return [
        f"{field}: {shown(_plain(was), 80)} -> {shown(_plain(now), 80)}"
        for field, (was, now) in fields.items()
        if _plain(was) != _plain(now)
    ]


def _plain(value: Any) -> Any:
    """A manifest value as JSON has it (tuples as lists), for comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def add_model(store: Store, name: str, backbone: Path, **options: Any) -> ModelEntry:
    """Check, copy and register model ``name``; returns its entry (paths resolved). One
    registration of a name at a time (``Store.registering``): a second waits, then finds the
    name taken (or replaces it with ``replace``).

    Options: ``hypernetwork``, ``groups`` and ``locality`` (paths), ``default_method``,
    ``replace``, and ``calibrate(manifest, groups, locality)``, which runs on the staged copies
    before anything is published and may write the measured settings into the staged manifest.
    """
    check_new_name(name, "model")  # before any file moves: not reserved, not a version id's shape
    with store.registering(name):
        return _add_model(store, name, backbone, **options)


def _add_model(
    store: Store,
    name: str,
    backbone: Path,
    *,
    hypernetwork: Path | None = None,
    groups: Path | None = None,
    locality: Path | None = None,
    default_method: str | None = None,
    replace: bool = False,
    calibrate: Callable[[Path, Path, Path], None] | None = None,
) -> ModelEntry:
    if (groups is None) != (locality is None):
        raise DataError("give the benchmark's --groups and --locality together (paper layout)")
    if calibrate is not None and groups is None:
        raise DataError(
            "calibration needs the benchmark (--groups and --locality): it is "
            "measured on their tuning half"
        )
    if not replace and any(m.name == name for m in store.models()):
        raise StoreError(f"model {name!r} is registered: pass --replace to replace its files")
    manifest = _their_manifest(backbone)
    model_methods(manifest, hypernetwork is not None, default_method)  # before any file moves
    _check_loads(manifest, hypernetwork, groups, locality)
    registered = any(m.name == name for m in store.models())  # and so --replace was given
    new_weights = (
        registered and sha256_file(manifest.weights_path) != store.model(name).weights_sha256
    )
    if registered and store.versions(name):
        if new_weights:
            raise StoreError(
                f"model {name!r} has versions over other base weights: add this backbone under "
                "a new name"
            )
        changed = _defining_changes(store, name, manifest)
        if changed:
            raise StoreError(
                f"model {name!r} has versions, and this backbone manifest changes what defines "
                f"the model they were made on ({'; '.join(changed)}): versions are immutable. "
                "Keep those fields as registered, or add this backbone under a new name"
            )

    staging = store.root / "tmp" / f"add-{name}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    final = store.model_files(name)
    replaced = None  # the files the registry names until the new entry is written
    moved = False
    try:
        shutil.copyfile(manifest.weights_path, staging / BACKBONE_WEIGHTS)
        copied = {**manifest.__dict__, "weights": BACKBONE_WEIGHTS, "base_dir": None}
        BackboneManifest(**copied).write(staging / BACKBONE_MANIFEST)
        if hypernetwork is not None:
            from models.hypernet.network import ANCHORS_FILE, MANIFEST_FILE, WEIGHTS_FILE

            (staging / "hypernet").mkdir()
            for file in (MANIFEST_FILE, WEIGHTS_FILE, ANCHORS_FILE):  # anchors: --spill-input
                if file != ANCHORS_FILE or (Path(hypernetwork) / file).is_file():
                    shutil.copyfile(Path(hypernetwork) / file, staging / "hypernet" / file)
        if groups is not None and locality is not None:
            _copy_images(groups, staging / "benchmark" / "edit_groups")
            _copy_images(locality, staging / "benchmark" / "locality")
        if calibrate is not None:
            bench = staging / "benchmark"
            calibrate(staging / BACKBONE_MANIFEST, bench / "edit_groups", bench / "locality")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            replaced = store.root / "tmp" / f"replaced-{name}-{secrets.token_hex(4)}"
            os.rename(final, replaced)
        os.rename(staging, final)
        moved = True
        store.publish_model_files(name)  # an S3 store: the files go up before the entry
        key = final.relative_to(store.root).as_posix()
        benchmark = (
            {
                "kind": "folders",
                "groups": f"{key}/benchmark/edit_groups",
                "locality": f"{key}/benchmark/locality",
            }
            if groups is not None
            else None
        )
        register_model(
            store,
            name,
            final / BACKBONE_MANIFEST,
            hypernetwork=final / "hypernet" if hypernetwork is not None else None,
            benchmark=benchmark,
            default_method=default_method,
            relative_to=store.root,
        )
    except BaseException:
        _put_back(store, name, staging, replaced, moved)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    log.info("added model %s: files in %s", name, final)
    return store.model(name)


def _copy_images(source: Path, dest: Path) -> None:
    """The images under ``source`` (those the benchmark's reader reads, each opened before),
    copied to ``dest`` at the same relative paths: any other file of the folder (a 200 MB
    ``junk.bin``, notes, ``.DS_Store``) is not stored with the model."""
    from models.images import list_images

    dest.mkdir(parents=True)
    for image in list_images(Path(source)):
        target = dest / image.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)


def _put_back(store: Store, name: str, staging: Path, replaced: Path | None, moved: bool) -> None:
    """A registration that failed while its files were staged or moved in, or after (the
    registry write refused, say a version of the old weights published meanwhile, or the
    registry unreachable): the model's folder goes back to the files its entry still names, the
    replaced ones or none, here and in the bucket, so no entry points at weights it was not
    written for."""
    final = store.model_files(name)
    if moved:
        failed = store.root / "tmp" / f"failed-{name}-{secrets.token_hex(4)}"
        os.rename(final, failed)
        shutil.rmtree(failed, ignore_errors=True)
    else:
        shutil.rmtree(staging, ignore_errors=True)
    if replaced is not None and replaced.exists():
        os.rename(replaced, final)
    else:
        with contextlib.suppress(OSError):  # a new model's folder, if nothing else is in it
            final.parent.rmdir()
    if not moved:
        return  # the bucket was not touched
    try:
        store.publish_model_files(name)  # the bucket mirrors the folder again (none: deleted)
    except Exception:
        log.exception(
            "model %s: could not put its former files back in the bucket; run `vitedit models "
            "add --replace` again with the files its entry names",
            name,
        )


def _symlinks(folder: Path) -> list[str]:
    """The symbolic links under ``folder`` (not followed), relative to it."""
    found = []
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(here, name)):
                found.append(os.path.relpath(os.path.join(here, name), folder))
    return sorted(found)


def source_files(store: Store, source: str) -> dict[str, Path | None]:
    """The files of a store folder under ``incoming/`` in the layout of an upload (backbone.json
    and its weights, optional hypernet/ and benchmark/{edit_groups,locality}/), brought into the
    local folder, as :func:`add_model`'s arguments. Refused: weights named outside the folder
    (another model's, or out of the store), hub weights, half a benchmark."""
    folder = store.source_folder(source)
    manifest_path = folder / BACKBONE_MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"the store has no {store.source_key(source)}/{BACKBONE_MANIFEST}")
    links = _symlinks(folder)
    if links:  # the copy would follow them: another model's images, or any file of the host
        raise DataError(
            f"{store.source_key(source)} holds symbolic links ({', '.join(links[:3])}): put the "
            "files themselves in the source folder"
        )
    manifest = _their_manifest(manifest_path)
    if manifest.pretrained:
        raise DataError(
            "the backbone manifest asks for pretrained (hub) weights: workers never download; "
            "put the weights in the source folder and name them in 'weights'"
        )
    weights = manifest.weights_path
    if weights is None or not weights.resolve().is_relative_to(folder.resolve()):
        raise DataError(
            f"the backbone manifest of {source} names weights {manifest.weights!r}: put them in "
            "the source folder and name them by a path relative to the manifest"
        )

    def present(path: Path) -> Path | None:
        return path if path.exists() else None

    groups = present(folder / "benchmark" / "edit_groups")
    locality = present(folder / "benchmark" / "locality")
    if (groups is None) != (locality is None):
        raise DataError(
            "a source's benchmark needs both benchmark/edit_groups/ and benchmark/locality/"
        )
    return {
        "backbone": manifest_path,
        "hypernetwork": present(folder / "hypernet"),
        "groups": groups,
        "locality": locality,
    }
