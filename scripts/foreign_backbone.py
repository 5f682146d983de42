"""A new user's ViT, end to end: train it, register it with calibration, meta-train its
hypernetwork, serve it, edit it over HTTP and open the version's review page.

The backbone is one no part of vitedit was built around: timm's *distilled* DeiT
(``deit_tiny_distilled_patch16_224``: a class token and a distillation token, two heads averaged
at inference), shrunk to 28-px grey Fashion-MNIST (patch 7, width 96, depth 6), trained by the
plain PyTorch loop below (the user's code, not ours). Its benchmark is derived the way a user
would: its own test-set failures grouped by (true, predicted) class, and its lowest-margin correct
test images as the locality set, written in the paper's folder layout. Every later step is the
README's commands, run as subprocesses, each timed:

    apt-get install dataset-fashion-mnist          # Debian's copy, read from /usr/share/datasets
    .venv/bin/python scripts/foreign_backbone.py --out /tmp/foreign [--epochs 2] [--meta-minutes 3]

It prints a table of the steps with their seconds and the figures a user would look at, and
leaves everything under ``--out`` (the store, the logs, the review page's HTML).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

FASHION = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
OVERRIDES = dict(
    img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10
)
VENV_BIN = Path(sys.executable).parent
STEPS: list[tuple[str, float, str]] = []


def read(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def to_input(x: np.ndarray) -> torch.Tensor:
    return ((torch.tensor(x).float() / 255.0 - MEAN) / STD).unsqueeze(1)


def step(name: str, start: float, what: str = "") -> None:
    STEPS.append((name, time.perf_counter() - start, what))
    print(f"--- {name}: {STEPS[-1][1]:.1f} s {what}", flush=True)


def train(out: Path, epochs: int) -> Path:
    """The user's own training loop; writes the manifest + safetensors vitedit reads."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", **OVERRIDES)
    x, y = read("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batches = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=batches)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // 128):
            idx = order[i * 128 : (i + 1) * 128]
            logits = model(to_input(x[idx]))  # train mode: (cls head + dist head) / 2 as well
            loss = F.cross_entropy(logits, torch.tensor(y[idx]), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    model.eval()
    folder = out / "my-vit"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "backbone.safetensors")
    manifest = {
        "name": "my-deit",
        "timm_name": "deit_tiny_distilled_patch16_224",
        "overrides": OVERRIDES,
        "pretrained_cfg_overlay": {
            "input_size": [1, 28, 28],
            "mean": [MEAN],
            "std": [STD],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
        "weights": "backbone.safetensors",
    }
    (folder / "backbone.json").write_text(json.dumps(manifest, indent=2))
    xt, yt = read("t10k")
    with torch.no_grad():
        pred = torch.cat([model(to_input(xt[i : i + 500])) for i in range(0, len(xt), 500)])
    acc = (pred.argmax(1).numpy() == yt).mean()
    step("train the user's DeiT (distilled)", start, f"{epochs} epochs, test top-1 {acc:.1%}")
    write_benchmark(out, xt, yt, pred.softmax(1).numpy())
    return folder / "backbone.json"


def write_benchmark(out: Path, x: np.ndarray, y: np.ndarray, probs: np.ndarray) -> None:
    """Failures grouped by (true, predicted) -> edit_groups/<true>-<pred>/; the 300 correct images
    with the smallest top-1 minus top-2 gap -> locality/; 64 other train images -> pool/."""
    pred = probs.argmax(1)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(pred != y):
        groups.setdefault((int(y[i]), int(pred[i])), []).append(int(i))
    largest = sorted((k for k, v in groups.items() if len(v) >= 10), key=lambda k: -len(groups[k]))
    for true, wrong in largest[:8]:
        folder = out / "bench" / "edit_groups" / f"{true}-{wrong}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in groups[(true, wrong)][:20]:
            Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    top2 = np.sort(probs, axis=1)[:, -2:]
    gap = np.where(pred == y, top2[:, 1] - top2[:, 0], np.inf)
    (out / "bench" / "locality").mkdir(parents=True, exist_ok=True)
    for i in np.argsort(gap)[:300]:
        Image.fromarray(x[i]).save(out / "bench" / "locality" / f"{i:05d}.png")
    (out / "pool").mkdir(exist_ok=True)
    xtr, _ = read("train")
    for i in range(64):
        Image.fromarray(xtr[-1 - i]).save(out / "pool" / f"{i:03d}.png")


def run(name: str, argv: list[str], log: Path, env: dict[str, str]) -> str:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}), see {log}:\n{done.stderr[-2000:]}")
    step(name, start)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--meta-minutes", type=float, default=3.0)
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    vitedit = str(VENV_BIN / "vitedit")
    store = out / "store"

    manifest = train(out, args.epochs)
    bench = ["--groups", str(out / "bench/edit_groups"), "--locality", str(out / "bench/locality")]
    text = run(
        "vitedit models add --calibrate",
        [
            vitedit,
            "models",
            "add",
            "my-deit",
            "--backbone",
            str(manifest),
            "--store",
            str(store),
            *bench,
            "--calibrate",
            "--images",
            str(out / "pool"),
            "--lrs",
            "1e-4,1e-3,1e-2",
            "--stop-losses",
            "0.5",
            "--inner-lrs",
            "1e-3,1e-2,1e-1,1",
        ],
        out / "models-add.log",
        env,
    )
    print("\n".join(line for line in text.splitlines() if line.startswith(("chosen", "|"))))
    stored = store / "models/my-deit/base/backbone.json"
    run(
        "vitedit hypernet train",
        [
            vitedit,
            "hypernet",
            "train",
            "--backbone",
            str(stored),
            "--images",
            str(out / "pool"),
            "--out",
            str(out / "hypernet"),
            "--iterations",
            "400",
            "--threads",
            "1",
            "--time-budget",
            str(args.meta_minutes),
            "--log-every",
            "25",
        ],
        out / "hypernet.log",
        env,
    )
    run(
        "vitedit models add --replace --hypernet",
        [
            vitedit,
            "models",
            "add",
            "my-deit",
            "--backbone",
            str(stored),
            "--store",
            str(store),
            "--hypernet",
            str(out / "hypernet"),
            "--replace",
            *bench,
        ],
        out / "models-replace.log",
        env,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    serve = subprocess.Popen(
        [
            vitedit,
            "serve",
            "--store",
            str(store),
            "--port",
            str(port),
            "--no-demo",
            "--redis-port",
            "0",
        ],
        stdout=(out / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_ready(server, serve)
        step("vitedit serve (ready)", start)
        group = sorted((out / "bench/edit_groups").iterdir())[0]
        images = sorted(group.glob("*.png"))
        label = group.name.split("-")[0]
        text = run(
            "vitedit edit over HTTP (where2edit)",
            [
                vitedit,
                "edit",
                *map(str, images[:2]),
                "--label",
                label,
                "--model",
                "my-deit",
                "--holdout",
                *map(str, images[2:]),
                "--server",
                server,
            ],
            out / "edit.log",
            env,
        )
        print(text)
        url = re.search(r"review\s+(\S+)", text)
        if url is None:
            raise SystemExit(f"no review URL in the edit's output:\n{text}")
        start = time.perf_counter()
        html = subprocess.run(["curl", "-sf", url.group(1)], capture_output=True, text=True)
        (out / "review.html").write_text(html.stdout)
        sections = re.findall(r"<h2[^>]*>([^<]+)</h2>", html.stdout)
        step("GET the review page", start, f"{len(html.stdout)} bytes, sections: {sections}")
    finally:
        serve.terminate()
        serve.wait(30)
    print("\n| step | seconds | |\n|---|---:|---|")
    for name, seconds, what in STEPS:
        print(f"| {name} | {seconds:.1f} | {what} |")


def wait_ready(server: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vitedit serve exited with {proc.returncode}")
        ok = subprocess.run(["curl", "-sf", f"{server}/readyz"], capture_output=True)
        if ok.returncode == 0:
            return
        time.sleep(1)
    raise SystemExit(f"{server} was not ready after {timeout} s")


if __name__ == "__main__":
    main()
