"""A small typed client of the vitedit HTTP API (httpx, torch-free). Used by ``vitedit edit``.

client = ViteditClient("http://127.0.0.1:8000")
job = client.submit_edit([Path("shoe.png")], ["Sneaker"], model="demo-vit@latest")
job = client.wait(job["id"])
client.download(job["links"]["patch"], Path("patch.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    """The server answered with an error status; ``detail`` is its actionable message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class ViteditClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http``: an httpx client to use instead of a new one (e.g. FastAPI's TestClient)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise ApiError(
                response.status_code, detail if isinstance(detail, str) else json.dumps(detail)
            )
        return response.json()

    # ------------------------------------------------------------------ edits

    def submit_edit(
        self,
        images: list[Path],
        labels: list[str],
        model: str,
        holdout: list[Path] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/edits; ``options`` may hold method, rho, max_steps, seed, lr and others."""
        options = dict(options or {})
        form: dict[str, Any] = {"label": labels, "model": model}
        for key in ("method", "rho", "max_steps", "seed", "lr"):
            if options.get(key) is not None:
                form[key] = str(options.pop(key))
        extra = {k: v for k, v in options.items() if v is not None}
        if extra:
            form["options"] = json.dumps(extra)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            files += [
                ("holdout", (p.name, stack.enter_context(open(p, "rb")))) for p in holdout or []
            ]
            return self._json(self.http.post("/v1/edits", data=form, files=files, headers=headers))

    def edit(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        return self._json(
            self.http.get(f"/v1/edits/{job_id}", params={"wait": wait_s}, timeout=wait_s + 30)
        )

    def wait(
        self,
        job_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float = 3600,
    ) -> dict[str, Any]:
        """Long-poll until the job ends, calling ``on_update`` with each state seen."""
        deadline = time.monotonic() + timeout_s
        job = self.edit(job_id)
        while job["status"] not in TERMINAL and time.monotonic() < deadline:
            if on_update:
                on_update(job)
            job = self.edit(job_id, wait_s=poll_s)
        if on_update:
            on_update(job)
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/edits/{job_id}/cancel"))

    # ------------------------------------------------------------------ models and versions

    def models(self) -> list[dict[str, Any]]:
        return self._json(self.http.get("/v1/models"))

    def versions(self, model: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/models/{model}/versions"))

    def version(self, model: str, version: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/models/{model}/versions/{version}"))

    def predict(self, model: str, version: str, images: list[Path]) -> dict[str, Any]:
        with ExitStack() as stack:
            files = [("images", (p.name, stack.enter_context(open(p, "rb")))) for p in images]
            return self._json(
                self.http.post(f"/v1/models/{model}/versions/{version}/predict", files=files)
            )

    def download(self, path: str, out: Path) -> str:
        """Stream a file to ``out`` (atomically), checking the server's X-Content-SHA256."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        digest = hashlib.sha256()
        with self.http.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            with open(tmp, "wb") as fh:
                for chunk in _chunks(response):
                    digest.update(chunk)
                    fh.write(chunk)
            expected = response.headers.get("x-content-sha256")
        if expected and expected != digest.hexdigest():
            tmp.unlink(missing_ok=True)
            raise ApiError(
                502,
                f"downloaded {path} has sha256 {digest.hexdigest()[:16]}..., "
                f"the server announced {expected[:16]}...: retry",
            )
        tmp.replace(out)
        return digest.hexdigest()


def _chunks(response: httpx.Response) -> Iterator[bytes]:
    yield from response.iter_bytes(1 << 20)
