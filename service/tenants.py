"""Tenants: whose an API key is, and the limits of that key and its tenant.

Keys come from ``VITEDIT_API_KEYS`` and ``VITEDIT_API_KEYS_FILE`` (either, or both):

- ``VITEDIT_API_KEYS="k1,k2"``: plain keys, all of the default tenant (as before tenants);
  ``"alice:k1,bob:k2"``: ``tenant:key`` pairs (a key that holds ':' needs its tenant written).
- ``VITEDIT_API_KEYS_FILE=keys.toml`` (or ``.json``): tenants, the sha256 of their keys and their
  limits, so the file never holds a key itself::

      [tenants.alice]
      key_sha256 = ["<64 hex digits: printf %s KEY | sha256sum>"]
      max_active_jobs = 4   # optional: else VITEDIT_MAX_ACTIVE_JOBS
      rate_per_s = 5        # optional: else VITEDIT_RATE_PER_S (and rate_burst)

Only the sha256 of each key is kept in memory; a request's token is hashed and compared with every
digest in constant time (:func:`hmac.compare_digest`). Without any key there is one tenant, the
default one, with no limits: the API behaves as it did before tenants.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from models.errors import StoreError
from models.store.manifest import DEFAULT_TENANT
from models.store.store import check_name
from service.settings import ApiSettings
from service.validation import PRINTABLE_ASCII

T = TypeVar("T")
SHA256_HEX = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]


@dataclass(frozen=True)
class Limits:
    """0 = no limit."""

    max_active_jobs: int = 0  # queued + running edit jobs of the tenant
    rate_per_s: float = 0.0  # requests per second of one key (token bucket refill)
    rate_burst: int = 1  # the bucket's size


@dataclass(frozen=True)
class Caller:
    """Who sends a request: a tenant, through one key (None: the server has no keys)."""

    tenant: str
    key_id: str | None  # the first 16 hex digits of the key's sha256: names its rate bucket
    limits: Limits


ANONYMOUS = Caller(DEFAULT_TENANT, None, Limits())
"""Every caller of a server without keys."""


class TenantEntry(BaseModel):
    """One tenant of a keys file."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: list[SHA256_HEX] = Field(min_length=1)
    max_active_jobs: int | None = Field(None, ge=0)
    rate_per_s: float | None = Field(None, ge=0)
    rate_burst: int | None = Field(None, ge=1)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantEntry]


class Keyring:
    """Every accepted key (as its sha256) and the caller it makes."""

    def __init__(self, entries: list[tuple[bytes, Caller]]) -> None:
        self.entries = entries

    @property
    def on(self) -> bool:
        """Whether the server has keys (authentication and tenants on)."""
        return bool(self.entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({caller.tenant for _, caller in self.entries})

    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller of an ``Authorization: Bearer <key>`` header; None if no key matches.

        Every digest is compared (no early exit), in constant time; the token is taken as bytes,
        so a header with any character is simply not a key.
        """
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        found = None
        for digest, caller in self.entries:
            if hmac.compare_digest(given, digest):
                found = caller
        return found

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> Keyring:
        """Read the keys of the settings and of the keys file; ValueError says what is wrong."""
        default = Limits(settings.max_active_jobs, settings.rate_per_s, settings.rate_burst)
        digests: dict[bytes, str] = {}
        for text in (k.strip() for k in settings.api_keys.split(",")):
            if text:
                tenant, key = text.split(":", 1) if ":" in text else (DEFAULT_TENANT, text)
                if not key:
                    raise ValueError(f"VITEDIT_API_KEYS: {tenant!r} has an empty key after ':'")
                if not PRINTABLE_ASCII.fullmatch(key):
                    raise ValueError(
                        f"VITEDIT_API_KEYS: a key of {tenant!r} holds a character outside printable "
                        "ASCII (a space, a control character or a letter such as 'ü'): HTTP clients "
                        "send such header bytes differently, so it could never be matched; use "
                        "letters, digits and punctuation only (e.g. `openssl rand -hex 32`)"
                    )
                _add(
                    digests,
                    hashlib.sha256(key.encode("utf-8")).digest(),
                    tenant,
                    "VITEDIT_API_KEYS",
                )
        limits = {}
        if settings.api_keys_file is not None:
            for tenant, entry in _read_keys_file(settings.api_keys_file).tenants.items():
                for hexdigest in entry.key_sha256:
                    _add(digests, bytes.fromhex(hexdigest), tenant, str(settings.api_keys_file))
                limits[tenant] = Limits(
                    _given(entry.max_active_jobs, default.max_active_jobs),
                    _given(entry.rate_per_s, default.rate_per_s),
                    _given(entry.rate_burst, default.rate_burst),
                )
        return cls(
            [
                (digest, Caller(tenant, digest.hex()[:16], limits.get(tenant, default)))
                for digest, tenant in digests.items()
            ]
        )


def _given(value: T | None, default: T) -> T:
    return default if value is None else value


def _add(digests: dict[bytes, str], digest: bytes, tenant: str, source: str) -> None:
    try:
        check_name(tenant, "tenant")
    except StoreError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if digests.get(digest, tenant) != tenant:
        raise ValueError(f"{source}: a key of tenant {tenant!r} is also {digests[digest]!r}'s")
    digests[digest] = tenant


def _read_keys_file(path: Path) -> KeysFile:
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(
            f"VITEDIT_API_KEYS_FILE {path}: not a readable JSON or TOML (.toml) file: {exc}"
        ) from None
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(
            f"VITEDIT_API_KEYS_FILE {path}: {problems}; expected "
            '{"tenants": {"<name>": {"key_sha256": ["<64 hex digits>"], "max_active_jobs": 4, '
            '"rate_per_s": 5, "rate_burst": 20}}}'
        ) from None
