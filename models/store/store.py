"""The store: registered models, immutable versions, aliases, weights cache, uploads. Torch-free.

Layout under ``root`` (a local folder; every write is a temp file or folder, fsync, rename)::

    models.json                               registered models {name: ModelEntry}
    models/<model>/versions/<version>/        one immutable folder per version:
        manifest.json  patch.safetensors  images/edit-000.png ...
    models/<model>/aliases.json               {alias: version} of the default tenant
    models/<model>/aliases/<tenant>.json      {alias: version} of another tenant
    cache/<model>/<version>/model.safetensors merged weights, materialised on demand (+ model.json)
    uploads/<upload>/                         images of queued jobs
    incoming/<folder>/                        a model's files put there by a user, to register
    tmp/                                      versions being written: invisible until renamed

Shared by hosts: with an :class:`models.store.remote.S3Remote` (``VITEDIT_STORE_URL=s3://...``) the
bucket holds this same layout (but ``tmp/``) and is the truth; ``root`` becomes this process's read
cache and draft area. Reads fetch what is missing into it, writes go through to the bucket
(publish last, conditional writes for the JSON indexes: see that module).

Reading never trusts a file blindly: :meth:`Store.version_file` checks the sha256 its manifest
records. The torch side (patches, merged weights) lives in the workers; this module moves bytes.

Tenants: registered models are shared; a version belongs to the tenant whose job made it (its
manifest's ``owner``), and aliases are kept per tenant. ``Store(root).scoped(tenant)`` is what that
tenant sees: another tenant's version reads as unknown (404, its existence is not revealed), and
``latest``, listings and aliases are the tenant's own. An unscoped store (the workers) sees every
version and the default tenant's aliases.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import (
    Conflict,
    IntegrityError,
    ManifestError,
    StoreError,
    UnknownModelError,
    UnknownVersionError,
    quoted,
)
from models.store.drafts import (
    MANIFEST_FILE,
    PATCH_FILE,
    REJECTED,
    VersionDraft,
    refuse_rejected_parent,
    write_failed,
)
from models.store.files import (
    BASE,
    CACHE_MIN_IDLE_S,
    INCOMING,
    NAME_PATTERN,
    WEIGHTS_FILE,
    StoreFiles,
    check_name,
)
from models.store.manifest import (
    DEFAULT_TENANT,
    ModelEntry,
    VersionManifest,
    read_json,
    sha256_file,
    write_json_atomic,
)
from models.store.remote import S3Remote

__all__ = [  # what the rest of the code imports from here
    "BASE",
    "INCOMING",
    "MANIFEST_FILE",
    "NAME_PATTERN",
    "PATCH_FILE",
    "REJECTED",
    "WEIGHTS_FILE",
    "ModelRef",
    "Store",
    "VersionDraft",
    "check_name",
    "check_new_name",
]

log = logging.getLogger(__name__)

LATEST = "latest"  # the most recently created version (or base when there is none)
RESERVED = frozenset({BASE, LATEST})
# the shape of the ids new_version_id makes (and of the 6-hex ids before session 15): a model or
# an alias named so would shadow a version where a reference names one (``model=<id>``, ``m@<id>``)
VERSION_ID = re.compile(r"v\d{8}-\d{6}-[a-z0-9]{6}", re.IGNORECASE)
REGISTRY = "models.json"  # the registered models' index (its store key)
REGISTER_WAIT_S = 60.0  # how long a registration waits for another one of the same name
# an S3 registration lease's life: longer than any registration (a worker's registration job is
# cut at 5 minutes), so only a holder that died loses it
REGISTER_LEASE_S = 15 * 60.0


def _write_errors() -> tuple[type[Exception], ...]:
    """What a full or read-only disk raises while a version is written: OSError, or safetensors'
    own error (a worker saving a patch). The torch-free API installs no safetensors."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError,)
    return (OSError, SafetensorError)


