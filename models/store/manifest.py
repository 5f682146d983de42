"""Manifests: small JSON files that make every artifact self-describing. Torch-free.

The API process reads these (never the tensors), so this module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import DataError, IntegrityError, ManifestError, quoted

BACKBONE_SCHEMA = 1
# the largest JSON file read: the project's own are at most a few hundred KB (bench results), so
# a larger one is not one of them, and a device such as /dev/zero would otherwise be read forever
MAX_JSON_BYTES = 64 * 1024 * 1024

DEFAULT_TENANT = "default"
"""The tenant of a server without API keys, of plain keys (no ``tenant:`` prefix), and the owner
of versions stored before tenants existed (their manifests name no owner)."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path``, fsync, then rename over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; manifests are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning every failure into a ManifestError that names the file."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a device, a FIFO, a socket
        raise ManifestError(f"manifest {path} is not a regular file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ManifestError(
                f"manifest {path} is larger than {MAX_JSON_BYTES // 2**20} MiB: not a JSON file "
                "this project writes"
            )
        data = json.loads(raw.decode())
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {path} does not exist") from exc
    # ValueError: not JSON, a binary file (UnicodeDecodeError) or an integer of more digits than
    # int() takes; RecursionError: arrays or objects nested too deep
    except (OSError, ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path} must hold a JSON object")
    return data


# timm.create_model's own keyword arguments: they say where weights come from (checkpoint_path
# is read with torch.load, an unpickler), not what the model is, so overrides may not carry them;
# pretrained and pretrained_cfg_overlay are manifest fields of their own.
LOADER_ARGUMENTS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "scriptable",
        "exportable",
        "no_jit",
    }
)


INDEX_LABEL = re.compile(r"-?[0-9]+")
"""A label that is a class index (ASCII digits only: ``str.isdigit`` and ``int`` also take other
scripts' digits, so ``label=\u0660``, an Arabic-Indic zero, was class 0); any other label is a
class name."""


