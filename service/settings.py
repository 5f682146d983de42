"""Settings of the API process, read once from ``VITEDIT_*`` environment variables."""

from __future__ import annotations

from workers.settings import CommonSettings


class ApiSettings(CommonSettings):
    """``VITEDIT_API_KEYS="k1,k2"`` turns on Bearer authentication (off when empty)."""

    api_keys: str = ""
    max_image_bytes: int = 4 << 20  # per uploaded file
    max_image_pixels: int = 4096 * 4096
    max_images: int = 64  # per request (edit + holdout)
    # a whole request body (checked from Content-Length before it is read); 32 MiB holds
    # e.g. 8 images at the per-file limit, or 64 of 512 KB
    max_body_bytes: int = 32 << 20
    max_steps_limit: int = 2000
    max_wait_s: float = 60.0  # longest long-poll of GET /v1/edits/{id}?wait=
    predict_timeout_s: float = 120.0
    materialise_timeout_s: float = 300.0

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
