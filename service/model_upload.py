"""Checks of a model registration request (``POST /v1/models``), torch-free.

The API checks what it can without loading anything - the manifests are JSON of the expected
fields, the weights are safetensors (an 8-byte header length, a JSON header of tensors and
offsets that fit the file: a pickled checkpoint fails here and is never opened), the benchmark is
a zip whose members stay inside their folder, of which only the images are unpacked - and
streams the files into a fresh upload folder of the store. Loading the backbone (timm name,
shapes, sha256, finite weights), the hypernetwork against it and the benchmark's images is the
worker's part (``workers.model_files.add_model``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import UploadFile

from models.errors import DataError, ManifestError, TooLarge, quoted
from models.images import IMAGE_SUFFIXES
from models.store.manifest import BackboneManifest
from models.worlds.layout import MAX_SERVED_IMAGES

MANIFEST_MAX_BYTES = 1 << 20
SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors format's own limit on its JSON header
ZIP_MAX_MEMBERS = 50_000
CHUNK = 1 << 20

BACKBONE_MANIFEST, BACKBONE_WEIGHTS = "backbone.json", "backbone.safetensors"
HYPERNET_MANIFEST, HYPERNET_WEIGHTS = "hypernet.json", "hypernet.safetensors"  # = models.hypernet
HYPERNET_ANCHORS = "spill-anchors.safetensors"  # a --spill-input network's clean anchors


@dataclass(frozen=True)
class ModelFiles:
    """Where the checked files were written, relative to the store root."""

    backbone: str
    hypernetwork: str | None
    groups: str | None
    locality: str | None


def _read_json(upload: UploadFile, what: str) -> dict[str, Any]:
    data = upload.file.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise TooLarge(f"the {what} is larger than {MANIFEST_MAX_BYTES} bytes: it should be JSON")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # Recursion: nested too deep
        raise DataError(f"the {what} is not JSON ({exc}); send the .json file") from None
    if not isinstance(value, dict):
        raise DataError(f"the {what} must be a JSON object, not {type(value).__name__}")
    return value


def check_backbone_manifest(upload: UploadFile) -> dict[str, Any]:
    """The manifest as JSON, its ``weights`` pointing at the uploaded file beside it."""
    data = _read_json(upload, "backbone manifest")
    if data.get("pretrained"):
        raise DataError(
            'the manifest says "pretrained": true, but the store holds the weights itself: '
            'upload them as "weights" (a .safetensors file) and drop "pretrained"'
        )
    data = {**data, "weights": BACKBONE_WEIGHTS}
    try:
        BackboneManifest.from_json(data)
    except (ManifestError, TypeError) as exc:
        raise DataError(f"the backbone manifest is not valid: {exc}") from None
    return data


def copy_safetensors(upload: UploadFile, dest: Path, limit: int, what: str) -> str:
    """Stream a safetensors upload to ``dest`` (at most ``limit`` bytes); its header is checked
    first. Returns its sha256."""
    head = upload.file.read(8)
    if len(head) < 8:
        raise DataError(f"the {what} is empty or truncated: send a .safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > SAFETENSORS_HEADER_MAX or n > limit:
        raise DataError(
            f"the {what} is not a safetensors file (pickled .pt/.pth/.bin checkpoints are "
            "refused; convert with safetensors.torch.save_file(model.state_dict(), path))"
        )
    header_bytes = upload.file.read(n)
    try:
        header = json.loads(header_bytes)
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        end = max((int(b) for _, b in spans), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise DataError(
            f"the {what} is not a safetensors file (its header is not the format's JSON); "
            "pickled checkpoints are refused: convert with safetensors.torch.save_file"
        ) from None
    sha = hashlib.sha256(head + header_bytes)
    size = 8 + len(header_bytes)
    with dest.open("wb") as out:
        out.write(head + header_bytes)
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the {what} is larger than the {limit} bytes this server accepts")
            sha.update(chunk)
            out.write(chunk)
    if size != 8 + n + end:
        raise DataError(
            f"the {what} is truncated or padded: {size} bytes, its header describes {8 + n + end}"
        )
    return sha.hexdigest()


def extract_benchmark(
    upload: UploadFile, dest: Path, limit: int, image_limit: int | None = None
) -> tuple[Path, Path]:
    """Unpack a benchmark zip holding ``edit_groups/`` and ``locality/`` (the paper's layout,
    at its top or under one folder); returns their paths. Members that would land outside
    ``dest`` (absolute, ``..``), links, more than ``limit`` unpacked bytes and an image of more
    than ``image_limit`` bytes are refused. Only images (by suffix: what the layout reads) are
    unpacked: a 200 MB ``locality/junk.bin`` (or a ``__MACOSX/`` folder) is left in the zip, not
    stored with the model; the worker opens each image before the model is registered."""
    archive = dest.parent / f".{dest.name}.zip"
    with archive.open("wb") as out:
        shutil.copyfileobj(upload.file, out, CHUNK)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > ZIP_MAX_MEMBERS:
                raise TooLarge(f"the benchmark zip has over {ZIP_MAX_MEMBERS} files")
            if sum(m.file_size for m in members) > limit:
                raise TooLarge(f"the benchmark unpacks to more than {limit} bytes")
            images = sum(_is_image_member(m) for m in members)
            if images > MAX_SERVED_IMAGES:  # the worker would refuse it too, after the upload
                raise TooLarge(
                    f"the benchmark zip holds {images} images; a served model's may hold at most "
                    f"{MAX_SERVED_IMAGES} (edit groups + locality): keep the locality set to the "
                    "few hundred most sensitive images"
                )
            for m in members:
                path = PurePosixPath(m.filename)
                if path.is_absolute() or ".." in path.parts or "\\" in m.filename:
                    raise DataError(f"the benchmark zip holds {m.filename!r}: a path outside it")
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise DataError(f"the benchmark zip holds a link ({m.filename!r})")
            images_in = [m for m in members if _is_image_member(m)]
            for m in images_in:
                if image_limit is not None and m.file_size > image_limit:
                    raise TooLarge(
                        f"the benchmark image {quoted(m.filename)} is {m.file_size} bytes; each "
                        f"may be at most {image_limit} (an edit's image's limit): downscale or "
                        "recompress it"
                    )
            for m in images_in:  # the rest (notes, .DS_Store, any other file) stays in the zip
                zf.extract(m, dest)
    except zipfile.BadZipFile as exc:
        raise DataError(f"the benchmark is not a zip file ({exc})") from None
    finally:
        archive.unlink(missing_ok=True)
    roots = [dest, *(p for p in dest.iterdir() if p.is_dir())]
    for root in roots:
        if (root / "edit_groups").is_dir() and (root / "locality").is_dir():
            return root / "edit_groups", root / "locality"
    raise DataError(
        "the benchmark zip needs the folders edit_groups/<true>-<tag>/*.png and locality/*.png "
        "(the paper's layout), at its top or under one folder"
    )


def _is_image_member(member: zipfile.ZipInfo) -> bool:
    return not member.is_dir() and PurePosixPath(member.filename).suffix.lower() in IMAGE_SUFFIXES


def write_model_files(
    folder: Path,
    root: Path,
    limit: int,
    backbone: UploadFile,
    weights: UploadFile,
    hypernet: UploadFile | None,
    hypernet_weights: UploadFile | None,
    benchmark: UploadFile | None,
    hypernet_anchors: UploadFile | None = None,
    image_limit: int | None = None,
) -> ModelFiles:
    """Check every part and write it under ``folder`` (an upload folder of the store at
    ``root``); raises DataError/TooLarge with what to fix at the first problem."""
    if (hypernet is None) != (hypernet_weights is None):
        raise DataError("send the hypernetwork as both 'hypernet' (.json) and 'hypernet_weights'")
    if hypernet_anchors is not None and hypernet is None:
        raise DataError(
            "'hypernet_anchors' belongs to a hypernetwork: send 'hypernet' and its weights"
        )
    manifest = check_backbone_manifest(backbone)
    copy_safetensors(weights, folder / BACKBONE_WEIGHTS, limit, "backbone weights")
    (folder / BACKBONE_MANIFEST).write_text(json.dumps(manifest))
    hyper = None
    if hypernet is not None and hypernet_weights is not None:
        hyper = folder / "hypernet"
        hyper.mkdir()
        (hyper / HYPERNET_MANIFEST).write_text(json.dumps(_read_json(hypernet, "hypernetwork")))
        copy_safetensors(hypernet_weights, hyper / HYPERNET_WEIGHTS, limit, "hypernetwork weights")
        if hypernet_anchors is not None:  # checked against the manifest when it is loaded
            copy_safetensors(hypernet_anchors, hyper / HYPERNET_ANCHORS, limit, "spill anchors")
    groups = locality = None
    if benchmark is not None:
        groups, locality = extract_benchmark(benchmark, folder / "benchmark", limit, image_limit)

    def key(path: Path | None) -> str | None:
        return path.relative_to(root).as_posix() if path is not None else None

    return ModelFiles(key(folder / BACKBONE_MANIFEST), key(hyper), key(groups), key(locality))
