"""The worker's side in-process (no queue): whatever an editor returns, a version holding NaN or inf
weights is never scored nor stored; an image of absurd shape is refused from its header, a large
one reduced before the model transform."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from redis import Redis

from models.editing import EDITORS, EditOutcome, EditTask
from models.editing.finetune import FTConfig
from models.editing.optimize import masked_finetune
from models.editing.registry import StepCallback, register
from models.errors import EditDiverged, MaskScoresNotFinite, StoreError, TooLarge
from models.images import open_image
from models.sites import Patch
from tests.redis_server import png, tiny_store
from tests.service.conftest import commit_version
from workers import tasks
from workers.payloads import EditPayload, JobImage
from workers.runtime import Runtime
from workers.settings import WorkerSettings

BROKEN = "test-non-finite"


@pytest.fixture
def broken_editor() -> Iterator[str]:
    """An editor that edits, then hands back a patch of NaNs (what lr=1e30 used to produce)."""

    def edit(task: EditTask, config: FTConfig, on_step: StepCallback | None = None) -> EditOutcome:
        outcome = masked_finetune(task, config, on_step=on_step)
        nans = {
            k: (i, torch.full_like(v, torch.nan)) for k, (i, v) in outcome.patch.entries.items()
        }
        return EditOutcome(Patch(task.sites, nans), outcome.steps, outcome.loss)

    register(BROKEN, FTConfig, description="test only: NaN weights")(edit)
    try:
        yield BROKEN
    finally:
        EDITORS.pop(BROKEN)


def test_a_non_finite_edit_is_neither_scored_nor_stored(tmp_path: Path, broken_editor: str) -> None:
    store = tiny_store(tmp_path)
    rt = Runtime(
        WorkerSettings(store=store.root, device="cpu"), Redis.from_url("redis://127.0.0.1:1/0")
    )
    loaded = rt.load("tiny")
    base = [p.detach().clone() for p in loaded.sites.params(loaded.model)]
    upload, _ = store.new_upload()
    payload = EditPayload(
        model="tiny",
        upload=upload,
        images=[JobImage(path=store.write_upload(upload, "edit-000", png(5)), target=4)],
        method=broken_editor,
        options={"lr": 0.01, "max_steps": 5},
    )
    with pytest.raises(EditDiverged, match=r"non-finite weights .*nothing was stored"):
        tasks.edit(rt, payload, job=None)
    assert store.versions("tiny") == []
    assert not list((store.root / "tmp").iterdir())
    now = loaded.sites.params(loaded.model)
    assert all(torch.equal(p, b) for p, b in zip(now, base, strict=True))


def test_the_worker_refuses_an_absurd_shape_before_decoding_it(tmp_path: Path) -> None:
    path = tmp_path / "long.png"
    Image.new("L", (1, 16_000_000)).save(path)  # 16 MB of pixels, a few KB of file
    with pytest.raises(TooLarge, match="each side"):
        open_image(path)


def test_the_worker_reduces_a_large_image_before_the_model_transform(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(path, quality=90)
    image = open_image(path)
    assert 512 <= min(image.size) < 1024 and image.size[0] > image.size[1]
    assert image.getpixel((10, 10))[0] > 150  # the same picture, smaller


def _runtime(tmp_path: Path) -> Runtime:
    store = tiny_store(tmp_path)
    return Runtime(
        WorkerSettings(store=store.root, device="cpu"), Redis.from_url("redis://127.0.0.1:1/0")
    )


def _payload(rt: Runtime, **changes: object) -> EditPayload:
    upload, _ = rt.store.new_upload()
    image = JobImage(path=rt.store.write_upload(upload, "edit-000", png(5)), target=4)
    fields = {"model": "tiny", "upload": upload, "images": [image], "method": "ft"}
    return EditPayload(**{**fields, "options": {"lr": 0.01, "max_steps": 3}, **changes})


def test_the_worker_refuses_a_rejected_parent_whatever_the_api_let_through(
    tmp_path: Path,
) -> None:
    """The API refuses a rejected parent (tests/service/test_acceptance.py); a payload that
    names one anyway (an older API, a job queued by hand) fails before any step, stores nothing."""
    rt = _runtime(tmp_path)
    rejected = commit_version(rt.store, rejected="SR 0.000 < min_sr 1")
    with pytest.raises(StoreError, match=f"version {rejected} of tiny was rejected.*SR 0.000"):
        tasks.edit(rt, _payload(rt, parent=rejected), job=None)
    assert [m.version for m in rt.store.versions("tiny")] == [rejected]


def test_an_edit_whose_mask_scores_are_not_finite_fails_and_stores_nothing(
    tmp_path: Path,
) -> None:
    """A hypernetwork that scores NaN (registration refuses NaN weights; this is the worker's
    own check) picks no mask: the job fails saying so, and no version is published."""
    from models.hypernet.metatrain import build_hypernetwork

    rt = _runtime(tmp_path)
    loaded = rt.load("tiny")
    net = build_hypernetwork(loaded.model, loaded.sites).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    loaded.hypernetwork = net
    with pytest.raises(MaskScoresNotFinite, match=r"NaN or inf.*nothing was edited"):
        tasks.edit(rt, _payload(rt, method="where2edit"), job=None)
    assert rt.store.versions("tiny") == []
    assert not list((rt.store.root / "tmp").iterdir())