def check_new_name(name: str, what: str) -> str:
    """A name a user gives a new model or alias: :func:`check_name`, and not one a reference
    would read as something else: ``base`` and ``latest`` (reserved), or a name shaped like a
    version id (``model=<id>`` and ``model@<id>`` name versions). StoreError (422) if it is."""
    check_name(name, what)
    if name in RESERVED:
        raise StoreError(
            f"{what} name {name!r} is reserved (base: the unedited backbone, latest: the newest "
            "version): pick another name"
        )
    if VERSION_ID.fullmatch(name):
        raise StoreError(
            f"{what} name {name!r} has the shape of a version id (v<YYYYmmdd>-<HHMMSS>-<6 "
            "letters or digits>), which a model reference reads as a version: pick another "
            "name, e.g. without the leading 'v'"
        )
    return name


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: a model and one of its versions (``None`` = the base backbone)."""

    model: str
    version: str | None

    def __str__(self) -> str:
        return f"{self.model}@{self.version or BASE}"


class Store(StoreFiles):
    """Local-filesystem store. Safe for several processes: writes are atomic, updates locked."""

    def __init__(
        self,
        root: Path | str,
        cache_max_bytes: int | None = None,
        cache_min_idle_s: float = CACHE_MIN_IDLE_S,
        remote: S3Remote | None = None,
    ) -> None:
        """``cache_max_bytes``: bound of the merged-weights cache, enforced after each write
        (see :meth:`evict_cached_weights`); None = unbounded (readers, such as the API).
        ``remote``: the bucket that holds the store (``root`` is then a local cache of it)."""
        self.root = Path(root)
        self.remote = remote
        self.cache_max_bytes, self.cache_min_idle_s = cache_max_bytes, cache_min_idle_s
        self.tenant: str | None = None  # None: every tenant's versions (see :meth:`scoped`)
        self._parsed: dict[str, Any] = {}  # models.json parsed, by its stat (shared by scoped())
        for sub in ("models", "cache", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def scoped(self, tenant: str) -> Store:
        """This store as ``tenant`` sees it: its own versions, aliases and ``latest`` only."""
        view = copy.copy(self)
        view.tenant = check_name(tenant, "tenant")
        return view

    # ------------------------------------------------------------------ paths and locking

    def version_dir(self, model: str, version: str) -> Path:
        model, version = check_name(model, "model"), check_name(version, "version")
        return self.root / "models" / model / "versions" / version

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock for read-modify-write of the small JSON indexes (local store)."""
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def registering(self, name: str, wait_s: float = REGISTER_WAIT_S) -> Iterator[None]:
        """Held while model ``name``'s files and entry are written (``workers/model_files.py``,
        add_model), so two registrations of one name never interleave, wherever they run: a
        lock file of the folder (the CLI and every worker of this filesystem) and, for an S3
        store, a lease in the bucket (every host). Waits up to ``wait_s``, then Conflict."""
        what = f"another registration of {check_name(name, 'model')!r}"
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        with open(locks / f"register-{name}", "a") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Conflict(
                            f"{what} has been running for over {wait_s:g} s; retry when it "
                            "has ended"
                        ) from None
                    time.sleep(0.1)
            try:
                if self.remote is None:
                    yield
                else:
                    with self.remote.lease(
                        f".locks/register-{name}", REGISTER_LEASE_S, wait_s, what
                    ):
                        yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_index(self, key: str) -> dict[str, Any]:
        """A small JSON index (models.json, an alias file) by its store key; {} if none yet."""
        if self.remote is not None:
            return self.remote.read_json(key)[1]
        path = self.root / key
        return read_json(path) if path.exists() else {}

    def _update_index(self, key: str, change: Callable[[dict[str, Any]], object]) -> None:
        """Read-modify-write an index: under the folder's lock, or a conditional write to the
        bucket redone on conflict. ``change`` may raise to refuse (nothing is written)."""
        if self.remote is not None:
            self.remote.update_json(key, change)
            return
        with self._locked():
            data = self._read_index(key)
            change(data)
            write_json_atomic(self.root / key, data)

    # ------------------------------------------------------------------ registered models

    def register_model(self, entry: ModelEntry) -> None:
        """Add or replace a model entry (its versions stay: they pin the base weights' sha256).
        The name may not be reserved or shaped like a version id (:func:`check_new_name`)."""
        check_new_name(entry.name, "model")

        def add(registry: dict[str, Any]) -> None:
            old = registry.get(entry.name)
            changed = old is not None and old["weights_sha256"] != entry.weights_sha256
            if changed and self._has_versions(entry.name):
                raise StoreError(
                    f"model {entry.name!r} has versions over other base weights "
                    f"({old['weights_sha256'][:12]}...): register the new backbone under a new name"
                )
            registry[entry.name] = entry.to_json()

        self._update_index(REGISTRY, add)

    def _entries(self) -> dict[str, ModelEntry]:
        """The registered models, parsed again only when models.json changed (a new file, as
        it is replaced by a rename): every edit request reads it two or three times."""
        path = self.root / REGISTRY
        if self.remote is not None:  # a conditional GET: the parsed copy while it is current
            etag, raw = self.remote.read_json(REGISTRY)
            key: tuple[Any, ...] = ("s3", etag)
        else:
            try:
                stat = path.stat()
            except FileNotFoundError:
                return {}
            key, raw = (stat.st_ino, stat.st_mtime_ns, stat.st_size), None
        cached = self._parsed.get("models")
        if cached is None or cached[0] != key:
            raw = read_json(path) if raw is None else raw
            entries = {k: self._resolve(ModelEntry.from_json(v)) for k, v in raw.items()}
            cached = self._parsed["models"] = (key, entries)
        return cached[1]

    def _resolve(self, entry: ModelEntry) -> ModelEntry:
        """Files registered by ``vitedit models add`` are store-relative keys
        (``models/<name>/base/...``): every host resolves them against its own store root."""

        def at(path: Any) -> Any:
            return (
                path
                if not isinstance(path, str) or Path(path).is_absolute()
                else str(self.root / path)
            )

        bench = {
            k: at(v) if k in ("groups", "locality", "results") else v
            for k, v in entry.benchmark.items()
        }
        return replace(
            entry, backbone=at(entry.backbone), hypernetwork=at(entry.hypernetwork), benchmark=bench
        )

    def model_files(self, name: str) -> Path:
        """Where ``vitedit models add`` keeps a model's base files: ``models/<name>/base``."""
        return self.root / "models" / check_name(name, "model") / "base"

    def unregister_model(self, name: str, purge: bool = False) -> None:
        """Remove a model's entry and its base files; with versions only when ``purge`` (then
        they go too: their patches are useless without the base)."""
        check_name(name, "model")

        def remove(registry: dict[str, Any]) -> None:
            if name not in registry:
                raise UnknownModelError(f"no model named {quoted(name)}")
            if self._has_versions(name) and not purge:
                raise StoreError(
                    f"model {name!r} has versions: remove them with it (purge) or keep the model"
                )
            del registry[name]

        self._update_index(REGISTRY, remove)
        if self.remote is not None:
            self.remote.delete_prefix(f"models/{name}/")
        folder = self.root / "models" / name
        if folder.exists():
            trash = self.root / "tmp" / f"removed-{name}-{secrets.token_hex(4)}"
            os.rename(folder, trash)  # gone for readers at once, deleted after
            shutil.rmtree(trash, ignore_errors=True)

    def models(self) -> list[ModelEntry]:
        return [entry for _, entry in sorted(self._entries().items())]

    def model(self, name: str) -> ModelEntry:
        entry = self._entries().get(name)
        if entry is None:
            known = sorted(self._entries())
            raise UnknownModelError(
                f"no model named {quoted(name)}; registered models: {known or 'none'}"
            )
        return entry

    def _has_versions(self, model: str) -> bool:
        if self.remote is not None:
            return bool(self._remote_versions(model))
        folder = self.root / "models" / model / "versions"
        return folder.is_dir() and any(folder.iterdir())

    def _remote_versions(self, model: str) -> list[str]:
        """The published versions of a model in the bucket: those with a manifest."""
        assert self.remote is not None
        prefix = f"models/{check_name(model, 'model')}/versions/"
        ends = f"/{MANIFEST_FILE}"
        return sorted(
            b.key[len(prefix) : -len(ends)]
            for b in self.remote.list(prefix)
            if b.key.endswith(ends) and "/" not in b.key[len(prefix) : -len(ends)]
        )

    # ------------------------------------------------------------------ versions

    def new_version_id(self) -> str:
        """Server-generated, sortable by creation time: ``v20261122-015000-k3f7az``.

        Six base-32 characters, 30 random bits: n ids made in the same second collide with odds of
        about n^2 / 2^31 (six hex characters, 24 bits, until session 15, gave two equal ids among
        200 made in one second once in CI). No longer than before, so `vitedit versions` still
        shows ids and its columns whole at 80 columns."""
        suffix = base64.b32encode(secrets.token_bytes(4)).decode()[:6].lower()
        return f"v{datetime.now(UTC):%Y%m%d-%H%M%S}-{suffix}"

    @contextmanager
    def begin_version(self, model: str) -> Iterator[VersionDraft]:
        """Write files into ``draft.dir``, then ``draft.commit(manifest)``; else it is discarded."""
        self.model(model)
        try:
            draft = VersionDraft(self, model, self.new_version_id())
        except OSError as exc:
            raise write_failed(exc) from exc
        try:
            yield draft
        except _write_errors() as exc:  # the disk, not the caller: say what to fix
            raise write_failed(exc) from exc
        finally:
            if draft.committed is None:
                draft.discard()

    def version(self, model: str, version: str) -> VersionManifest:
        """A version's manifest; unknown (404) if it is missing or another tenant's."""
        manifest = self._manifest(model, version)
        if manifest is None or not self._visible(manifest):
            self.model(model)
            raise UnknownVersionError(
                f"model {model!r} has no version {version!r}; list them with "
                f"GET /v1/models/{model}/versions"
            )
        return manifest

    def _manifest(self, model: str, version: str, listed: bool = False) -> VersionManifest | None:
        """A version's manifest, or None. With a bucket, the bucket says whether the version
        exists (a purged one is gone even where it is cached; ``listed``: it was just listed)
        and a manifest not cached yet is fetched; manifests never change once published."""
        folder = self.version_dir(model, version)
        path = folder / MANIFEST_FILE
        if self.remote is not None and not listed and not self.remote.exists(self.key(path)):
            return None
        if not self._fetch(path):
            return None
        manifest = VersionManifest.read(folder / MANIFEST_FILE)
        if manifest.version != version or manifest.model != model:
            raise IntegrityError(
                f"{folder} holds the manifest of {manifest.model}@{manifest.version}"
            )
        return manifest

    def _visible(self, manifest: VersionManifest) -> bool:
        return self.tenant is None or manifest.owner == self.tenant

    def versions(self, model: str) -> list[VersionManifest]:
        """Every version of a model (the scope's tenant's only), oldest first."""
        self.model(model)
        if self.remote is not None:
            names = self._remote_versions(model)
        else:
            folder = self.root / "models" / model / "versions"
            names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        found = []
        for name in names:
            try:
                manifest = self._manifest(model, name, True)
            except (ManifestError, IntegrityError, StoreError) as exc:  # one damaged folder
                # must not hide the others: it is left out (and logged, with its path)
                log.error("model %s: version %r is damaged, left out: %s", model, name, exc)
                continue
            if manifest is not None and self._visible(manifest):
                found.append(manifest)
        return sorted(found, key=lambda m: (m.created_at, m.version))

    def lineage(self, model: str, version: str | None) -> list[VersionManifest]:
        """The chain of versions from the first edit over the base to ``version`` (root first)."""
        chain: list[VersionManifest] = []
        while version is not None:
            manifest = self.version(model, version)
            chain.append(manifest)
            version = manifest.parent
            if len(chain) > 10_000:
                raise IntegrityError(f"the lineage of {model} loops")
        return chain[::-1]

    def latest(self, model: str) -> str | None:
        """The newest accepted version (a rejected one never becomes ``latest``)."""
        versions = [m for m in self.versions(model) if m.status != REJECTED]
        return versions[-1].version if versions else None

    def resolve(self, ref: str) -> ModelRef:
        """``model`` (its base), ``model@latest``, ``model@<alias>``, ``model@<version>``, or a
        bare version id of any model."""
        model, at, name = ref.partition("@")
        if at:  # "model@" names nothing: not the base, which is "model" or "model@base"
            check_name(name, "alias or version")
        if not name and model not in self._entries():
            for entry in self.models():
                found = self._manifest(entry.name, check_name(model, "version"))
                if found is not None and self._visible(found):
                    return ModelRef(entry.name, model)
        self.model(model)
        return ModelRef(model, self.resolve_version(model, name or BASE))

    def check_parent(self, model: str, version: str | None) -> None:
        """Refuse ``version`` as the parent of an edit if its acceptance gate rejected it
        (StoreError, 422); None (the base) is always fine. The API asks before it queues; the
        worker asks again before the edit, and :meth:`VersionDraft.commit` before publishing."""
        if version is not None:
            refuse_rejected_parent(self.version(model, version))

    def resolve_version(self, model: str, name: str) -> str | None:
        """A version name, an alias, ``latest`` or ``base`` -> a version id (None = base)."""
        if name == BASE:
            return None
        if name == LATEST:
            return self.latest(model)
        alias = self.aliases(model).get(name)
        version = alias or name
        self.version(model, check_name(version, "version"))
        return version

    def version_file(self, model: str, version: str, name: str) -> Path:
        """A file of a version, after checking its sha256 against the manifest."""
        manifest = self.version(model, version)
        if name not in manifest.files:
            raise UnknownVersionError(f"version {version} of {model} has no file {name!r}")
        path = self.version_dir(model, version) / name
        actual = sha256_file(path) if self._fetch(path) else "missing"
        if actual != manifest.files[name] and self.remote is not None:  # a damaged local copy?
            self.remote.download_file(self.key(path), path)
            actual = sha256_file(path) if path.is_file() else "missing"
        if actual != manifest.files[name]:
            raise IntegrityError(
                f"{model}@{version}/{name} has sha256 {actual[:16]}..., its manifest says "
                f"{manifest.files[name][:16]}...: the store was changed or damaged"
            )
        return path

    # ------------------------------------------------------------------ aliases

    def _aliases_key(self, model: str) -> str:
        folder = f"models/{check_name(model, 'model')}"
        tenant = self.tenant or DEFAULT_TENANT
        return (
            f"{folder}/aliases.json"
            if tenant == DEFAULT_TENANT
            else f"{folder}/aliases/{tenant}.json"
        )

    def aliases(self, model: str) -> dict[str, str]:
        """The scope's tenant's aliases of a model (an unscoped store: the default tenant's)."""
        return {k: str(v) for k, v in self._read_index(self._aliases_key(model)).items()}

    def set_alias(self, model: str, alias: str, version: str) -> None:
        """Point ``alias`` at a version (moving it if it exists); ``latest``, ``base`` and names
        shaped like a version id are refused (:func:`check_new_name`)."""
        check_new_name(alias, "alias")
        target = self.resolve_version(model, version)
        if target is None:
            raise StoreError("an alias must point at a version, not at the base backbone")
        manifest = self.version(model, target)
        if manifest.status == REJECTED:
            raise StoreError(
                f"version {target} was rejected by its acceptance gate ({manifest.reason}); "
                "an alias may only point at an accepted version"
            )
        self._update_aliases(model, lambda a: a.__setitem__(alias, target))

    def delete_alias(self, model: str, alias: str) -> None:
        if alias in RESERVED:  # "latest" and "base" follow the versions: nothing to delete
            raise StoreError(f"alias {alias!r} is reserved and cannot be deleted")
        if alias not in self.aliases(model):
            raise UnknownVersionError(f"model {model!r} has no alias {alias!r}")
        self._update_aliases(model, lambda a: a.pop(alias, None))

    def _update_aliases(self, model: str, change: Callable[[dict[str, str]], object]) -> None:
        self.model(model)
        self._update_index(self._aliases_key(model), change)
