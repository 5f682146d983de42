"""Time what a GPU worker does, at a user's scale: a ViT-B/16 edit, a meta-training iteration and
a report's evaluation, in fp32 and under bf16 autocast, side by side in one run.

No weights are downloaded: the ViT-B/16 is timm's architecture with random weights (speed and
memory do not depend on the values; the edit's SR/GR/LR here mean nothing). Prints one table:
seconds (median of ``--repeats`` after a warm-up) and the CUDA allocator's peak per phase.

    scripts/gpu_check.sh                                   # on the GPU machine (CUDA)
    .venv/bin/python scripts/gpu_check.py --model vit_tiny_patch16_224 --device cpu --repeats 1
                                                           # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from models.backbones import backbone_from_name
from models.editing.registry import EditTask, make_config, run_edit
from models.evaluation import predictions
from models.hypernet.cutmix import TensorPool
from models.hypernet.metatrain import MetaTrainConfig, MetaTrainer, build_hypernetwork
from models.precision import autocast, use_tf32
from models.sites import Sites


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak CUDA MiB or nan) of ``fn`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    )
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="edit steps (no early stop)")
    parser.add_argument("--locality", type=int, default=500, help="images a report evaluates")
    parser.add_argument("--batch", type=int, default=8, help="meta-training episodes (B)")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--no-meta", action="store_true", help="skip the meta-training rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    use_tf32(args.tf32)
    torch.manual_seed(0)
    backbone = backbone_from_name(args.model, device=device)
    model = backbone.model.eval()
    sites = Sites.for_model(model)
    size = backbone.data_config["input_size"][-1]
    image = torch.randn(1, 3, size, size, device=device)
    target = torch.tensor([7], device=device)
    report_set = torch.randn(args.locality, 3, size, size, device=device)
    pool = TensorPool(torch.randn(64, 3, size, size))
    config = make_config("random", rho=0.1, max_steps=args.steps, stop_loss=0.0, lr=1e-5)

    print(
        f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{sites.n_entries} mask entries, {args.repeats} repeats, TF32 {args.tf32}"
    )
    print("| phase | precision | seconds | peak CUDA MiB |")
    print("|---|---|---:|---:|")
    for precision in ("fp32", "bf16"):
        with autocast(device, precision):
            task = EditTask.build(model, sites, image, target)
            phases = [
                (f"edit, {args.steps} steps, rho 0.1", partial(run_edit, "random", task, config)),
                (f"report: {args.locality} images", partial(evaluate, task, report_set)),
            ]
            # per-episode weight changes: auto = dense where the factors are larger (ViT-B);
            # the factors row shows what that choice saves, side by side
            forms = ("auto", "factors") if precision == "fp32" else ("auto",)
            for form in () if args.no_meta else forms:
                trainer = MetaTrainer(
                    backbone,
                    sites,
                    pool,
                    build_hypernetwork(model, sites),
                    MetaTrainConfig(iterations=1_000, batch=args.batch, inner_lr=0.1),
                    delta_form=form,
                )
                name = f"meta-training iteration, B={args.batch}, deltas {form}"
                phases.append((name, trainer.step))
            for name, fn in phases:
                seconds, peak = timed(fn, device, args.repeats)
                print(f"| {name} | {precision} | {seconds:.3f} | {peak:.0f} |", flush=True)


def evaluate(task: EditTask, images: torch.Tensor) -> None:
    with torch.no_grad():
        predictions(task.split, task.split.prefix(images), batch_size=128)


if __name__ == "__main__":
    main()
