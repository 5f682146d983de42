"""timm architectures this project adds, registered with timm's ``register_model`` so that a
backbone manifest names them like any timm model (``timm_name``), and ``timm.create_model``
builds them with the same overrides. models/backbones.py imports this module, so every process
that loads a backbone knows them.

``vitedit_hybrid_r2``: timm's R+ViT hybrid with one ResNetV2 stage of 2 bottleneck blocks (256
channels, stride 1) between the convolutional stem and the patch projection; the hybrid
``vit_tiny_r_s16_p8_224`` has no stage, ``vit_small_r26_s32_224`` has four. Built the way timm
builds its own hybrids. The Tiny-ImageNet world's ``--stem conv-stage`` (docs/worlds.md).

``vitedit_hybrid_r22``: the same with two stages of 2 bottleneck blocks each (256 channels at
stride 1, then 512 at stride 2: stride 8 in all). The Tiny-ImageNet world's ``--stem conv-stages``.

No pretrained weights exist for either: they are trained from scratch here.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid, _resnetv2

# timm's register_model reads the module's ``default_cfgs`` (without one, every build warns that
# the model has no pretrained configuration). Its defaults match timm's hybrids'; a manifest's
# pretrained_cfg_overlay sets the input size, mean and std of the data it was trained on.
_UNTRAINED_CFG = {
    "url": "",
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.9,
    "interpolation": "bicubic",
    "fixed_input_size": True,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "first_conv": "patch_embed.backbone.stem.conv",
    "classifier": "head",
}
default_cfgs = generate_default_cfgs(
    {
        f"{name}.untrained": dict(_UNTRAINED_CFG)
        for name in ("vitedit_hybrid_r2", "vitedit_hybrid_r22")
    }
)


def _hybrid(
    name: str, layers: tuple[int, ...], cells: int, pretrained: bool, **kwargs: Any
) -> VisionTransformer:
    """timm's hybrid construction: a ResNetV2 of ``layers`` (its stem and stages), then a ViT
    (defaults of ViT-Ti: width 192, depth 12, 3 heads; patches of ``cells`` x ``cells`` cells of
    the map, unless ``patch_size`` says otherwise)."""
    backbone = _resnetv2(layers=layers, **kwargs)
    model_args: dict[str, Any] = dict(patch_size=cells, embed_dim=192, depth=12, num_heads=3)
    return _create_vision_transformer_hybrid(
        name, backbone=backbone, pretrained=pretrained, **(model_args | kwargs)
    )


@register_model
def vitedit_hybrid_r2(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """R+ViT hybrid: a ResNetV2 stem and one stage of 2 bottleneck blocks (stride 4 in all), then a
    ViT (defaults of ViT-Ti; 2x2 patches of the stage's map)."""
    return _hybrid("vitedit_hybrid_r2", (2,), 2, pretrained, **kwargs)


@register_model
def vitedit_hybrid_r22(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """R+ViT hybrid: a ResNetV2 stem and two stages of 2 bottleneck blocks (stride 8 in all), then
    a ViT (defaults of ViT-Ti; each cell of the second stage's map is a token)."""
    return _hybrid("vitedit_hybrid_r22", (2, 2), 1, pretrained, **kwargs)
