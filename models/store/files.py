"""The store's files on this host: names, the merged-weights cache, uploads, incoming sources.

:class:`models.store.store.Store` builds on this: it adds the registry, versions and aliases.
Every method here works on the local folder ``root`` and, with an S3 bucket (``remote``), reads
through it (what is missing is downloaded) and writes through to the bucket. Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

from models.errors import IntegrityError, StoreError, quoted
from models.store.manifest import read_json, sha256_file, utc_now, write_json_atomic
from models.store.remote import S3Remote

log = logging.getLogger(__name__)

BASE = "base"  # the version name of a model's root backbone (no patch)
WEIGHTS_FILE = "model.safetensors"
CACHE_MIN_IDLE_S = 60.0  # merged weights used this recently are never evicted (being downloaded)
INCOMING = "incoming"  # where users put a model's files to register it from the store
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # model, version, alias, upload names
_NAME = re.compile(NAME_PATTERN)


def check_name(name: str, what: str) -> str:
    """Model, version, alias and upload names become paths: letters, digits, ``._-`` only."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # '$' alone allows a final '\n'
        raise StoreError(
            f"invalid {what} {quoted(name) if isinstance(name, str) else repr(name)}: use 1-64 "
            "letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


class StoreFiles:
    """The folder (and bucket) side of the store; :class:`models.store.store.Store` is the rest."""

    root: Path
    remote: S3Remote | None
    cache_max_bytes: int | None
    cache_min_idle_s: float

    def key(self, path: Path) -> str:
        """A path under ``root`` as its store key (``models/m/versions/v``): the same on every
        host and in the bucket."""
        return path.relative_to(self.root).as_posix()

    def _fetch(self, path: Path) -> bool:
        """Bring a file of the bucket into the local cache if it is not there; True if it is."""
        if path.is_file():
            return True
        return self.remote is not None and self.remote.download_file(self.key(path), path)

    # ------------------------------------------------------------------ model files (S3)

    def publish_model_files(self, name: str) -> None:
        """Upload ``models/<name>/base/`` (written by ``vitedit models add``) to the bucket,
        replacing what was there; register the model after this (its entry publishes it)."""
        if self.remote is None:
            return
        folder = self.model_files(name)
        self.remote.delete_prefix(f"{self.key(folder)}/")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.remote.upload_file(path, self.key(path))
        for blob in self.remote.list(f"{self.key(folder)}/"):  # this cache is current: its
            with contextlib.suppress(FileNotFoundError):  # next fetch downloads nothing
                os.utime(self.root / blob.key, (blob.modified, blob.modified))

    def fetch_model_files(self, name: str) -> None:
        """Bring a model's base files from the bucket into the local cache, a mirror of the
        bucket's copy (see :meth:`_sync_down`); a no-op for a local store and for files
        registered by absolute path. Their content is checked where it is read (the backbone's
        sha256, the hypernetwork's)."""
        self._sync_down(self.model_files(name), mirror=True)

    def _sync_down(self, folder: Path, mirror: bool = False) -> None:
        """Bring a folder of the bucket into the local cache: each file that is missing here,
        older than the bucket's object (a registration replaced it: weights retrained on one
        architecture keep their size), or of another size at its time; a download takes its
        object's time. A newer local file was moved in by a registration on this host and goes
        up next (``publish_model_files``): it stays. With ``mirror``, local files the bucket no
        longer holds are deleted too, unless newer than its newest object (the same reason).
        A no-op without a bucket."""
        if self.remote is None:
            return
        blobs = self.remote.list(f"{self.key(folder)}/")
        for blob in blobs:
            path = self.root / blob.key
            try:
                stat = path.stat()
            except FileNotFoundError:
                current = False
            else:  # newer: moved in here and not uploaded yet; the same time: downloaded
                ahead = stat.st_mtime - blob.modified
                current = ahead > 1e-3 or (ahead > -1e-3 and stat.st_size == blob.size)
            if not current and self.remote.download_file(blob.key, path):
                os.utime(path, (blob.modified, blob.modified))
        if mirror and blobs and folder.is_dir():
            newest = max(blob.modified for blob in blobs)
            held = {blob.key for blob in blobs}
            for path in list(folder.rglob("*")):
                stale = path.is_file() and self.key(path) not in held
                if stale and path.stat().st_mtime <= newest:
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ merged weights cache

    def cached_weights(self, model: str, version: str | None) -> tuple[Path, str] | None:
        """(path, sha256) of the materialised merged weights, checked, or None if not cached.

        Each call marks the entry used (the mtime of its ``model.json``): eviction goes by it.
        """
        folder = self._cache_dir(model, version)
        path, info = folder / WEIGHTS_FILE, folder / "model.json"
        if not path.is_file():
            if not (self._fetch(info) and self._fetch(path)):
                return None
            if self.cache_max_bytes is not None:  # downloaded from the bucket: bound the cache
                self.evict_cached_weights(self.cache_max_bytes, self.cache_min_idle_s)
        try:
            expected = read_json(info)["sha256"]
            os.utime(info)
        except FileNotFoundError:  # evicted between the two checks
            return None
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"cached weights of {model}@{version or BASE} are damaged; delete "
                f"{folder} and download again to rebuild them"
            )
        return path, expected

    def put_cached_weights(
        self, model: str, version: str | None, write: Callable[[Path], None]
    ) -> tuple[Path, str]:
        """Materialise once: ``write(tmp_path)`` writes the file; it appears atomically."""
        folder = self._cache_dir(model, version)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS_FILE}.{secrets.token_hex(4)}.tmp"
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            sha = sha256_file(tmp)
            write_json_atomic(
                folder / "model.json",
                {"sha256": sha, "size": tmp.stat().st_size, "created_at": utc_now()},
            )
            os.rename(tmp, folder / WEIGHTS_FILE)  # same content if another worker won the race
            fsync_dir(folder)
            if self.remote is not None:  # the weights first: model.json makes them visible
                for name in (WEIGHTS_FILE, "model.json"):
                    self.remote.upload_file(folder / name, self.key(folder / name))
        finally:
            tmp.unlink(missing_ok=True)
        if self.cache_max_bytes is not None:
            self.evict_cached_weights(self.cache_max_bytes, self.cache_min_idle_s)
        return folder / WEIGHTS_FILE, sha

    def evict_cached_weights(self, max_bytes: int, min_idle_s: float = 0.0) -> list[str]:
        """Remove merged weights, least recently used first, until the cache holds ``max_bytes``.

        An entry used in the last ``min_idle_s`` seconds stays (it may be downloading right now),
        even if the cache stays above the bound. Returns the ``model@version`` removed.
        """
        entries, total = [], 0
        for info in (self.root / "cache").glob("*/*/model.json"):
            weights = info.parent / WEIGHTS_FILE
            with contextlib.suppress(FileNotFoundError):
                size = weights.stat().st_size
                entries.append((info.stat().st_mtime, size, info.parent))
                total += size
        removed, cutoff = [], time.time() - min_idle_s
        for used_at, size, folder in sorted(entries):
            if total <= max_bytes or used_at > cutoff:
                break
            trash = self.root / "tmp" / f"evict-{secrets.token_hex(6)}"
            os.rename(folder, trash)  # atomic: a reader sees the entry whole or not at all
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            removed.append(f"{folder.parent.name}@{folder.name}")
        if removed:
            log.info("weights cache: evicted %s (now %d bytes)", removed, total)
        return removed

    def _cache_dir(self, model: str, version: str | None) -> Path:
        model, version = check_name(model, "model"), check_name(version or BASE, "version")
        return self.root / "cache" / model / version

    # ------------------------------------------------------------------ uploads

    def new_upload(self) -> tuple[str, Path]:
        """A fresh folder for a job's images: (upload id, path)."""
        upload = f"u{secrets.token_hex(8)}"
        path = self.root / "uploads" / upload
        path.mkdir(parents=True)
        return upload, path

    def write_upload(self, upload: str, name: str, data: bytes) -> str:
        """Write one uploaded file atomically; returns its path relative to the store root.

        No fsync: an upload lives only as long as its queued job, which a crash loses anyway.
        """
        folder = self.root / "uploads" / check_name(upload, "upload")
        check_name(name, "file name")
        if self.remote is not None:  # straight to the bucket: the worker may be on another host
            self.remote.put_bytes(f"uploads/{upload}/{name}", data)
            with contextlib.suppress(OSError):
                folder.rmdir()  # the local folder of new_upload, if empty: nothing stays here
            return f"uploads/{upload}/{name}"
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, folder / name)
        return f"uploads/{upload}/{name}"

    def push_upload(self, upload: str) -> None:
        """Upload a folder written in place (a model's files) to the bucket, for workers on
        other hosts; a no-op for a local store."""
        if self.remote is None:
            return
        folder = self.root / "uploads" / check_name(upload, "upload")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.remote.upload_file(path, self.key(path))
        shutil.rmtree(folder, ignore_errors=True)  # the bucket's copy is the one jobs read

    def upload_path(self, relative: str) -> Path:
        """Resolve a path written by :meth:`write_upload`, refusing anything outside uploads/."""
        path = (self.root / relative).resolve()
        area = (self.root / "uploads").resolve()
        if not path.is_relative_to(area) or path == area:
            raise StoreError(f"{relative!r} is not in the store's upload area")
        if not path.exists():  # written on another host: the whole upload, from the bucket
            self._sync_down(self.root / "uploads" / path.relative_to(area).parts[0])
        return path

    # ------------------------------------------------------------------ incoming (sources)

    def source_key(self, source: str) -> str:
        """A folder of the ``incoming/`` area as a store key, checked: where a team puts a
        model's files itself (``aws s3 cp``, or a copy into the folder) to register it from there
        (``POST /v1/models`` with ``source``) instead of sending them over HTTP."""
        parts = source.strip("/").split("/") if isinstance(source, str) else []
        if len(parts) < 2 or parts[0] != INCOMING:
            raise StoreError(
                f"source {source!r} is not a folder of the store's {INCOMING}/ area: put the "
                f"model's files under e.g. {INCOMING}/my-vit/ and name that folder"
            )
        for part in parts[1:]:
            check_name(part, "source folder name")
        return "/".join(parts)

    def source_has(self, source: str, name: str) -> bool:
        """Whether a source folder holds the file ``name`` (in the bucket, with one)."""
        key = f"{self.source_key(source)}/{name}"
        return self.remote.exists(key) if self.remote is not None else (self.root / key).is_file()

    def source_folder(self, source: str) -> Path:
        """A source folder in the local folder, brought from the bucket (what is missing or out
        of date, :meth:`_sync_down`) when there is one."""
        folder = self.root / self.source_key(source)
        self._sync_down(folder)
        return folder

    def remove_upload(self, upload: str) -> None:
        shutil.rmtree(self.root / "uploads" / check_name(upload, "upload"), ignore_errors=True)
        if self.remote is not None:
            self.remote.delete_prefix(f"uploads/{upload}/")

    def sweep(self, max_age_s: float, keep: Collection[str] = ()) -> int:
        """Delete uploads (but those named in ``keep``) and abandoned drafts older than
        ``max_age_s``; returns how many."""
        cutoff, removed = time.time() - max_age_s, 0
        for area in ("uploads", "tmp"):
            for path in (self.root / area).iterdir():
                if area == "uploads" and path.name in keep:
                    continue
                try:
                    stale = path.stat().st_mtime < cutoff
                except FileNotFoundError:  # another sweeper was faster
                    continue
                if stale:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
        if self.remote is not None:  # uploads of every host: by their newest object
            newest: dict[str, float] = {}
            for blob in self.remote.list("uploads/"):
                upload = blob.key.split("/")[1]
                newest[upload] = max(newest.get(upload, 0.0), blob.modified)
            for upload, modified in sorted(newest.items()):
                if upload not in keep and modified < cutoff:
                    self.remote.delete_prefix(f"uploads/{upload}/")
                    removed += 1
        return removed
