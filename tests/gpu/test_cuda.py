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


def test_a_backbone_trains_on_the_gpu_with_the_cpu_draws_and_resumes_on_the_cpu(
    tmp_path: Path,
) -> None:
    from models.backbones import create_model
    from models.worlds import tiny_imagenet as tin
    from models.worlds.training import TrainConfig, Trainer
    from tests.models.worlds.test_tiny_imagenet import tiny_manifest

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=gen)
    # the same crops and flips on either device: the draws come from the CPU generator
    on_cpu = tin.augment(tin.to_input(x), torch.Generator().manual_seed(1))
    on_gpu = tin.augment(tin.to_input(x.cuda()), torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5)
    gpu = Trainer(create_model(tiny_manifest()), cfg, tin.to_input, tin.augment, device="cuda")
    stopped = gpu.fit(x, y, x[:8], y[:8], checkpoint=tmp_path, stop_at_step=4)
    assert not stopped.finished and next(gpu.model.parameters()).is_cuda
    cpu = Trainer(create_model(tiny_manifest()), cfg, tin.to_input, tin.augment, device="cpu")
    assert cpu.resume(tmp_path) and cpu.step == 4  # the checkpoint holds CPU tensors
    for (name, a), b in zip(
        gpu.model.state_dict().items(), cpu.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a.cpu(), b, msg=name)
    assert cpu.fit(x, y, x[:8], y[:8], checkpoint=tmp_path).finished
