"""The S3 half of the store: its durable state in an S3-compatible bucket. Torch-free.

With ``VITEDIT_STORE_URL=s3://bucket/prefix`` every process (API, workers on any host, the CLI)
shares the bucket, under the same keys a local store uses (``models.json``,
``models/<m>/versions/<v>/...``, aliases, ``uploads/``, ``cache/``). Each process keeps its own
local folder (``VITEDIT_STORE``) as a read cache and for drafts: :class:`models.store.store.Store`
reads through it and writes through to the bucket. The guarantees are the local store's:

- **publish last**: a version's files go up first and its ``manifest.json`` last, with
  ``If-None-Match: *``. A version without a manifest does not exist, and a second publish of the
  same version id is refused (versions are immutable).
- **sha256 on every read**: files are downloaded into the local folder and checked against the
  manifest there (:meth:`Store.version_file`), as local files are.
- **atomic index updates**: ``models.json`` and the alias files are read-modify-written with
  ``If-Match`` on the ETag that was read. A concurrent writer makes the write fail (412) and the
  change is redone on the new content (:meth:`S3Remote.update_json`). No lock, no lost update.
- **leases** where a step must not run twice at once on any host (a model's registration): an
  object written only if absent, taken over only once its holder's lease has expired
  (:meth:`S3Remote.lease`).

The server must support conditional writes (PutObject with If-Match / If-None-Match): AWS S3 has
since 2024, as do MinIO and moto's server mode, which the tests run against.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from models.errors import Conflict, ManifestError, StoreError, StoreUnavailable

CAS_ATTEMPTS = 50  # conditional-write retries of one index update before giving up

_SNAPSHOT: ContextVar[dict[tuple[int, str, str], Any] | None] = ContextVar(
    "vitedit_s3_snapshot", default=None
)


@contextmanager
def one_snapshot() -> Iterator[None]:
    """Within this block (an API request: ``service/main.py``), each JSON index is read from the
    bucket once and an object found to exist is not asked about again: the block sees one
    snapshot of the indexes, and a request that looks at ``models.json`` three times costs one
    round trip, not three. Writes (``update_json``) always read afresh and update the snapshot.
    Not for long work (a worker's job): a snapshot would hide what changed meanwhile."""
    token = _SNAPSHOT.set({})
    try:
        yield
    finally:
        _SNAPSHOT.reset(token)


_CONFLICT = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class Blob:
    """One object: its key relative to the store's prefix, size and last-modified (epoch s)."""

    key: str
    size: int
    modified: float


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, ``some/prefix``); StoreError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise StoreError(
            f"store URL {url!r} is not understood: use s3://BUCKET or s3://BUCKET/PREFIX"
        )
    return parsed.netloc, parsed.path.strip("/")


