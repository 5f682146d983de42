"""A version being written: assembled in ``tmp/``, published in one step. Torch-free."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import StoreError, StoreWriteError, UnknownModelError
from models.store.files import fsync_dir, fsync_tree
from models.store.manifest import (
    VersionManifest,
    read_safetensors_header,
    sha256_file,
    write_json_atomic,
)

if TYPE_CHECKING:
    from models.store.store import Store

log = logging.getLogger(__name__)

PATCH_FILE = "patch.safetensors"
MANIFEST_FILE = "manifest.json"
REJECTED = "rejected"  # a version stored for inspection that missed its acceptance gate


def refuse_rejected_parent(manifest: VersionManifest) -> None:
    """A rejected version is never the parent of an edit: its child would carry the damage the
    gate refused (measured against it, a child's LR_vs_parent hides it) into ``latest`` and an
    alias. StoreError (422) saying why it was rejected, if recorded."""
    if manifest.status != REJECTED:
        return
    why = f" ({manifest.reason})" if manifest.reason else ""
    raise StoreError(
        f"version {manifest.version} of {manifest.model} was rejected by its acceptance "
        f"gate{why}: it cannot be the parent of an edit. Edit from an accepted version "
        f"({manifest.model}@latest, an alias, or an accepted version id)"
    )


def write_failed(exc: Exception) -> StoreWriteError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    return StoreWriteError(
        f"the model store could not be written ({reason}{where}); nothing was published. "
        "Free disk space or fix the store's permissions, then resend the edit"
    )


class VersionDraft:
    """A version being written in ``tmp/``; :meth:`commit` makes it visible in one rename."""

    def __init__(self, store: Store, model: str, version: str) -> None:
        self.store, self.model, self.version = store, model, version
        self.dir = store.root / "tmp" / f"{version}.{secrets.token_hex(4)}"
        self.dir.mkdir(parents=True)
        self.committed: VersionManifest | None = None

    def commit(self, manifest: VersionManifest) -> VersionManifest:
        """Hash every file, write the manifest, fsync, rename into place. Never overwrites."""
        if manifest.version != self.version or manifest.model != self.model:
            raise StoreError("the manifest names another version than the draft")
        # the model may have been removed, or registered again over other weights, while the
        # edit ran: a version must never land beside a base it was not made on
        try:
            entry = self.store.model(self.model)
        except UnknownModelError:
            raise StoreError(
                f"model {self.model!r} was removed while this edit ran: nothing was published"
            ) from None
        made_on = manifest.backbone.get("weights_sha256")
        if made_on is not None and made_on != entry.weights_sha256:
            raise StoreError(
                f"model {self.model!r} was registered again over other base weights while this "
                "edit ran: nothing was published; send the edit again"
            )
        if manifest.parent is not None:  # the parent must exist, and be the same tenant's
            parent = self.store.version(self.model, manifest.parent)
            if parent.owner != manifest.owner:
                raise StoreError(
                    f"version {manifest.parent} belongs to another tenant: it cannot be a parent"
                )
            refuse_rejected_parent(parent)  # checked by the API too; never rely on it alone
        files = {
            p.relative_to(self.dir).as_posix(): sha256_file(p)
            for p in sorted(self.dir.rglob("*"))
            if p.is_file()
        }
        if PATCH_FILE not in files:
            raise StoreError(f"a version needs a {PATCH_FILE}")
        tensors, _ = read_safetensors_header(self.dir / PATCH_FILE)
        patch = [
            {"name": k, "shape": v["shape"], "dtype": v["dtype"]}
            for k, v in sorted(tensors.items())
        ]
        manifest = replace(manifest, files=files, patch=patch)
        write_json_atomic(self.dir / MANIFEST_FILE, manifest.to_json())
        fsync_tree(self.dir)
        final = self.store.version_dir(self.model, self.version)
        if self.store.remote is not None:  # the bucket decides; the folder is only a cache
            self._publish(final, files)
            if final.exists():  # a stale cached copy (never of a published version)
                trash = self.store.root / "tmp" / f"stale-{secrets.token_hex(4)}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise StoreError(
                f"version {self.version} of {self.model} exists: versions are immutable"
            )
        os.rename(self.dir, final)
        fsync_dir(final.parent)
        self.committed = manifest
        log.info("stored version %s of %s (%d files)", self.version, self.model, len(files))
        return manifest

    def _publish(self, final: Path, files: dict[str, str]) -> None:
        """Upload the files, then the manifest only if no such version exists: publish last."""
        remote, prefix = self.store.remote, self.store.key(final)
        assert remote is not None
        immutable = StoreError(
            f"version {self.version} of {self.model} exists: versions are immutable"
        )
        if remote.exists(f"{prefix}/{MANIFEST_FILE}"):
            raise immutable
        for name in files:
            remote.upload_file(self.dir / name, f"{prefix}/{name}")
        manifest = (self.dir / MANIFEST_FILE).read_bytes()
        if remote.put_bytes(f"{prefix}/{MANIFEST_FILE}", manifest, if_absent=True) is None:
            raise immutable

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
