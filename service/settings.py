"""Settings of the API process, read once from ``VITEDIT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from workers.settings import CommonSettings


class ApiSettings(CommonSettings):
    """API keys turn on Bearer authentication and tenants (:mod:`service.tenants`); none = off."""

    # "k1,k2": keys of the default tenant; "alice:k1,bob:k2": each key's tenant (both may mix)
    api_keys: str = ""
    # JSON or TOML: {"tenants": {name: {"key_sha256": [...], limits}}}; only keys' sha256 in it
    api_keys_file: Path | None = None
    # limits of a keyed tenant (a keys file may set its own; 0 = none); no limits without keys
    max_active_jobs: int = Field(16, ge=0)  # queued + running edit jobs of one tenant
    rate_per_s: float = Field(10.0, ge=0)  # requests per second of one key, on average
    rate_burst: int = Field(60, ge=1)  # requests one key may send at once after a pause
    max_image_bytes: int = 4 << 20  # per uploaded file
    max_image_pixels: int = 4096 * 4096
    max_images: int = 64  # per request (edit + holdout)
    # a whole request body (checked from Content-Length before it is read); 32 MiB holds
    # e.g. 8 images at the per-file limit, or 64 of 512 KB
    max_body_bytes: int = 32 << 20
    # POST /v1/models: the whole body (weights, hypernetwork, benchmark zip) and, with API keys,
    # the tenants allowed to register and remove models ("ops,ml-platform"); without API keys
    # the server is open and anyone may
    max_model_bytes: int = Field(2 << 30, ge=1)
    admin_tenants: str = ""
    register_timeout_s: float = Field(300.0, gt=0)
    max_steps_limit: int = 2000
    max_wait_s: float = 60.0  # longest long-poll of GET /v1/edits/{id}?wait=
    predict_timeout_s: float = 120.0
    materialise_timeout_s: float = 300.0
