"""bf16 autocast of the forward passes: where it applies, and that the bench keeps one precision."""

from __future__ import annotations

import pytest
import torch

from models.precision import autocast


def test_bf16_autocast_runs_matmuls_in_bfloat16_and_fp32_leaves_them_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the block
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("cpu", "fp16")


def test_a_bf16_bench_runs_every_forward_pass_in_bf16_base_predictions_included():
    """Base predictions at another precision than the edited model's would count precision noise
    as locality flips: the harness must make both under the same autocast."""
    import io

    from PIL import Image

    from models.backbones import load_backbone
    from models.worlds.bench import BenchConfig, run_bench
    from models.worlds.layout import EditBenchmark, EditGroup
    from tests.conftest import tiny_manifest
    from tests.redis_server import png

    images = [Image.open(io.BytesIO(png(seed))) for seed in range(12)]
    benchmark = EditBenchmark([EditGroup("3-noise", 3, images[:4])], images[4:])
    torch.manual_seed(0)
    backbone = load_backbone(tiny_manifest())
    seen: list[torch.dtype] = []
    fc1 = backbone.model.blocks[0].mlp.fc1
    hook = fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    config = BenchConfig(
        ("random",),
        knobs={"random": (0.1,)},
        edits_per_group=2,
        lr=1e-9,
        max_steps=1,
        seeds=(0,),
        precision="bf16",
    )
    try:
        results = run_bench(backbone, benchmark, config)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the prefix tokens of the base included
    assert results["settings"]["precision"] == "bf16"
    assert results["methods"]["random"]["points"][0]["lr"] == 1.0
