import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from PIL import Image
from safetensors.torch import save_file

from models.backbones import backbone_from_name, load_backbone
from models.errors import IntegrityError, UnknownBackboneError, WeightsMismatchError
from models.store.manifest import BackboneManifest, sha256_file
from tests.conftest import TINY_OVERRIDES, run_capped, tiny_manifest


def _save(model: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_local_weights_round_trip_gives_identical_logits(tiny_backbone, tmp_path):
    weights = _save(tiny_backbone.model, tmp_path / "w.safetensors")
    manifest = tiny_manifest(weights=str(weights), weights_sha256=sha256_file(weights))
    again = load_backbone(manifest)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(again.model(x), tiny_backbone.model(x))
    assert again.weights_sha256 == sha256_file(weights)


def test_wrapper_prefix_in_weight_keys_is_stripped(tiny_backbone, tmp_path):
    weights = _save(tiny_backbone.model, tmp_path / "w.safetensors", prefix="module.")
    again = load_backbone(tiny_manifest(weights=str(weights)))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again.model(x), tiny_backbone.model(x))


def test_manifest_weights_path_is_relative_to_manifest_folder(tiny_backbone, tmp_path):
    _save(tiny_backbone.model, tmp_path / "w.safetensors")
    tiny_manifest(weights="w.safetensors").write(tmp_path / "backbone.json")
    manifest = BackboneManifest.read(tmp_path / "backbone.json")
    assert manifest.weights_path == tmp_path / "w.safetensors"
    assert load_backbone(manifest).num_classes == 10


def test_unknown_timm_name_is_a_clear_error():
    with pytest.raises(UnknownBackboneError, match="no model named"):
        load_backbone(tiny_manifest(timm_name="vit_does_not_exist"))


def test_weights_of_another_shape_are_rejected(tmp_path):
    other = backbone_from_name("vit_small_patch16_224", **{**TINY_OVERRIDES, "depth": 2})
    weights = _save(other.model, tmp_path / "w.safetensors")
    with pytest.raises(WeightsMismatchError, match="missing"):
        load_backbone(tiny_manifest(weights=str(weights)))


def test_overrides_far_larger_than_the_weights_are_refused_before_allocating(tmp_path):
    # a model of ~800 GB asked for by the overrides, beside a small weights file: refused from
    # the shapes (built on the meta device), in a child that cannot allocate more than 6 GiB
    weights = _save(load_backbone(tiny_manifest()).model, tmp_path / "w.safetensors")
    manifest = tiny_manifest(weights=str(weights))
    huge = {**manifest.overrides, "embed_dim": 16384, "depth": 64}
    BackboneManifest(**{**manifest.__dict__, "overrides": huge}).write(tmp_path / "backbone.json")
    done = run_capped(
        f"""
        from pathlib import Path
        from models.backbones import load_backbone
        from models.errors import WeightsMismatchError
        from models.store.manifest import BackboneManifest
        try:
            load_backbone(BackboneManifest.read(Path({str(tmp_path / "backbone.json")!r})))
        except WeightsMismatchError as exc:
            print("refused:", exc)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "does not fit this model" in done.stdout


def test_a_depth_far_beyond_the_weights_is_refused_in_well_under_a_second(tmp_path):
    # depth 12,000 took a worker 54 s to build on the meta device before its shapes were
    # compared: the build now stops once it has made more tensors than the file could fit
    weights = _save(load_backbone(tiny_manifest()).model, tmp_path / "w.safetensors")
    manifest = tiny_manifest(weights=str(weights), overrides={**TINY_OVERRIDES, "depth": 100_000})
    start = time.monotonic()
    with pytest.raises(WeightsMismatchError, match=r"made more than \d+ tensors and stopped"):
        load_backbone(manifest)
    assert time.monotonic() - start < 2


def test_a_legitimate_deeper_model_still_loads(tmp_path):
    # the build's limit is counted from the file: a model deeper than the tests' tiny one loads
    deeper = {**TINY_OVERRIDES, "depth": 12}
    model = backbone_from_name("vit_small_patch16_224", **deeper).model
    weights = _save(model, tmp_path / "w.safetensors")
    loaded = load_backbone(tiny_manifest(weights=str(weights), overrides=deeper))
    assert len(loaded.model.blocks) == 12


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_weights_are_refused_naming_a_tensor_and_its_dtype(tiny_backbone, tmp_path, dtype):
    """int32 weights were cast to float on load: a model that answers one class for everything."""
    state = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"holds '\S+' as (I32|I8|BOOL) \(and \d+ more"):
        load_backbone(tiny_manifest(weights=str(tmp_path / "w.safetensors")))


def test_half_precision_weights_still_load(tiny_backbone, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    loaded = load_backbone(tiny_manifest(weights=str(tmp_path / "w.safetensors")))
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not opened")
    with pytest.raises(WeightsMismatchError, match=r"only \.safetensors"):
        load_backbone(tiny_manifest(weights=str(path)))


def test_sha256_mismatch_is_detected(tiny_backbone, tmp_path):
    weights = _save(tiny_backbone.model, tmp_path / "w.safetensors")
    with pytest.raises(IntegrityError):
        load_backbone(tiny_manifest(weights=str(weights), weights_sha256="0" * 64))


def test_eval_transform_converts_any_image_to_the_model_input(tiny_backbone):
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    batch = tiny_backbone.preprocess([rgb, rgb.convert("L")])
    assert batch.shape == (2, 1, 28, 28)
    assert torch.allclose(batch[0], batch[1], atol=0.02)


def test_pretrained_without_hub_fails_fast_with_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(LocalEntryNotFoundError, match="local cache") as caught:
        backbone_from_name("vit_tiny_patch16_224", pretrained=True, num_classes=10)
    assert isinstance(caught.value.__cause__, OfflineModeIsEnabled)  # not a network failure
    assert time.monotonic() - start < 30  # without the flag the hub is retried for ~46 s


def test_resolve_device_names_what_it_refuses():
    from models.backbones import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name, why in [
        ("gpu0", "not a torch device"),
        ("../x", "not a torch device"),
        ("mps", "only cpu and cuda"),
    ]:
        with pytest.raises(ValueError, match=why):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda:3")
