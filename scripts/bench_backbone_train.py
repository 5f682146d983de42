"""Training throughput of Tiny-ImageNet backbone candidates, side by side in one run (issue 11).

Each candidate is the world's backbone (``models/worlds/tiny_imagenet.py``: depth 6, 4 heads, 32 px)
at a stem, width, token count and precision (``vitedit world build tiny-imagenet --stem --width
--tokens --precision``); one training step is the trainer's own (``Trainer.train_step``:
augmentation, forward, label-smoothed cross-entropy, backward, AdamW step) on a batch of random
images (time does not depend on the pixels), on ``--device`` (default cpu). Prints a table of img/s and s/epoch (80,000
training images) for each candidate; the ratio column is against the first one.

    .venv/bin/python scripts/bench_backbone_train.py --threads 1 \
        --candidates conv:128:16:fp32,conv:128:64:fp32,conv:192:16:bf16

A candidate is ``stem:width:tokens:precision`` (tokens 16: a 4x4 grid, 64: 8x8).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.backbones import create_model, resolve_device
from models.precision import autocast
from models.worlds.tiny_imagenet import augment, manifest, to_input
from models.worlds.training import TrainConfig, Trainer

EPOCH_IMAGES = 80_000  # 400 per class x 200: the backbone's training split


def parse_candidate(text: str) -> tuple[str, int, int, str]:
    try:
        stem, width, tokens, precision = text.split(":")
        return stem, int(width), int(tokens), precision
    except ValueError:
        raise SystemExit(f"candidate {text!r} is not stem:width:tokens:precision") from None


def step_seconds(
    candidate: tuple[str, int, int, str], batch: int, warmup: int, steps: int, device: str
):
    stem, width, tokens, precision = candidate
    names = [str(i) for i in range(200)]
    model = create_model(manifest(names, weights=None, stem=stem, width=width, tokens=tokens))
    cfg = TrainConfig(batch_size=batch, precision=precision)
    trainer = Trainer(model, cfg, to_input, augment, device=device)
    x = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 200, (batch,))
    params = sum(p.numel() for p in model.parameters())
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step(x, y).item()  # .item() waits for a GPU to finish the step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return params, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--candidates", default="conv:128:16:fp32,conv:128:64:fp32,conv:192:16:bf16"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"--device {exc}") from None
    candidates = [parse_candidate(c) for c in args.candidates.split(",")]
    for stem, width, tokens, precision in candidates:  # refuse a bad one before timing any
        try:
            manifest(["0"], weights=None, stem=stem, width=width, tokens=tokens)
            autocast("cpu", precision)
        except ValueError as exc:
            raise SystemExit(f"candidate {stem}:{width}:{tokens}:{precision}: {exc}") from None
    print(
        f"device {args.device}, threads {args.threads}, batch {args.batch}, "
        f"median of {args.steps} steps"
    )
    print("| stem | width | tokens | precision | params | img/s | s/epoch | ratio |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    first = None
    for c in candidates:
        params, sec = step_seconds(c, args.batch, args.warmup, args.steps, args.device)
        rate = args.batch / sec
        first = first or rate
        print(
            f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {params / 1e6:.2f} M | "
            f"{rate:.0f} | {EPOCH_IMAGES / rate:.0f} | {rate / first:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
