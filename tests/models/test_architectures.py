"""The timm models this project registers (models/architectures.py) load from a manifest like
any timm model: by name, with overrides, from safetensors weights."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.backbones import create_model, load_backbone
from models.store.manifest import BackboneManifest, sha256_file
from models.worlds import tiny_imagenet as tin

HYBRIDS = {"conv-stage": "vitedit_hybrid_r2", "conv-stages": "vitedit_hybrid_r22"}


def _small(stem: str) -> BackboneManifest:
    m = tin.manifest([f"class {i}" for i in range(4)], weights=None, stem=stem)
    small = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4}
    return replace(m, overrides={**m.overrides, **small})


@pytest.mark.parametrize("stem", sorted(HYBRIDS))
def test_each_hybrid_is_a_timm_model_with_its_own_default_config(
    caplog: pytest.LogCaptureFixture, stem: str
) -> None:
    assert set(HYBRIDS.values()) <= set(timm.list_models("vitedit_*"))
    manifest = _small(stem)
    assert manifest.timm_name == HYBRIDS[stem]
    with caplog.at_level(logging.WARNING):
        model = create_model(manifest)
    assert "No pretrained configuration" not in caplog.text  # its default_cfgs were registered
    assert model.pretrained_cfg["architecture"] == HYBRIDS[stem]
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # the manifest's overlay wins


@pytest.mark.parametrize("stem", sorted(HYBRIDS))
def test_its_weights_round_trip_through_safetensors(tmp_path: Path, stem: str) -> None:
    manifest = _small(stem)
    model = create_model(manifest).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = load_backbone(replace(manifest, weights=str(path), weights_sha256=sha256_file(path)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model(x), model(x))
    assert any(".stages.0.blocks.1." in k for k in model.state_dict())  # the stage's weights
