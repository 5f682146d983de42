"""The worker's warm state and the work behind each job kind.

A worker process loads each registered model once (backbone, sites, hypernetwork, the prefix
tokens of its locality set and benchmark groups) and keeps the merged site weights of a few
recent versions (an LRU). A version is "activated" by copying its site weights into the shared
model and restored to the base afterwards, so every job starts from the same state. Progress goes
to the RQ job meta; the cancel flag is read at every optimiser step.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from models.backbones import Backbone, load_backbone
from models.errors import DataError, EditCanceled, IntegrityError, VitEditError
from models.evaluation import predictions
from models.forward import SplitForward
from models.images import check_size, decode_reduced
from models.reports import ReportSets, TokenSet
from models.sites import Patch, Sites
from models.store.manifest import ModelEntry, VersionManifest
from models.store.store import PATCH_FILE, Store
from workers import settings as S
from workers.client import cancel_key, heartbeat_key
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

MAX_BENCHMARK_HOLDOUT = 512  # benchmark images used for GR when the request brings none


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_image(path: Path) -> Image.Image:
    """Decode an uploaded image fully, its size checked from the header first and reduced when
    large (``models.images.decode_reduced``); a truncated or non-image file raises DataError."""
    try:
        with Image.open(path) as im:
            check_size(im.size, path.name)
            im.verify()
        with Image.open(path) as im:
            return decode_reduced(im, path.name)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path.name}: not a readable image ({exc})") from exc


def pixel_key(image: Image.Image) -> str:
    """Identity of an image's pixels: finds a benchmark image that a user submits for editing."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BenchmarkGroup:
    """One registered benchmark group, ready for GR: label, prefix tokens, pixel keys."""

    label: int
    tokens: torch.Tensor  # (N, T, D)
    keys: tuple[str, ...]  # pixel_key of each image


@dataclass
class LoadedModel:
    """One registered model, loaded once per worker and shared by all its jobs."""

    entry: ModelEntry
    backbone: Backbone
    sites: Sites
    split: SplitForward
    hypernetwork: Any
    base_weights: list[torch.Tensor]  # the site matrices of the base backbone
    locality: TokenSet | None
    locality_root_preds: torch.Tensor | None
    groups: list[BenchmarkGroup]

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def tokens(self, images: list[Image.Image], batch: int = 256) -> torch.Tensor:
        """Prefix tokens (N, T, D) of PIL images, preprocessed in batches."""
        chunks = [
            self.split.prefix(self.backbone.preprocess(images[i : i + batch]))
            for i in range(0, len(images), batch)
        ]
        return torch.cat(chunks)


