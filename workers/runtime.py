"""The worker's warm state and the work behind each job kind.

A worker process loads each registered model once (:mod:`workers.warm`) and keeps the merged
site weights of a few recent versions (an LRU). A version is "activated" by copying its site
weights into the shared model and restored to the base afterwards, so every job starts from the
same state; each job start checks that it does (and restores the base if not). A model that fails
to load is marked unavailable instead of stopping the worker. Progress goes to the RQ job meta;
the cancel flag is read at every optimiser step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from models.backbones import resolve_device
from models.errors import (
    EditCanceled,
    IntegrityError,
    ModelUnavailable,
    VitEditError,
)
from models.images import open_image
from models.reports import ReportSets, TokenSet
from models.sites import Patch
from models.store.manifest import VersionManifest
from models.store.store import PATCH_FILE
from workers import metrics
from workers import settings as S
from workers.client import CANCEL_REQUESTED, PUBLISHING, cancel_key, heartbeat_key, worker_key
from workers.settings import WorkerSettings
from workers.warm import LoadedModel, Unloadable, benchmark_holdout, load_model, restore_base

log = logging.getLogger(__name__)


class Progress:
    """Phase timings, progress in the job meta (throttled) and the cancel check."""

    def __init__(self, redis: Redis, job: Job | None) -> None:
        self.redis, self.job = redis, job
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = time.perf_counter()
        self._saved_at = 0.0

    def phase(self, name: str) -> None:
        self._close_current()
        self.current = name
        self._save(phase=name)

    def close(self) -> None:
        """End the last phase (its seconds go to the metrics); call once the job is over."""
        self._close_current()
        self.current = None

    def _close_current(self) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._t0
            metrics.count_phase(self.redis, self.current, now - self._t0)
        self._t0 = now

    def on_step(self, step: int, max_steps: int, loss: float) -> None:
        """The editors' StepCallback: progress, and EditCanceled when a cancel was requested."""
        if self.current != "optimizing":
            self.phase("optimizing")
        self.check_cancel()
        now = time.perf_counter()
        if step >= max_steps or now - self._saved_at >= S.PROGRESS_MIN_INTERVAL_S:
            self._save(step=step, max_steps=max_steps, loss=round(float(loss), 6))

    def check_cancel(self) -> None:
        if (
            self.job is not None
            and self.redis.get(cancel_key(self.job.id)) == CANCEL_REQUESTED.encode()
        ):
            raise EditCanceled(f"job {self.job.id} was canceled by request")

    def claim_publish(self) -> None:
        """The point of no return, just before the version is stored: from here a cancel is
        refused (409). EditCanceled if a cancel came first; nothing has been stored then."""
        if self.job is None:
            return
        key = cancel_key(self.job.id)
        claimed = self.redis.set(key, PUBLISHING, nx=True, ex=S.CANCEL_FLAG_TTL_S)
        if not claimed and self.redis.get(key) != PUBLISHING.encode():  # a cancel came first
            raise EditCanceled(f"job {self.job.id} was canceled by request")

    def _save(self, **fields: Any) -> None:
        self._saved_at = time.perf_counter()
        if self.job is not None:
            self.job.meta.update(fields)
            self.job.save_meta()


