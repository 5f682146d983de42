"""make run registers every shipped world beside demo-vit."""

from __future__ import annotations

from models.store.manifest import BackboneManifest
from models.store.store import Store
from models.worlds import tiny_imagenet as tin
from workers.registration import register_builtin


def test_make_run_registers_the_world_beside_demo_vit(tmp_path) -> None:
    entries = {e.name: e for e in register_builtin(Store(tmp_path))}
    entry = entries["tiny-imagenet-vit"]
    assert set(entries) == {"demo-vit", "tiny-imagenet-vit"}
    assert entry.benchmark["kind"] == "world" and entry.benchmark["world"] == "tiny-imagenet"
    assert entry.num_classes == 200 and entry.class_names[0] == "Egyptian cat"
    assert (
        entry.weights_sha256 == BackboneManifest.read(tin.ASSETS / "backbone.json").weights_sha256
    )


def test_each_model_edits_at_its_backbones_default_density(tmp_path) -> None:
    # tiny-imagenet-vit's backbone records rho 0.02 (scripts/choose_default_rho.py on its tuning
    # half); demo-vit's records none and keeps the paper's 0.1
    entries = {e.name: e for e in register_builtin(Store(tmp_path))}
    shipped = BackboneManifest.read(tin.ASSETS / "backbone.json").extra["edit_defaults"]["rho"]
    for method in ("where2edit", "saliency", "random"):
        assert entries["tiny-imagenet-vit"].methods[method].options["rho"] == shipped
        assert entries["demo-vit"].methods[method].options["rho"] == 0.1
    assert "rho" not in entries["tiny-imagenet-vit"].methods["ft"].options
