"""The Tiny-ImageNet world: a 200-class ViT trained here, and a benchmark shaped like the paper's.

Tiny-ImageNet-200 holds 200 ImageNet-1k synsets, 500 train + 50 val images per class, in the
official folder layout (``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG``,
``val/images/*.JPEG`` + ``val/val_annotations.txt``). The reader takes the original 64x64 set or
a 32x32 copy of it; the world is built at ``IMAGE_SIZE`` either way.

Splits (fixed by the seed, stated in docs/worlds.md):
- train: per class, a seeded choice of ``train_per_class`` train images: the backbone trains on
  these and nothing else; the CutMix pool for meta-training is drawn from them too (unlabeled);
- bench: the other train images of each class plus all 50 val images: never trained on; edit
  groups, the sensitive locality set and the held-out clean set are disjoint parts of it;
- val (10,000): the backbone's reported top-1 accuracy (val is also part of the bench pool).

The images are ImageNet's: non-commercial research and education use only (``TERMS``).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from models.backbones import Backbone, create_model, load_backbone
from models.errors import DataError
from models.hypernet.failures import FailureSet, failures_of
from models.images import IMAGE_FORMATS
from models.store.manifest import BackboneManifest, sha256_file
from models.worlds.training import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-imagenet"
IMAGE_SIZE = 32
EPOCHS = 11  # the shipped backbone's schedule
TRAIN_PER_CLASS = 400  # train images per class the backbone sees; the other 100 are bench pool
# per-channel statistics of the 100,000 train images at 32x32 (measured by ``channel_stats``)
MEAN = (0.4806, 0.4486, 0.3983)
STD = (0.2521, 0.2448, 0.259)
TERMS = (
    "Images derived from Tiny-ImageNet-200 (Stanford CS231n), a subset of ImageNet. ImageNet's "
    "terms allow non-commercial research and educational use only; the images remain the "
    "property of their owners. See https://image-net.org/download for the terms of access."
)


# --------------------------------------------------------------------------- reading the layout


def decode(source: Path | bytes) -> np.ndarray:
    """A JPEG file (or its bytes) -> uint8 (32, 32, 3); a 64-px original is resized (bicubic)."""
    try:
        with Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS
        ) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        name = source if isinstance(source, Path) else f"{len(source)} bytes"
        raise DataError(f"{name}: not a readable image ({exc})") from exc


def read_classes(root: Path) -> tuple[list[str], list[str]]:
    """(wnids in ``wnids.txt`` order, a short readable name for each from ``words.txt``)."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.exists():
        raise DataError(
            f"{root} is not a Tiny-ImageNet folder (no wnids.txt); pass the folder that holds "
            "wnids.txt, words.txt, train/ and val/"
        )
    wnids = wnids_file.read_text().split()
    words = {}
    words_file = root / "words.txt"
    if words_file.exists():
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    return wnids, [words.get(w, w) for w in wnids]


def split_files(root: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """(image files, int64 labels) of 'train' (class-major, sorted) or 'val' (annotation order)."""
    wnids, _ = read_classes(root)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        items = [
            (p, index[w])
            for w in wnids
            for p in sorted((root / "train" / w / "images").glob("*.JPEG"))
        ]
    elif split == "val":
        lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
        rows = (line.split("\t") for line in lines if line.strip())
        items = [(root / "val" / "images" / f, index[w]) for f, w, *_ in rows]
    else:
        raise DataError(f"unknown split {split!r}: 'train' or 'val'")
    if not items:
        raise DataError(f"{root}/{split} holds no images")
    return [p for p, _ in items], np.array([c for _, c in items], dtype=np.int64)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 32, 32, 3), int64 labels) of a split, in :func:`split_files` order."""
    files, labels = split_files(root, split)
    return np.stack([decode(p) for p in files]), labels


def load_cached(root: Path, work: Path) -> dict[str, np.ndarray]:
    """Both splits decoded once into ``work/tiny-imagenet-32.npz`` (a build cache, not shipped)."""
    cache = work / f"tiny-imagenet-{IMAGE_SIZE}.npz"
    if not cache.exists():
        work.mkdir(parents=True, exist_ok=True)
        log.info(
            "decoding the train and val images of %s into %s (once per work folder)", root, cache
        )
        x_train, y_train = read_split(root, "train")
        x_val, y_val = read_split(root, "val")
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
        tmp.replace(cache)
    with np.load(cache) as data:
        return {k: data[k] for k in data.files}


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images, in [0, 1] units."""
    f = x.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(f.mean(0).round(4).tolist()), tuple(f.std(0).round(4).tolist())


