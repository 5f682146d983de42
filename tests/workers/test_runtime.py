"""The worker runtime in-process (no queue): an edit stores a version; activating a version and
leaving restores the base weights bit-exactly; the version LRU stays bounded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from models.backbones import load_backbone
from models.sites import Patch
from models.store.manifest import BackboneManifest
from models.store.store import PATCH_FILE
from tests.redis_server import db_url, png, tiny_store
from workers import tasks
from workers.payloads import EditPayload, JobImage, PredictPayload
from workers.runtime import Runtime
from workers.settings import WorkerSettings


def edit_once(rt: Runtime, seed: int, parent: str | None = None) -> str:
    upload, _ = rt.store.new_upload()
    path = rt.store.write_upload(upload, "edit-000", png(seed))
    payload = EditPayload(
        model="tiny",
        parent=parent,
        upload=upload,
        images=[JobImage(path=path, target=seed % 10)],
        method="ft",
        options={"lr": 0.01, "max_steps": 40},
    )
    result = tasks.edit(rt, payload, job=None)
    assert not (rt.store.root / "uploads" / upload).exists()  # cleaned up
    return result["version"]


def test_versions_activate_and_restore_the_base_exactly(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, version_cache_size=1, device="cpu")
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))  # never contacted here
    loaded = rt.load("tiny")
    base = [p.detach().clone() for p in loaded.sites.params(loaded.model)]
    v1 = edit_once(rt, 71)
    v2 = edit_once(rt, 72, parent=v1)
    assert [m.version for m in store.lineage("tiny", v2)] == [v1, v2]
    for version in (v1, v2, v1):
        with rt.activate(loaded, version):
            now = loaded.sites.params(loaded.model)
            assert any(not torch.equal(p, b) for p, b in zip(now, base, strict=True))
        after = loaded.sites.params(loaded.model)
        assert all(torch.equal(p, b) for p, b in zip(after, base, strict=True))
    assert len(rt.versions) == 1  # LRU bounded by version_cache_size
    upload, _ = store.new_upload()
    paths = [store.write_upload(upload, "p-000", png(72))]
    out = tasks.predict(
        rt, PredictPayload(model="tiny", version=v2, upload=upload, images=paths), job=None
    )
    assert out["predictions"][0]["label"] == 72 % 10


def test_where2edit_uses_the_registered_hypernetwork(tmp_path: Path) -> None:
    from models.backbones import load_backbone
    from models.hypernet.metatrain import build_hypernetwork
    from models.sites import Sites
    from models.store.manifest import BackboneManifest
    from tests.redis_server import make_tiny_backbone
    from workers.registration import register_model

    manifest = make_tiny_backbone(tmp_path / "backbone")
    backbone = load_backbone(BackboneManifest.read(manifest))
    sites = Sites.for_model(backbone.model)
    build_hypernetwork(backbone.model, sites, seed=0).save(tmp_path / "hyper", backbone, sites)
    store = tiny_store(tmp_path / "s")
    without = register_model(store, "tiny-plain", manifest)
    assert (
        without.default_method == "saliency" and not without.methods["saliency"].needs_hypernetwork
    )
    entry = register_model(store, "tiny", manifest, hypernetwork=tmp_path / "hyper")
    assert entry.default_method == "where2edit"
    rt = Runtime(
        WorkerSettings(store=store.root, device="cpu"), Redis.from_url("redis://127.0.0.1:1/0")
    )
    upload, _ = store.new_upload()
    path = store.write_upload(upload, "edit-000", png(81))
    payload = EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=path, target=1)],
        method="where2edit",
        options={"lr": 0.01, "max_steps": 5, "rho": 0.25},
    )
    version = store.version("tiny", tasks.edit(rt, payload, job=None)["version"])
    report = version.report
    assert "masking" in report["seconds"]
    assert report["edit"]["mask_entries"] == round(0.25 * sites.n_entries)
    assert report["edit"]["edit_neurons"] <= report["edit"]["mask_entries"]
    assert version.hypernetwork == entry.hypernetwork_id


def test_benchmark_gr_leaves_out_the_edit_image_itself(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)  # group "3-noise" holds png(100), png(101), png(102)
    rt = Runtime(
        WorkerSettings(store=store.root, device="cpu"), Redis.from_url("redis://127.0.0.1:1/0")
    )
    upload, _ = store.new_upload()
    path = store.write_upload(upload, "edit-000", png(100))
    payload = EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=path, target=3)],
        method="ft",
        options={"lr": 0.01, "max_steps": 40},
    )
    version = tasks.edit(rt, payload, job=None)["version"]
    report = store.version("tiny", version).report
    assert report["holdout_source"] == "benchmark"
    assert report["set_sizes"]["holdout"] == 2
    # by hand: a fresh backbone, then the stored patch, on the group's two other images
    backbone = load_backbone(BackboneManifest.read(store.model("tiny").backbone))
    others = [Image.open(io.BytesIO(png(seed))) for seed in (101, 102)]

    def share_of_threes() -> float:
        with torch.no_grad():
            preds = backbone.model(backbone.preprocess(others)).argmax(dim=1)
        return (preds == 3).float().mean().item()

    before = share_of_threes()
    patch, _ = Patch.load(store.version_file("tiny", version, PATCH_FILE))
    patch.apply(backbone.model)
    after = share_of_threes()
    assert report["before"]["GR"] == pytest.approx(before) and before == 0.0
    assert report["metrics"]["GR"] == pytest.approx(after) and after == 1.0  # 2 / 2, not 2 / 3


def test_a_bf16_worker_edits_under_autocast_and_says_so_in_the_report(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cpu", precision="bf16")
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))
    seen: list[torch.dtype] = []
    model = rt.load("tiny").model
    hook = model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        version = edit_once(rt, seed=3)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # every forward pass of the job ran in bf16
    manifest = store.version("tiny", version)
    assert manifest.report["edit"]["precision"] == "bf16"
    patch, _ = Patch.load(store.version_dir("tiny", version) / PATCH_FILE)
    assert all(v.dtype == torch.float32 for _, v in patch.entries.values())  # the patch: fp32
    with pytest.raises(ValueError, match="precision"):
        WorkerSettings(store=store.root, precision="fp16")


def test_retention_tokens_are_bounded_by_bytes_too(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cpu", retention_cache_max_bytes=1)
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))  # never contacted here
    parent = None
    for seed in (61, 62, 63):  # the 3rd edit evaluates the retention of the first two
        parent = edit_once(rt, seed, parent=parent)
    assert len(rt.retention_tokens) == 1  # the newest is kept even when it alone is over
    assert rt.retention_cache_bytes() > 1


def test_eval_batch_size_reaches_the_loaded_model(tmp_path: Path) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cpu", eval_batch_size=3)
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))  # never contacted here
    loaded = rt.load("tiny")
    assert loaded.split.batch_size == 3
    images = [Image.open(io.BytesIO(png(seed))) for seed in range(7)]  # 3 + 3 + 1
    torch.testing.assert_close(
        loaded.tokens(images), loaded.split.prefix(loaded.backbone.preprocess(images), 7)
    )
    with pytest.raises(ValueError, match="eval_batch_size"):
        WorkerSettings(eval_batch_size=0)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 bytes"),
    ],
)
def test_running_out_of_memory_fails_the_job_with_what_to_lower(
    tmp_path: Path, exc: Exception, redis_url: str
) -> None:
    redis = Redis.from_url(db_url(redis_url, 12))
    job = Job.create(func="builtins.print", connection=redis, serializer=JSONSerializer)
    job.save()
    store = tiny_store(tmp_path)
    rt = Runtime(WorkerSettings(store=store.root, device="cpu"), redis)
    with pytest.raises(type(exc)), rt.running(job, None):
        raise exc
    error = Job.fetch(job.id, connection=redis, serializer=JSONSerializer).meta["error"]
    assert error.startswith("the job ran out of memory on cpu; nothing was stored")
    assert "VITEDIT_EVAL_BATCH_SIZE" in error and "internal error" not in error