class Runtime:
    """Warm models and versions of one worker process."""

    def __init__(self, settings: WorkerSettings, redis: Redis) -> None:
        self.settings, self.redis = settings, redis
        self.store = settings.open_store()
        self.device = resolve_device(settings.device)
        if self.device.type == "cuda" and settings.gpu_memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, self.device)
        self.models: dict[str, LoadedModel] = {}
        self.versions: OrderedDict[tuple[str, str], list[torch.Tensor]] = OrderedDict()
        self.retention_tokens: OrderedDict[tuple[str, str], TokenSet] = OrderedDict()
        self.current_job: str | None = None
        self.lost_jobs: list[str] = []  # jobs that ended while Redis was unreachable
        self.unavailable: dict[str, Unloadable] = {}  # models that failed to load
        self.worker_name: str | None = None  # set by the worker's main: who announces
        self.current_kind: str | None = None

    def announce(self) -> None:
        """Write this worker's heartbeat key: alive, and which kind of job it runs (if any).

        The API reads it (``JobClient.worker_states``) to answer a predict at once with 503
        when every worker is busy with an edit, instead of queueing it behind minutes of work.
        """
        if self.worker_name is not None:
            state = {"pid": os.getpid(), "job": self.current_job, "kind": self.current_kind}
            self.redis.set(worker_key(self.worker_name), json.dumps(state), ex=S.HEARTBEAT_TTL_S)
            metrics.HEARTBEAT.set_to_current_time()  # read by the health check

    # ------------------------------------------------------------------ models

    def preload(self) -> None:
        """Load every registered model; one that fails is marked unavailable, the rest serve."""
        for entry in self.store.models():
            with contextlib.suppress(ModelUnavailable):  # logged and published by load()
                self.load(entry.name)

    def load(self, name: str) -> LoadedModel:
        """The loaded model, checked intact (call at job start, outside :meth:`activate`).

        Re-loaded if its registry entry changed since. A model that fails to load is marked
        unavailable (see ``self.unavailable``, published by the heartbeat) and raises
        :class:`ModelUnavailable` until its entry changes or ``MODEL_RETRY_S`` passed.
        """
        entry = self.store.model(name)
        failed = self.unavailable.get(name)
        if failed and failed.entry == entry and time.monotonic() - failed.at < S.MODEL_RETRY_S:
            raise ModelUnavailable(failed.reason)
        loaded = self.models.get(name)
        if loaded is not None and loaded.entry == entry:
            restore_base(loaded)
            return loaded
        self.models.pop(name, None)
        self.versions = OrderedDict((k, v) for k, v in self.versions.items() if k[0] != name)
        for key in [k for k in self.retention_tokens if k[0] == name]:
            del self.retention_tokens[key]
        try:
            self.store.fetch_model_files(name)  # an S3 store: its files, into the local cache
            self.models[name] = loaded = load_model(
                entry, self.device, self.settings.eval_batch_size
            )
        except JobTimeoutException:
            raise
        except Exception as exc:
            reason = (
                f"model {name!r} failed to load on the workers ({type(exc).__name__}: {exc}); "
                "its other requests fail the same way until it is fixed and registered again"
            )
            log.error("%s", reason, exc_info=True)
            self.unavailable[name] = Unloadable(entry, reason, time.monotonic())
            raise ModelUnavailable(reason) from exc
        self.unavailable.pop(name, None)
        return loaded

    # ------------------------------------------------------------------ versions

    @contextmanager
    def activate(self, loaded: LoadedModel, version: str | None) -> Iterator[LoadedModel]:
        """The shared model holds ``version``'s weights inside the block, the base's after it."""
        if version is None:
            yield loaded
            return
        weights = self._version_weights(loaded, version)
        params = loaded.sites.params(loaded.model)
        try:
            with torch.no_grad():
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            yield loaded
        finally:
            with torch.no_grad():
                for p, w in zip(params, loaded.base_weights, strict=True):
                    p.copy_(w)

    def _version_weights(self, loaded: LoadedModel, version: str) -> list[torch.Tensor]:
        key = (loaded.entry.name, version)
        if key in self.versions:
            self.versions.move_to_end(key)
            return self.versions[key]
        patch, meta = Patch.load(self.store.version_file(key[0], version, PATCH_FILE))
        if meta.get("backbone_sha256") != loaded.entry.weights_sha256:
            raise IntegrityError(
                f"{key[0]}@{version} was made for other base weights "
                f"({str(meta.get('backbone_sha256'))[:16]}...)"
            )
        backup: dict[str, torch.Tensor] = {}
        try:  # the shared model is restored even if apply is cut off (a job timeout)
            patch.apply(loaded.model, backup)
            weights = [p.detach().clone() for p in loaded.sites.params(loaded.model)]
        finally:
            patch.revert(loaded.model, backup)
        self.versions[key] = weights
        while len(self.versions) > self.settings.version_cache_size:
            self.versions.popitem(last=False)
        return weights

    def report_sets(
        self,
        loaded: LoadedModel,
        edit: TokenSet,
        edit_keys: set[str],
        holdout: TokenSet | None,
        lineage: list[VersionManifest],
    ) -> ReportSets:
        """Edit, GR, locality and retention sets of one edit (see :mod:`models.reports`)."""
        source = "request" if holdout is not None else None
        if holdout is None:
            holdout = benchmark_holdout(loaded.groups, set(edit.targets.tolist()), edit_keys)
            source = "benchmark" if holdout is not None else None
        retention = {m.version: self._retention_tokens(loaded, m) for m in lineage}
        return ReportSets(
            edit, holdout, source, loaded.locality, loaded.locality_root_preds, retention
        )

    def _retention_tokens(self, loaded: LoadedModel, manifest: VersionManifest) -> TokenSet:
        key = (manifest.model, manifest.version)
        if key in self.retention_tokens:
            self.retention_tokens.move_to_end(key)
            return self.retention_tokens[key]
        records = manifest.edit_images
        images = [open_image(self.store.version_file(key[0], key[1], r.file)) for r in records]
        tokens = TokenSet(loaded.tokens(images), torch.tensor([r.target for r in records]))
        self.retention_tokens[key] = tokens
        self._trim_retention_tokens()
        return tokens

    def retention_cache_bytes(self) -> int:
        return sum(t.tokens.nbytes for t in self.retention_tokens.values())

    def _trim_retention_tokens(self) -> None:
        """Least recently used first, down to the count and byte bounds; the newest stays."""
        s = self.settings
        while len(self.retention_tokens) > 1 and (
            len(self.retention_tokens) > s.retention_cache_size
            or self.retention_cache_bytes() > s.retention_cache_max_bytes
        ):
            self.retention_tokens.popitem(last=False)

    # ------------------------------------------------------------------ job bookkeeping

    @contextmanager
    def running(self, job: Job | None, upload: str | None) -> Iterator[None]:
        """Heartbeat key, user-facing failure reasons, upload clean-up, GPU memory release."""
        self.current_job = job.id if job else None
        self.current_kind = str(job.meta.get("kind", "edit")) if job else None
        if job is not None:
            self.redis.set(heartbeat_key(job.id), "1", ex=S.HEARTBEAT_TTL_S)
            self.announce()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        except EditCanceled:
            raise
        except JobTimeoutException:
            _fail(
                job,
                f"the job ran longer than {S.EDIT_JOB_TIMEOUT_S} s and was stopped; "
                "lower max_steps or send fewer images",
            )
            raise
        except VitEditError as exc:
            _fail(job, str(exc), type(exc).__name__)
            raise
        except Exception as exc:
            if out_of_memory(exc):
                _fail(job, self._out_of_memory())
                raise
            _fail(
                job,
                f"internal error ({type(exc).__name__}: {exc}); nothing was stored. "
                f"Report it with the job id",
            )
            raise
        finally:
            self.current_job = self.current_kind = None
            if upload:
                self.store.remove_upload(upload)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if job is not None:
                try:
                    self.redis.delete(heartbeat_key(job.id))
                    self.announce()  # free again
                except RedisError:  # Redis went away under the job: reported once it is back
                    self.lost_jobs.append(job.id)

    def _out_of_memory(self) -> str:
        limit = ""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            share = self.settings.gpu_memory_fraction or 1.0
            limit = f" (this worker may use {share * total / 2**30:.1f} GiB)"
        return (
            f"the job ran out of memory on {self.device}{limit}; nothing was stored. Send fewer "
            "images, or have the operator lower VITEDIT_EVAL_BATCH_SIZE or raise "
            "VITEDIT_GPU_MEMORY_FRACTION"
        )


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator raises OutOfMemoryError; torch's CPU allocator a RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def _fail(job: Job | None, reason: str, kind: str | None = None) -> None:
    """Record why the job failed (and, for a vitedit error, its class: the API's status)."""
    log.warning("job %s failed: %s", job.id if job else "-", reason)
    if job is not None:
        job.meta["error"] = reason
        if kind is not None:
            job.meta["error_kind"] = kind
        job.save_meta()


_RUNTIME: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make ``runtime`` the one the job entry points use (called once by the worker main)."""
    global _RUNTIME
    _RUNTIME = runtime


def current() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("no worker runtime: start workers with `python -m workers.main`")
    return _RUNTIME