def _check_class_names(names: tuple[str, ...]) -> None:
    """ManifestError unless every class can be chosen by its name and only by it: two names equal
    but for case (labels match names case-insensitively, so ``label=Cat`` chose 'cat'), or a
    name of digits that is not its own index (``label=7`` means class index 7, so a class named
    '7' elsewhere could not be chosen by name). Digit names at their own index are the default
    names ('0', '1', ... of a manifest without class_names) and stay allowed."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = name.strip().casefold()  # as ModelEntry.label_index matches a label
        if key in seen:
            raise ManifestError(
                f"a backbone manifest's 'class_names' differ only by case: "
                f"{quoted(names[seen[key]])} (class {seen[key]}) and {quoted(name)} (class {i}); "
                "a label names a class case-insensitively: rename one of them"
            )
        seen[key] = i
        text = name.strip()
        if INDEX_LABEL.fullmatch(text) and (len(text) > 20 or int(text) != i):
            raise ManifestError(
                f"a backbone manifest's class {i} is named {quoted(name)}, which as a label is a "
                "class index: a class named by digits must be its own index (as the default "
                "names '0', '1', ... are); rename it (e.g. 'class-7')"
            )


@dataclass(frozen=True)
class BackboneManifest:
    """What it takes to rebuild a backbone: timm name, constructor overrides and weights.

    ``weights`` is a path to a safetensors file, relative to the manifest's folder when read from
    disk; ``None`` with ``pretrained=True`` means "let timm fetch the hub weights". ``overrides``
    are the model constructor's arguments only (not :data:`LOADER_ARGUMENTS`).
    """

    name: str
    timm_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg_overlay: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_sha256: str | None = None
    pretrained: bool = False
    class_names: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    base_dir: str | None = None  # folder the manifest was read from (not serialised)

    def __post_init__(self) -> None:
        for what in ("name", "timm_name"):
            if not isinstance(getattr(self, what), str) or not getattr(self, what):
                raise ManifestError(f"a backbone manifest's {what!r} must be a non-empty string")
        for what in ("weights", "weights_sha256"):
            if getattr(self, what) is not None and not isinstance(getattr(self, what), str):
                raise ManifestError(f"a backbone manifest's {what!r} must be a string or null")
        if not isinstance(self.pretrained, bool):
            raise ManifestError("a backbone manifest's 'pretrained' must be true or false")
        if not isinstance(self.extra, dict):
            raise ManifestError("a backbone manifest's 'extra' must be a JSON object")
        if self.class_names is not None:
            names = self.class_names
            if not all(isinstance(n, str) and n.strip() for n in names):
                raise ManifestError(
                    "a backbone manifest's 'class_names' must be non-empty strings, one per class"
                )
            twice = sorted(n for n, k in Counter(names).items() if k > 1)
            if twice:  # a label given by name must name one class
                raise ManifestError(
                    f"a backbone manifest's 'class_names' name classes twice: "
                    f"[{', '.join(quoted(n) for n in twice[:5])}]"
                )
            _check_class_names(names)
        for what in ("overrides", "pretrained_cfg_overlay"):
            value = getattr(self, what)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ManifestError(f"a backbone manifest's {what!r} must be a JSON object")
        loaders = sorted(LOADER_ARGUMENTS.intersection(self.overrides))
        if loaders:
            raise ManifestError(
                f"a backbone manifest's overrides may not set {loaders}: they are how timm "
                "loads weights, not what the model is; name the weights in 'weights' "
                "(a .safetensors file)"
            )

    @property
    def weights_path(self) -> Path | None:
        if self.weights is None:
            return None
        path = Path(self.weights)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path

    def check_weights_sha256(self, actual: str) -> None:
        if self.weights_sha256 and self.weights_sha256 != actual:
            raise IntegrityError(
                f"weights of backbone {self.name!r} have sha256 {actual[:16]}..., the manifest "
                f"says {self.weights_sha256[:16]}...: the file was changed or corrupted"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("base_dir")
        data["schema"] = BACKBONE_SCHEMA
        data["class_names"] = list(self.class_names) if self.class_names else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], base_dir: Path | None = None) -> BackboneManifest:
        data = dict(data)
        _pop_schema(data, BACKBONE_SCHEMA, "backbone manifest", default=BACKBONE_SCHEMA)
        if "timm_name" not in data or "name" not in data:
            raise ManifestError("a backbone manifest needs at least 'name' and 'timm_name'")
        unknown = set(data) - {f for f in cls.__dataclass_fields__ if f != "base_dir"}
        if unknown:
            raise ManifestError(f"unknown backbone manifest fields: {sorted(unknown)}")
        if data.get("class_names") is not None:
            if not isinstance(data["class_names"], list):
                raise ManifestError("a backbone manifest's 'class_names' must be a list of strings")
            data["class_names"] = tuple(data["class_names"])
        return cls(**data, base_dir=str(base_dir) if base_dir else None)

    @classmethod
    def read(cls, path: Path | str) -> BackboneManifest:
        path = Path(path)
        return cls.from_json(read_json(path), base_dir=path.parent)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())


# --------------------------------------------------------------------------- versions and models

VERSION_SCHEMA = 1
MODEL_SCHEMA = 1
_SAFETENSORS_MAX_HEADER = 100 << 20


def utc_now() -> str:
    """The current UTC time as ISO 8601, e.g. ``2026-11-22T01:50:00.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata) of a safetensors file, torch-free.

    The format is an 8-byte little-endian header length, then that many bytes of JSON.
    """
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= _SAFETENSORS_MAX_HEADER:
                raise ManifestError(f"{path}: not a safetensors file (header length {size})")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


@dataclass(frozen=True)
class ImageRecord:
    """An image stored with a version: ``role`` is ``edit`` (edited) or ``holdout`` (GR only)."""

    file: str  # path relative to the version folder, e.g. "images/edit-000.png"
    target: int
    role: str = "edit"


@dataclass(frozen=True)
class VersionManifest:
    """One immutable version: a cumulative sparse patch over the model's base backbone.

    ``patch.safetensors`` holds every neuron the lineage changed (root to this version), with
    absolute values, so applying it to a fresh base backbone gives this version. ``parent`` links
    the lineage; ``files`` maps every file of the version folder to its sha256.
    """

    version: str
    model: str
    parent: str | None
    backbone: dict[str, Any]  # name, timm_name, weights_sha256
    method: str
    config: dict[str, Any]
    hypernetwork: str | None
    sites: dict[str, Any]  # Sites.to_json()
    patch: list[dict[str, Any]]  # [{name, shape, dtype}] of the tensors in patch.safetensors
    files: dict[str, str]
    images: list[ImageRecord]
    report: dict[str, Any]
    created_at: str
    code_version: str
    job_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # "accepted", or "rejected": the edit missed the request's acceptance gate (``reason`` says
    # how); a rejected version is kept for inspection but never gets an alias, not even latest
    status: str = "accepted"
    reason: str | None = None
    # the tenant whose job made this version: only that tenant sees it (service/tenants.py)
    owner: str = DEFAULT_TENANT
    # the review page's figures (files under review/, in ``files`` with their sha256) and the
    # numbers it shows (models.review.write_review); {} for versions stored before it existed
    review: dict[str, Any] = field(default_factory=dict)

    @property
    def edit_images(self) -> list[ImageRecord]:
        return [im for im in self.images if im.role == "edit"]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = VERSION_SCHEMA
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionManifest:
        data = dict(data)
        _pop_schema(data, VERSION_SCHEMA, "version manifest")
        _check_fields(cls, data, "version")
        data["images"] = [ImageRecord(**im) for im in data.get("images", [])]
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> VersionManifest:
        return cls.from_json(read_json(path))


@dataclass(frozen=True)
class MethodInfo:
    """What the API needs to validate an edit request without importing the editors."""

    options: dict[str, Any]  # option name -> default value
    needs_hypernetwork: bool = False
    description: str = ""
    bounds: dict[str, Any] = field(default_factory=dict)  # option -> models.bounds.Bound JSON


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: a base backbone plus what the service needs to edit and report on it.

    ``benchmark`` says where the report's locality set and benchmark groups come from:
    ``{"kind": "demo"}`` (the shipped demo world), ``{"kind": "folders", "groups": DIR,
    "locality": DIR}`` (the paper's layout) or ``{}`` (none: the report leaves LR and GR out).
    An optional ``"results"``: a ``vitedit bench`` results.json measured on these base weights,
    whose fronts the review page draws each edit against (models.review.read_front).
    """

    name: str
    backbone: str  # path of the backbone manifest (JSON)
    weights_sha256: str
    num_classes: int
    class_names: tuple[str, ...]
    default_method: str
    methods: dict[str, MethodInfo]
    hypernetwork: str | None = None  # folder of the hypernetwork (safetensors + manifest)
    hypernetwork_id: str | None = None
    benchmark: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[int, ...] | None = None  # editable blocks; None = the default sites
    registered_at: str = ""
    backbone_name: str = ""  # copied from the backbone manifest, for readers without its folder
    timm_name: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = MODEL_SCHEMA
        data["class_names"] = list(self.class_names)
        data["blocks"] = list(self.blocks) if self.blocks is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEntry:
        data = dict(data)
        _pop_schema(data, MODEL_SCHEMA, "model entry")
        _check_fields(cls, data, "model entry")
        data["class_names"] = tuple(data["class_names"])
        data["methods"] = {k: MethodInfo(**v) for k, v in data["methods"].items()}
        if data.get("blocks") is not None:
            data["blocks"] = tuple(data["blocks"])
        return cls(**data)

    def backbone_manifest(self) -> BackboneManifest:
        return BackboneManifest.read(self.backbone)

    def label_index(self, label: str | int) -> int:
        """A class index from an index (ASCII digits) or a class name (its exact name first,
        then case-insensitively); DataError if unknown."""
        text = str(label).strip()
        shown = quoted(text)
        if INDEX_LABEL.fullmatch(text):
            # more digits than any class count has: out of range (int() of a few thousand
            # digits raises, and costs time on more)
            index = int(text) if len(text) <= 20 else None
            if index is not None and 0 <= index < self.num_classes:
                return index
            raise DataError(
                f"label {text if len(text) <= 20 else shown} is out of range: model {self.name!r} "
                f"has classes "
                f"0..{self.num_classes - 1}"
            )
        exact = {name.strip(): i for i, name in enumerate(self.class_names)}
        if text in exact:  # 'Cat' is 'Cat', even in an entry registered with 'cat' beside it
            return exact[text]
        folded = {name.strip().casefold(): i for i, name in enumerate(self.class_names)}
        if text.casefold() in folded:
            return folded[text.casefold()]
        rest = len(self.class_names) - 20
        more = f" (and {rest} more: GET /v1/models/{self.name})" if rest > 0 else ""
        raise DataError(
            f"unknown label {shown} for model {self.name!r}; use a class index "
            f"0..{self.num_classes - 1} or one of {list(self.class_names[:20])}{more}"
        )


def _pop_schema(data: dict[str, Any], want: int, what: str, default: int | None = None) -> None:
    """Remove ``data["schema"]`` (``default`` when absent); refuse any other schema."""
    schema = data.pop("schema", default)
    if schema != want:
        raise ManifestError(f"{what} schema {schema} is not supported (want {want})")


def _check_fields(cls: type, data: dict[str, Any], what: str) -> None:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"unknown {what} manifest fields: {unknown}")
    required = [
        n
        for n, f in cls.__dataclass_fields__.items()
        if f.default is MISSING and f.default_factory is MISSING and n not in data
    ]
    if required:
        raise ManifestError(f"{what} manifest lacks fields {required}")
