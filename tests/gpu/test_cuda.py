"""What only a CUDA device can check: the same edit on GPU and CPU, and a worker on the GPU.
Skipped where there is none; scripts/gpu_check.sh runs them with its timings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from redis import Redis

from models.editing.registry import EditTask, make_config, run_edit
from models.sites import Sites
from tests.redis_server import tiny_store
from tests.workers.test_runtime import edit_once
from workers.runtime import Runtime
from workers.settings import WorkerSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _edit(model: torch.nn.Module, device: str):
    model = model.to(device)
    sites = Sites.for_model(model)
    torch.manual_seed(0)
    images = torch.randn(2, 1, 28, 28).to(device)
    task = EditTask.build(model, sites, images, torch.tensor([1, 2], device=device))
    config = make_config("random", rho=0.1, max_steps=10, stop_loss=0.0, lr=1e-3, seed=0)
    return run_edit("random", task, config).patch


def test_a_masked_edit_on_the_gpu_matches_the_cpu(tiny_backbone) -> None:
    cpu = _edit(tiny_backbone.model, "cpu")
    gpu = _edit(tiny_backbone.model, "cuda")
    tiny_backbone.model.to("cpu")
    for key, (idx, values) in cpu.entries.items():
        gpu_idx, gpu_values = gpu.entries[key]
        assert torch.equal(idx.cpu(), gpu_idx.cpu())  # the same neurons
        assert torch.allclose(values.cpu(), gpu_values.cpu(), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_gpu_worker_stores_a_version_and_reports_its_gpu_memory(
    tmp_path: Path, precision: str
) -> None:
    store = tiny_store(tmp_path)
    settings = WorkerSettings(store=store.root, device="cuda", precision=precision)
    rt = Runtime(settings, Redis.from_url("redis://127.0.0.1:1/0"))
    version = edit_once(rt, seed=3)
    report = store.version("tiny", version).report
    assert report["peak_memory_mib"]["cuda_allocated"] > 0
    assert report["edit"]["precision"] == precision
