"""Shared fixtures and helpers: small timm backbones built here, and the shipped demo backbone."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests

import pytest
import timm
import torch
from torch import nn

from models.backbones import Backbone, load_backbone
from models.store.manifest import BackboneManifest

# One intra-op thread: tests share 2 cores with worker subprocesses, and OpenMP threads that wait on
# each other make small ops 5-10x slower than one thread does.
torch.set_num_threads(1)

TINY_OVERRIDES = dict(
    img_size=28,
    patch_size=7,
    in_chans=1,
    embed_dim=32,
    depth=4,
    num_heads=2,
    mlp_ratio=2.0,
    num_classes=10,
)
TINY_VIT_OVERRIDES = dict(
    img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=10
)
"""The plain tiny ViT of :func:`tiny_vit` (timm's default MLP ratio 4: hidden 128 per site)."""
TINY_CFG = dict(
    input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="bilinear"
)


def tiny_manifest(**changes: object) -> BackboneManifest:
    """A 4-block, width-32 ViT on 28 px grey images: random init, builds in milliseconds."""
    base = BackboneManifest(
        name="tiny-vit",
        timm_name="vit_small_patch16_224",
        overrides=dict(TINY_OVERRIDES),
        pretrained_cfg_overlay=dict(TINY_CFG),
    )
    return BackboneManifest(**{**base.__dict__, **changes})


def tiny_vit(seed: int = 0) -> nn.Module:
    """A frozen eval-mode 4-block, width-32 ViT on 28 px grey images, random init from ``seed``."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", **TINY_VIT_OVERRIDES)
    return model.eval().requires_grad_(False)


def run_capped(code: str, gib: int = 6) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` in a child whose address space is capped at ``gib`` GiB: a test of a
    refusal that must come before any large allocation then fails with MemoryError if the
    refusal regresses, instead of running the test machine out of memory."""
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({gib} << 30, {gib} << 30))\n"
    return subprocess.run(
        [sys.executable, "-c", cap + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(tiny_manifest())


@pytest.fixture(scope="session")
def demo_backbone() -> Backbone:
    from models.worlds.demo import load_demo_backbone

    return load_demo_backbone()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 emulator (moto's server mode, tests/s3_server.py) on loopback for the session; the
    AWS_* variables its clients and child processes sign with are set for the session."""
    from tests.s3_server import CREDENTIALS, s3_server

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with s3_server() as endpoint:
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """A fresh bucket of the session's S3 emulator, as a store URL (with a key prefix)."""
    from tests.s3_server import new_bucket

    bucket = f"vitedit-{secrets.token_hex(6)}"
    new_bucket(s3_endpoint, bucket)
    return f"s3://{bucket}/store"