class S3Remote:
    """Objects of one bucket under one prefix, with the few operations the store needs."""

    def __init__(self, url: str, endpoint_url: str | None = None, client: Any = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_store_url(url)
        self.endpoint_url = endpoint_url
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:  # the API or worker was installed without the s3 extra
                raise StoreError("an s3:// store needs boto3: pip install 'vitedit[s3]'") from exc
            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            )
            # a session of its own: credentials are read now (boto3's default session keeps
            # the first ones it found), and creating clients on it is safe from any thread
            session = boto3.session.Session()
            try:
                client = session.client("s3", endpoint_url=endpoint_url, config=config)
            except ValueError as exc:  # botocore: "Invalid endpoint: ..."
                raise StoreError(
                    f"VITEDIT_S3_ENDPOINT_URL {endpoint_url!r} is not a URL ({exc}); use e.g. "
                    "http://minio:9000, or leave it unset for AWS S3"
                ) from exc
        self.client = client
        self._json: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (etag, data) last read

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Remote({self.url}{where})"

    # ------------------------------------------------------------------ plumbing

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Run one client call; a network, credential or bucket failure becomes StoreUnavailable
        (HTTP 503 at the API) naming the bucket and what to check."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except NoCredentialsError as exc:
            raise StoreUnavailable(
                f"the S3 store {self!r} has no credentials to {what}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or another boto3 credential source)"
            ) from exc
        except ClientError as exc:
            code = _code(exc)
            if code in _CONFLICT or code in _MISSING or code in ("304", "NotModified"):
                raise  # the caller's to handle
            raise StoreUnavailable(
                f"the S3 store {self!r} refused to {what} ({code}: "
                f"{exc.response.get('Error', {}).get('Message', '')}); check the bucket, "
                "VITEDIT_S3_ENDPOINT_URL and the AWS_* credentials"
            ) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"the S3 store {self!r} could not be reached to {what} ({exc}); check "
                "VITEDIT_S3_ENDPOINT_URL and that the server is up"
            ) from exc

    def check(self) -> None:
        """Fail now, with the reason, if the bucket cannot be used (at process start)."""
        from botocore.exceptions import ClientError

        try:
            self._call("open the bucket", self.client.head_bucket)
        except ClientError as exc:
            raise StoreUnavailable(
                f"the S3 store {self!r}: bucket {self.bucket!r} does not exist ({_code(exc)}); "
                "create it, or fix VITEDIT_STORE_URL"
            ) from exc

    # ------------------------------------------------------------------ objects

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        snapshot, key = _SNAPSHOT.get(), (id(self), "exists", rel)
        if snapshot is not None and key in snapshot:
            return True
        try:
            self._call(f"read {rel}", self.client.head_object, Key=self._key(rel))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        if snapshot is not None:
            snapshot[key] = True
        return True

    def get_bytes(self, rel: str) -> tuple[bytes, str] | None:
        """(content, ETag) of an object, or None if there is none."""
        from botocore.exceptions import ClientError

        try:
            got = self._call(f"read {rel}", self.client.get_object, Key=self._key(rel))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def put_bytes(
        self, rel: str, data: bytes, if_match: str | None = None, if_absent: bool = False
    ) -> str | None:
        """Write an object; with ``if_match`` (an ETag) or ``if_absent`` only under that
        condition. Returns the new ETag, or None when the condition failed."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_absent else {}
        try:
            put = self._call(
                f"write {rel}", self.client.put_object, Key=self._key(rel), Body=data, **condition
            )
        except ClientError as exc:
            if condition and (_code(exc) in _CONFLICT or _code(exc) in _MISSING):
                return None  # changed (or removed) since it was read, or already there
            raise
        return put["ETag"]

    def upload_file(self, path: Path, rel: str) -> None:
        self._call(
            f"write {rel}",
            lambda **kw: self.client.upload_file(str(path), kw["Bucket"], kw["Key"]),
            Key=self._key(rel),
        )

    def download_file(self, rel: str, path: Path) -> bool:
        """Download an object into ``path`` atomically (temp file, rename); False if absent."""
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.download"
        try:
            self._call(
                f"read {rel}",
                lambda **kw: self.client.download_file(kw["Bucket"], kw["Key"], str(tmp)),
                Key=self._key(rel),
            )
            os.replace(tmp, path)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def list(self, rel_prefix: str) -> list[Blob]:
        """Every object whose key starts with ``rel_prefix`` (a folder: end it with '/')."""
        paginator = self.client.get_paginator("list_objects_v2")

        def every(**kwargs: Any) -> list[dict[str, Any]]:  # pages are fetched while iterating
            return [o for page in paginator.paginate(**kwargs) for o in page.get("Contents", [])]

        objects = self._call(f"list {rel_prefix}", every, Prefix=self._key(rel_prefix))
        return [
            Blob(self._rel(o["Key"]), o["Size"], o["LastModified"].timestamp()) for o in objects
        ]

    def delete_prefix(self, rel_prefix: str) -> int:
        """Delete every object under ``rel_prefix``; returns how many."""
        keys = [self._key(b.key) for b in self.list(rel_prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                f"delete {rel_prefix}",
                self.client.delete_objects,
                Delete={"Objects": batch, "Quiet": True},
            )
        return len(keys)

    @contextmanager
    def lease(self, rel: str, ttl_s: float, wait_s: float, what: str) -> Iterator[None]:
        """Hold the object ``rel`` as a lock shared by every host of the bucket.

        It is written only if absent (``If-None-Match: *``); a held one is taken over (``If-Match``
        its ETag) only after its expiry, so a holder that died frees it after ``ttl_s``. The
        expiry is the holder's wall clock: hosts' clocks must agree to well within ``ttl_s``.
        Waits up to ``wait_s``, then raises Conflict naming ``what`` holds it.
        """
        token = secrets.token_hex(8)
        deadline = time.monotonic() + wait_s
        while True:
            body = json.dumps({"holder": token, "expires": time.time() + ttl_s}).encode()
            etag = self.put_bytes(rel, body, if_absent=True)
            if etag is None and (held := self.get_bytes(rel)) is not None:
                try:
                    expires = float(json.loads(held[0])["expires"])
                except (ValueError, KeyError, TypeError):
                    expires = 0.0  # not a lease we wrote: unusable, take it over
                if expires < time.time():
                    etag = self.put_bytes(rel, body, if_match=held[1])
            if etag is not None:
                break
            if time.monotonic() > deadline:
                raise Conflict(
                    f"{what} has been running for over {wait_s:g} s; retry when it has ended"
                )
            time.sleep(0.2)
        try:
            yield
        finally:
            held = self.get_bytes(rel)
            if held is not None and held[1] == etag:  # still ours: not expired and taken over
                self._call(f"delete {rel}", self.client.delete_object, Key=self._key(rel))

    # ------------------------------------------------------------------ JSON indexes

    def read_json(self, rel: str, fresh: bool = False) -> tuple[str, dict[str, Any]]:
        """(ETag, object) of a small JSON index; ("", {}) when it does not exist yet. A repeated
        read asks with If-None-Match and reuses the parsed copy when nothing changed; inside
        :func:`one_snapshot` it is not asked again unless ``fresh``."""
        snapshot, key = _SNAPSHOT.get(), (id(self), "json", rel)
        if snapshot is not None and not fresh and key in snapshot:
            return snapshot[key]
        got = self._read_json(rel)
        if snapshot is not None:
            snapshot[key] = got
        return got

    def _read_json(self, rel: str) -> tuple[str, dict[str, Any]]:
        from botocore.exceptions import ClientError

        cached = self._json.get(rel)
        try:
            extra = {"IfNoneMatch": cached[0]} if cached else {}
            got = self._call(f"read {rel}", self.client.get_object, Key=self._key(rel), **extra)
        except ClientError as exc:
            if cached and _code(exc) in ("304", "NotModified"):
                return cached
            if _code(exc) in _MISSING:
                self._json.pop(rel, None)
                return "", {}
            raise
        try:
            data = json.loads(got["Body"].read())
        except (ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, nested too deep
            raise ManifestError(f"{self.url}/{rel} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{self.url}/{rel} must hold a JSON object")
        self._json[rel] = (got["ETag"], data)
        return got["ETag"], data

    def update_json(self, rel: str, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """Read-modify-write a JSON index with a conditional write, redone on conflict.

        ``change`` edits the dict in place (and may raise to refuse: nothing is written). It
        runs again on the new content whenever another writer got there first.
        """
        for attempt in range(CAS_ATTEMPTS):
            etag, data = self.read_json(rel, fresh=True)
            data = json.loads(json.dumps(data))  # change() must not touch the cached copy
            change(data)
            body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            if self.put_bytes(rel, body, if_match=etag or None, if_absent=not etag) is not None:
                self._json.pop(rel, None)
                snapshot = _SNAPSHOT.get()
                if snapshot is not None:  # the block's later reads see its own write
                    snapshot.pop((id(self), "json", rel), None)
                return data
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # back off, de-synchronised
        raise StoreUnavailable(
            f"{self.url}/{rel} kept changing under {CAS_ATTEMPTS} attempts to update it; retry"
        )


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
