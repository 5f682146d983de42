import pytest
import timm
import torch

from models.backbones import load_backbone
from models.errors import PatchError, SiteError
from models.sites import Patch, Sites, default_blocks, top_rho_mask
from tests.conftest import tiny_manifest


@pytest.mark.parametrize(
    ("depth", "expected"), [(12, (7, 8, 9)), (8, (4, 5, 6)), (24, (16, 17, 18)), (3, (0, 1, 2))]
)
def test_default_sites_are_the_three_blocks_ending_at_75_percent_depth(depth, expected):
    assert default_blocks(depth) == expected


def test_sites_order_matrices_fc1_then_fc2_per_block(tiny_backbone):
    sites = Sites.for_model(tiny_backbone.model)
    assert sites.mlps == ("blocks.1.mlp", "blocks.2.mlp", "blocks.3.mlp")
    params = [m.param for m in sites.matrices]
    assert params[:2] == ["blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"]
    assert [m.dim for m in sites.matrices] == [0, 1] * 3
    assert sites.n_entries == 2 * 3 * 64


def test_sites_out_of_range_are_a_clear_error(tiny_backbone):
    with pytest.raises(SiteError, match="out of range"):
        Sites.for_model(tiny_backbone.model, blocks=(2, 3, 4))


def test_swin_blocks_expose_their_mlps_as_sites():
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        window_size=7,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 1, 1, 1),
        num_classes=5,
    )
    sites = Sites.for_model(swin)
    assert sites.mlps == ("layers.1.blocks.0.mlp", "layers.2.blocks.0.mlp", "layers.2.blocks.1.mlp")
    assert sites.hidden == (128, 256, 256)


def test_top_rho_mask_keeps_the_global_top_fraction():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.8, 0.2, 0.7, 0.0]])
    mask = top_rho_mask(scores, 0.25)
    assert mask.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert top_rho_mask(scores, 1.0).all()
    with pytest.raises(ValueError):
        top_rho_mask(scores, 0.0)


def _edit_some_neurons(model: torch.nn.Module, sites: Sites) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in sites.params(model)]
    with torch.no_grad():
        params = sites.params(model)
        params[0][[1, 5]] += 0.3  # fc1 rows 1 and 5 of the first site
        params[3][:, [7]] -= 0.2  # fc2 column 7 of the second site
    return before


def test_patch_holds_only_changed_neurons(tiny_backbone):
    sites = Sites.for_model(tiny_backbone.model)
    before = _edit_some_neurons(tiny_backbone.model, sites)
    patch = Patch.from_diff(sites, before, [p.detach() for p in sites.params(tiny_backbone.model)])
    assert {k: v[0].tolist() for k, v in patch.entries.items()} == {
        "blocks.1.mlp.fc1.weight": [1, 5],
        "blocks.2.mlp.fc2.weight": [7],
    }
    assert patch.entries["blocks.2.mlp.fc2.weight"][1].shape == (32, 1)


def test_patch_round_trip_through_safetensors_reproduces_edited_logits_exactly(
    tiny_backbone, tmp_path
):
    model = tiny_backbone.model
    sites = Sites.for_model(model)
    x = torch.randn(4, 1, 28, 28)
    before = _edit_some_neurons(model, sites)
    edited_logits = model(x)
    patch = Patch.from_diff(sites, before, [p.detach() for p in sites.params(model)])
    patch.save(tmp_path / "patch.safetensors", {"method": "test"})
    loaded, meta = Patch.load(tmp_path / "patch.safetensors")
    assert meta["method"] == "test"
    torch.manual_seed(0)  # the tiny_backbone fixture's seed: a fresh, unedited copy
    fresh = load_backbone(tiny_manifest()).model
    assert not torch.equal(fresh(x), edited_logits)
    backup = loaded.apply(fresh)
    assert torch.equal(fresh(x), edited_logits)
    loaded.revert(fresh, backup)
    for p, w in zip(sites.params(fresh), before, strict=True):
        assert torch.equal(p, w)


def test_patch_for_another_model_is_rejected(tiny_backbone):
    sites = Sites.for_model(tiny_backbone.model)
    bad = Patch(sites, {"blocks.1.mlp.fc1.weight": (torch.tensor([0]), torch.zeros(1, 99))})
    with pytest.raises(PatchError, match="another model"):
        bad.apply(tiny_backbone.model)
    stray = Patch(sites, {"head.weight": (torch.tensor([0]), torch.zeros(1, 32))})
    with pytest.raises(PatchError, match="not one of the sites"):
        stray.apply(tiny_backbone.model)


def test_non_patch_file_is_rejected(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(PatchError, match="not a readable"):
        Patch.load(path)