class Progress:
    """Phase timings, progress in the job meta (throttled) and the cancel check."""

    def __init__(self, redis: Redis, job: Job | None) -> None:
        self.redis, self.job = redis, job
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = time.perf_counter()
        self._saved_at = 0.0

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._t0
        self.current, self._t0 = name, now
        self._save(phase=name)

    def on_step(self, step: int, max_steps: int, loss: float) -> None:
        """The editors' StepCallback: progress, and EditCanceled when a cancel was requested."""
        if self.current != "optimizing":
            self.phase("optimizing")
        self.check_cancel()
        now = time.perf_counter()
        if step >= max_steps or now - self._saved_at >= S.PROGRESS_MIN_INTERVAL_S:
            self._save(step=step, max_steps=max_steps, loss=round(float(loss), 6))

    def check_cancel(self) -> None:
        if self.job is not None and self.redis.exists(cancel_key(self.job.id)):
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
        self.store = Store(
            settings.store,
            cache_max_bytes=settings.weights_cache_max_bytes,
            cache_min_idle_s=settings.cache_min_idle_s,
        )
        self.device = pick_device(settings.device)
        self.models: dict[str, LoadedModel] = {}
        self.versions: OrderedDict[tuple[str, str], list[torch.Tensor]] = OrderedDict()
        self.retention_tokens: OrderedDict[tuple[str, str], TokenSet] = OrderedDict()
        self.current_job: str | None = None
        self.lost_jobs: list[str] = []  # jobs that ended while Redis was unreachable

    # ------------------------------------------------------------------ models

    def preload(self) -> None:
        for entry in self.store.models():
            self.load(entry.name)

    def load(self, name: str) -> LoadedModel:
        """The loaded model (re-loaded if its registry entry changed since)."""
        entry = self.store.model(name)
        loaded = self.models.get(name)
        if loaded is None or loaded.entry != entry:
            self.models[name] = loaded = self._load(entry)
            self.versions = OrderedDict((k, v) for k, v in self.versions.items() if k[0] != name)
            for key in [k for k in self.retention_tokens if k[0] == name]:
                del self.retention_tokens[key]
        return loaded

    def _load(self, entry: ModelEntry) -> LoadedModel:
        start = time.perf_counter()
        backbone = load_backbone(entry.backbone_manifest(), self.device)
        if backbone.weights_sha256 != entry.weights_sha256:
            raise IntegrityError(
                f"backbone of {entry.name} has sha256 "
                f"{backbone.weights_sha256[:16]}..., the registry says "
                f"{entry.weights_sha256[:16]}..."
            )
        hypernetwork = None
        if entry.hypernetwork:
            from models.hypernet.network import Hypernetwork, recorded_sites

            hypernetwork = Hypernetwork.load(entry.hypernetwork, backbone)
            sites = recorded_sites(entry.hypernetwork)
        else:
            sites = Sites.for_model(backbone.model, entry.blocks)
        split = SplitForward(backbone.model, sites)
        base = [p.detach().clone() for p in sites.params(backbone.model)]
        loaded = LoadedModel(entry, backbone, sites, split, hypernetwork, base, None, None, [])
        self._load_benchmark(loaded)
        log.info(
            "model %s ready in %.1f s on %s (sites %s, hypernetwork %s)",
            entry.name,
            time.perf_counter() - start,
            self.device,
            list(sites.mlps),
            bool(hypernetwork),
        )
        return loaded

    def _load_benchmark(self, loaded: LoadedModel) -> None:
        bench = loaded.entry.benchmark
        if bench.get("kind") == "demo":
            from models.worlds.demo import load_world

            benchmark = load_world().benchmark
        elif bench.get("kind") == "folders":
            from models.worlds.layout import read_benchmark

            benchmark = read_benchmark(bench["groups"], bench["locality"])
        else:
            return
        loaded.locality = TokenSet(loaded.tokens(benchmark.locality))
        loaded.locality_root_preds = predictions(loaded.split, loaded.locality.tokens).cpu()
        loaded.groups = [
            BenchmarkGroup(
                g.label, loaded.tokens(g.images), tuple(pixel_key(im) for im in g.images)
            )
            for g in benchmark.groups
        ]

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
        backup = patch.apply(loaded.model)
        try:
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
            holdout = _benchmark_holdout(loaded.groups, set(edit.targets.tolist()), edit_keys)
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
        while len(self.retention_tokens) > self.settings.retention_cache_size:
            self.retention_tokens.popitem(last=False)
        return tokens

    # ------------------------------------------------------------------ job bookkeeping

    @contextmanager
    def running(self, job: Job | None, upload: str | None) -> Iterator[None]:
        """Heartbeat key, user-facing failure reasons, upload clean-up, GPU memory release."""
        self.current_job = job.id if job else None
        if job is not None:
            self.redis.set(heartbeat_key(job.id), "1", ex=S.HEARTBEAT_TTL_S)
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
            _fail(job, str(exc))
            raise
        except Exception as exc:
            _fail(
                job,
                f"internal error ({type(exc).__name__}: {exc}); nothing was stored. "
                f"Report it with the job id",
            )
            raise
        finally:
            self.current_job = None
            if upload:
                self.store.remove_upload(upload)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if job is not None:
                try:
                    self.redis.delete(heartbeat_key(job.id))
                except RedisError:  # Redis went away under the job: reported once it is back
                    self.lost_jobs.append(job.id)


def _benchmark_holdout(
    groups: list[BenchmarkGroup], labels: set[int], exclude: set[str]
) -> TokenSet | None:
    """The registered groups of these labels, without the edit images themselves (capped)."""
    tokens, targets = [], []
    for group in groups:
        if group.label in labels:
            keep = torch.tensor([k not in exclude for k in group.keys], dtype=torch.bool)
            tokens.append(group.tokens[keep.to(group.tokens.device)])
            targets.append(torch.full((int(keep.sum()),), group.label))
    if not tokens or not sum(len(t) for t in tokens):
        return None
    return TokenSet(
        torch.cat(tokens)[:MAX_BENCHMARK_HOLDOUT], torch.cat(targets)[:MAX_BENCHMARK_HOLDOUT]
    )


def _fail(job: Job | None, reason: str) -> None:
    log.warning("job %s failed: %s", job.id if job else "-", reason)
    if job is not None:
        job.meta["error"] = reason
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
