"""Manifests: small JSON files that make every artifact self-describing. Torch-free.

The API process reads these (never the tensors), so this module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import IntegrityError, ManifestError

BACKBONE_SCHEMA = 1


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning every failure into a ManifestError that names the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {path} does not exist") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class BackboneManifest:
    """What it takes to rebuild a backbone: timm name, constructor overrides and weights.

    ``weights`` is a path to a safetensors file, relative to the manifest's folder when read from
    disk; ``None`` with ``pretrained=True`` means "let timm fetch the hub weights".
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
        schema = data.pop("schema", BACKBONE_SCHEMA)
        if schema != BACKBONE_SCHEMA:
            raise ManifestError(f"backbone manifest schema {schema} is not supported")
        if "timm_name" not in data or "name" not in data:
            raise ManifestError("a backbone manifest needs at least 'name' and 'timm_name'")
        unknown = set(data) - {f for f in cls.__dataclass_fields__ if f != "base_dir"}
        if unknown:
            raise ManifestError(f"unknown backbone manifest fields: {sorted(unknown)}")
        if data.get("class_names") is not None:
            data["class_names"] = tuple(data["class_names"])
        return cls(**data, base_dir=str(base_dir) if base_dir else None)

    @classmethod
    def read(cls, path: Path | str) -> BackboneManifest:
        path = Path(path)
        return cls.from_json(read_json(path), base_dir=path.parent)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())