def train_indices(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A seeded choice of ``per_class`` train images of each class (sorted indices)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


# --------------------------------------------------------------------------- the backbone


# How pixels become the grid of tokens (4x4 by default). "patch": one linear projection of each
# 8x8 patch (timm's plain ViT). "conv": timm's R+ViT hybrid, a 7x7 stride-2 convolution (64
# channels) and a stride-2 max-pool, then a linear projection of each 2x2 cell of that 8x8 map;
# convolutional stems train faster and reach higher accuracy from scratch on small data (Xiao et al.
# 2021, "Early Convolutions Help Transformers See Better"). "conv-stage": that stem, then one
# ResNetV2 stage of 2 bottleneck blocks (256 channels) on the 8x8 map before the same projection;
# "conv-stages": that stage and a second (512 channels, stride 2), whose 4x4 map's cells are the
# tokens (models/architectures.py). All have the same blocks, FFN sites and tokens. Each stem's entry:
# its timm model and the side (px or cells) of the map it patches.
STEMS = {
    "patch": ("vit_tiny_patch16_224", IMAGE_SIZE),
    "conv": ("vit_tiny_r_s16_p8_224", IMAGE_SIZE // 4),
    "conv-stage": ("vitedit_hybrid_r2", IMAGE_SIZE // 4),
    "conv-stages": ("vitedit_hybrid_r22", IMAGE_SIZE // 8),
}
WIDTH = 128  # the shipped backbone's; FFN sites are 4 x the width
TOKENS = 16  # the shipped backbone's 4x4 grid (+ the class token); 64 = an 8x8 grid
DEFAULT_STEM = "conv"  # the shipped backbone's (docs/worlds.md: it led 9.2% to 7.4% after 2 epochs)


def manifest(
    class_names: list[str],
    weights: str | None = "backbone.safetensors",
    sha: str | None = None,
    stem: str = DEFAULT_STEM,
    width: int = WIDTH,
    tokens: int = TOKENS,
) -> BackboneManifest:
    """A timm VisionTransformer at 32 px RGB, a 4x4 token grid (17 tokens with the class token;
    ``tokens=64``: 8x8), width 128 (or ``width``: a multiple of the 4 heads), depth 6."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {sorted(STEMS)}, got {stem!r}")
    if width <= 0 or width % 4:
        raise ValueError(f"width must be a positive multiple of the 4 heads, got {width}")
    if tokens not in (16, 64):
        raise ValueError(f"tokens must be 16 (a 4x4 grid) or 64 (8x8), got {tokens}")
    timm_name, side = STEMS[stem]
    if side % math.isqrt(tokens):
        raise ValueError(f"stem {stem!r} makes a {side}x{side} map: it cannot give {tokens} tokens")
    patch = side // math.isqrt(tokens)
    return BackboneManifest(
        name="tiny-imagenet-vit",
        timm_name=timm_name,
        overrides=dict(
            img_size=IMAGE_SIZE,
            patch_size=patch,
            embed_dim=width,
            depth=6,
            num_heads=4,
            mlp_ratio=4.0,
            num_classes=200,
        ),
        pretrained_cfg_overlay=dict(
            input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
            mean=MEAN,
            std=STD,
            crop_pct=1.0,
            interpolation="bicubic",
        ),
        weights=weights,
        weights_sha256=sha,
        class_names=tuple(class_names),
        base_dir=str(ASSETS),
    )


def load_tiny_imagenet_backbone(device: torch.device | str = "cpu") -> Backbone:
    """The shipped Tiny-ImageNet backbone (``models/assets/tiny-imagenet``)."""
    return load_backbone(BackboneManifest.read(ASSETS / "backbone.json"), device)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip + a random 32-px crop of the 4-px reflect-padded image, per image.

    Nothing photometric: the benchmark's shift groups stay shifts the backbone never saw. The
    draws come from ``gen`` (a CPU generator) whatever the device of ``x``, so a GPU run draws the
    same crops and flips as a CPU run.
    """
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), generator=gen).to(x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (dy.view(n, 1) + ar_h).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 8)
    cropped = padded.gather(2, rows)
    cols = (dx.view(n, 1) + ar_w).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return cropped.gather(3, cols)


RESIZED_AREA = (0.25, 1.0)  # the crop's share of the image, for crop="resized"
RESIZED_ASPECT = (3 / 4, 4 / 3)  # its width over height


def augment_resized(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip + a random-resized crop per image: a box of a uniform share of the area
    (``RESIZED_AREA``) and a log-uniform aspect (``RESIZED_ASPECT``), anywhere inside the image,
    resampled bilinearly to the full 32 px (Szegedy et al. 2015's crop, at small-image scales).

    A stronger geometric augmentation than :func:`augment`, still nothing photometric; the draws
    come from ``gen`` whatever the device of ``x``.
    """
    n = x.shape[0]
    area = RESIZED_AREA[0] + (RESIZED_AREA[1] - RESIZED_AREA[0]) * torch.rand(n, generator=gen)
    low, high = (math.log(r) for r in RESIZED_ASPECT)
    aspect = (low + (high - low) * torch.rand(n, generator=gen)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    cx, cy = ((1 - side) * (2 * torch.rand(n, generator=gen) - 1) for side in (width, height))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)  # in normalised coordinates, where [-1, 1] spans the image
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


CROPS = {"pad": augment, "resized": augment_resized}
FIT_EVAL_IMAGES = 5_000  # training images whose top-1 each epoch records (train_accuracy)


def train_backbone(
    root: Path,
    work: Path,
    cfg: TrainConfig,
    train_per_class: int = TRAIN_PER_CLASS,
    out_dir: Path = ASSETS,
    time_budget: float | None = None,
    stop_at_step: int | None = None,
    stem: str = DEFAULT_STEM,
    width: int = WIDTH,
    tokens: int = TOKENS,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train (or resume) the backbone on the train split, on ``device`` (the data stays on the CPU,
    each batch moves there); write weights + manifest when finished."""
    torch.manual_seed(cfg.seed)
    data = load_cached(root, work)
    _, names = read_classes(root)
    idx = train_indices(data["y_train"], train_per_class, cfg.seed)
    x, y = torch.from_numpy(data["x_train"][idx]), torch.from_numpy(data["y_train"][idx])
    x_val, y_val = torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"])
    if cfg.crop not in CROPS:
        raise ValueError(f"crop must be one of {sorted(CROPS)}, got {cfg.crop!r}")
    untrained = manifest(names, weights=None, stem=stem, width=width, tokens=tokens)
    # stochastic depth acts in training only: the shipped manifest (below) does not carry it
    overrides = {**untrained.overrides, "drop_path_rate": cfg.drop_path}
    model = create_model(BackboneManifest(**{**untrained.__dict__, "overrides": overrides}))
    trainer = Trainer(model, cfg, to_input, CROPS[cfg.crop], device=device)
    ckpt = work / "backbone-checkpoint"
    trainer.resume(ckpt)
    fitted = torch.from_numpy(  # a seeded draw of the training images, top-1 each epoch
        np.random.default_rng(0).choice(len(idx), min(FIT_EVAL_IMAGES, len(idx)), replace=False)
    )
    result = trainer.fit(
        x,
        y,
        x_val,
        y_val,
        checkpoint=ckpt,
        time_budget=time_budget,
        stop_at_step=stop_at_step,
        fit_eval=(x[fitted], y[fitted]),
    )
    if not result.finished:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(weights),
        metadata={
            "trained_on": f"tiny-imagenet train, {train_per_class} per class",
            "seed": str(cfg.seed),
        },
    )
    extra = {
        "train_config": cfg.__dict__,
        "train_per_class": train_per_class,
        "train_device": torch.cuda.get_device_name(trainer.device)
        if trainer.device.type == "cuda"
        else "cpu",
        "train_seconds": round(result.seconds, 1),
        "val_accuracy": result.history[-1]["eval_accuracy"] if result.history else None,
        # top-1 on FIT_EVAL_IMAGES of its own training images: how far it memorises beyond val
        "train_accuracy": result.history[-1].get("train_accuracy") if result.history else None,
        "history": result.history,
        "schedule": trainer.schedule,  # epochs of the cosine schedule from each step on
        "terms": TERMS,
    }
    m = manifest(names, sha=sha256_file(weights), stem=stem, width=width, tokens=tokens)
    BackboneManifest(**{**m.__dict__, "extra": extra}).write(out_dir / "backbone.json")
    return result


# --------------------------------------------------------------------------- natural failures


def train_failures(
    backbone: Backbone,
    root: Path,
    seed: int = 0,
    train_per_class: int = TRAIN_PER_CLASS,
    batch: int = 1000,
) -> FailureSet:
    """The backbone's mistakes on its own train split (the seeded ``train_per_class`` images per
    class it was trained on, never the bench pool), with their true labels: the episodes of
    ``vitedit hypernet train --episodes failures``."""
    files, labels = split_files(root, "train")
    trained = train_indices(labels, train_per_class, seed)
    images = np.stack([decode(files[i]) for i in trained])
    y = labels[trained]
    model = backbone.model.eval()

    def logits(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model(to_input(torch.from_numpy(x)).to(backbone.device))

    wrong, preds = failures_of(logits, images, y, batch)
    meta = {
        "world": "tiny-imagenet",
        "split": f"backbone train ({train_per_class} per class, seed {seed})",
        "split_images": len(trained),
        "train_accuracy": round(1.0 - len(wrong) / len(trained), 5),
        "failures": len(wrong),
        "backbone_sha256": backbone.weights_sha256,
        "seed": seed,
        "train_per_class": train_per_class,
    }
    return FailureSet(images[wrong], y[wrong], preds, trained[wrong].astype(np.int64), meta)
