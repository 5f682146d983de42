"""Every queue name, timeout and TTL of the service in one place; the settings read from the env.

Settings come from environment variables with the prefix ``VITEDIT_`` (``VITEDIT_REDIS_URL``,
``VITEDIT_STORE``, ...), read once at start-up by the API and by each worker. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.store.remote import S3Remote
from models.store.store import Store

KEY_PREFIX = "vitedit"
"""Prefix of every Redis key vitedit writes itself (RQ keeps its own ``rq:`` keys)."""

QUEUE_EDITS = "vitedit-edits"
"""Edit jobs: minutes of optimisation each, first come first served."""

QUEUE_HIGH = "vitedit-high"
"""Short jobs (predict, materialise merged weights): a worker takes them before any edit."""

EDIT_JOB_TIMEOUT_S = 30 * 60
"""An edit that runs longer is killed by RQ (its default of 180 s is too short on a CPU)."""

SHORT_JOB_TIMEOUT_S = 5 * 60
"""Predict and materialise jobs."""

QUEUED_TTL_S = 24 * 3600
"""A job still queued after this long is dropped by RQ."""

RESULT_TTL_S = 7 * 24 * 3600
"""How long Redis keeps a finished job record; the version itself lives in the store forever."""

FAILURE_TTL_S = 7 * 24 * 3600
"""How long Redis keeps a failed or canceled job record (its reason)."""

SHORT_RESULT_TTL_S = 10 * 60
"""How long a predict or materialise result stays readable by the API that waits for it."""

HEARTBEAT_INTERVAL_S = 5.0
"""A worker refreshes its own and its running job's heartbeat keys this often."""

HEARTBEAT_TTL_S = 30
"""A heartbeat key expires this long after its last refresh: then the job's worker is dead."""

WATCHDOG_INTERVAL_S = 10.0
"""The watchdog looks for running jobs without a heartbeat this often (dead worker -> failed)."""

CANCEL_FLAG_TTL_S = 24 * 3600
"""How long a cancel request waits for its job to be picked up."""

IDEMPOTENCY_TTL_S = 24 * 3600
"""How long an ``Idempotency-Key`` maps to its job."""

HOUSEKEEPING_INTERVAL_S = 300.0
"""One worker at a time sweeps abandoned uploads and drafts and trims the weights cache this often
(and each worker once at start)."""

HOUSEKEEPING_LOCK_TTL_S = 120
"""The Redis locks of the reaper and of the housekeeping expire after this long if their holder
dies mid-round (a round takes milliseconds to seconds)."""

MODEL_RETRY_S = 300.0
"""A model that failed to load on a worker is tried again after this long (or at once when its
registry entry changes); meanwhile its jobs fail at once with the reason."""

REDIS_RECONNECT_MAX_S = 5.0
"""A worker that lost Redis retries at least this often (RQ's own default backs off to 60 s)."""

PROGRESS_MIN_INTERVAL_S = 0.2
"""Progress (step, loss) is written to the job meta at most this often, and at the last step."""


class CommonSettings(BaseSettings):
    """What every process needs: where Redis and the store are."""

    model_config = SettingsConfigDict(env_prefix="VITEDIT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # the store: this folder, or with store_url (s3://bucket/prefix) the bucket, of which the
    # folder is then this process's local cache (README, "Scaling out"); credentials from the
    # standard AWS_* variables, a non-AWS server (MinIO, ...) by s3_endpoint_url
    store: Path = Path("var/store")
    store_url: str | None = None
    s3_endpoint_url: str | None = None
    # the merged-weights cache (GET .../weights) is trimmed to this size, least recently
    # downloaded first; an entry downloaded in the last cache_min_idle_s is never removed. With
    # an S3 store each process bounds its own local copy (the API's too: it downloads them)
    weights_cache_max_bytes: int = 2 * 1024**3
    cache_min_idle_s: float = 60.0

    def open_store(self) -> Store:
        """The store these settings name, its weights cache bounded; an S3 bucket is checked
        now, so a wrong URL or credentials stop the process at start with the reason."""
        remote = None
        if self.store_url:
            remote = S3Remote(self.store_url, endpoint_url=self.s3_endpoint_url)
            remote.check()
        return Store(
            self.store,
            cache_max_bytes=self.weights_cache_max_bytes,
            cache_min_idle_s=self.cache_min_idle_s,
            remote=remote,
        )


class WorkerSettings(CommonSettings):
    """Settings of ``python -m workers.main``."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    # forward passes of edits and their evaluation: fp32, or bf16 autocast (GPU; weights and
    # patches stay fp32). README, "Precision": bf16 leaves masked edits unchanged, not plain ft.
    precision: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = False  # TF32 tensor cores for fp32 matmuls (Ampere+ GPUs)
    # 1 by default: on a shared small CPU, OpenMP threads spin-wait for each other; measured on
    # the demo backbone with a loaded 2-core machine, 50 steps took 0.5 s on 1 thread, 38 s on 2.
    # Raise it on a dedicated many-core machine; 0 = torch's default.
    torch_threads: int = 1
    # images per forward pass when the worker evaluates (locality, held-out, retention sets) and
    # computes prefix tokens; lower it if a large backbone's reports run out of GPU memory
    eval_batch_size: int = Field(256, ge=1)
    version_cache_size: int = 4  # merged site weights of this many versions stay in memory
    retention_cache_size: int = 64  # versions whose edit-image tokens stay in memory (LRU)
    # ... and at most this many bytes of them (ViT-B: 197 x 768 floats = 0.6 MB per image); the
    # tokens of the edit being evaluated are always kept, even when they alone exceed it
    retention_cache_max_bytes: int = Field(512 * 1024**2, ge=0)
    # CUDA: the share of the GPU's memory this worker's allocator may use (None = no cap). A job
    # that needs more fails with a message saying what to lower, and the worker carries on.
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    # an upload that no queued or running job names is deleted once this old (canceled, expired
    # or crashed jobs); young ones are kept: the API writes an upload before it enqueues its job
    upload_grace_s: float = 15 * 60
    name: str | None = None  # RQ worker name; None = host + pid
    register_demo: bool = False  # register the shipped demo model at start (docker compose)
    # Prometheus metrics of this worker at http://<metrics_addr>:<metrics_port>/metrics (see
    # workers/metrics.py); None = off. One port per worker process (docker compose: 9101 each).
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 in a container, for the scraper
