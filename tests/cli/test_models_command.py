"""`vitedit models add/list/remove`: a model's files copied into the store under store-relative
keys (resolved on any mount of the store), refused with the reason when it would not load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli.main import main
from models.backbones import load_backbone
from models.errors import (
    DataError,
    HypernetworkMismatchError,
    StoreError,
    UnknownBackboneError,
)
from models.store.manifest import BackboneManifest, read_json, sha256_file
from models.store.store import Store
from tests.redis_server import make_benchmark, make_tiny_backbone
from workers.model_files import add_model


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_backbone(tmp_path / "mine")


def test_add_copies_the_files_and_registers_store_relative_keys(tiny, tmp_path, capsys) -> None:
    bench = make_benchmark(tmp_path / "bench")
    root = tmp_path / "store"
    argv = ["models", "add", "my-vit", "--backbone", str(tiny), "--store", str(root)]
    argv += ["--groups", bench["groups"], "--locality", bench["locality"]]
    assert main(argv) == 0
    assert "added my-vit" in capsys.readouterr().out

    raw = read_json(root / "models.json")["my-vit"]
    assert raw["backbone"] == "models/my-vit/base/backbone.json"  # a key, not this host's path
    assert raw["benchmark"]["groups"] == "models/my-vit/base/benchmark/edit_groups"
    assert raw["default_method"] == "saliency"  # no hypernetwork

    # another host mounts the store elsewhere: the same registry resolves there
    moved = tmp_path / "elsewhere" / "store"
    shutil.copytree(root, moved)
    shutil.rmtree(tiny.parent)  # the user's own copy is not needed any more
    entry = Store(moved).model("my-vit")
    assert entry.backbone == str(moved / "models/my-vit/base/backbone.json")
    backbone = load_backbone(BackboneManifest.read(entry.backbone))
    assert backbone.weights_sha256 == entry.weights_sha256
    assert Path(entry.benchmark["locality"]).is_dir()

    assert main(["models", "list", "--store", str(moved)]) == 0
    assert "my-vit" in capsys.readouterr().out
    assert main(["models", "remove", "my-vit", "--store", str(moved)]) == 0
    assert Store(moved).models() == [] and not (moved / "models" / "my-vit").exists()
    capsys.readouterr()
    assert main(["models", "list", "--store", str(moved)]) == 0  # an empty store says so
    empty = capsys.readouterr()
    assert empty.out == "" and f"no models are registered in the store at {moved}" in empty.err
    with pytest.raises(SystemExit, match="there is no store at"):
        main(["models", "list", "--store", str(tmp_path / "nowhere")])
    assert not (tmp_path / "nowhere").exists()  # a listing does not create a store


def _with(tiny: Path, change) -> Path:
    """A copy of the tiny backbone whose weights or manifest ``change`` altered."""
    folder = tiny.parent / "changed"
    folder.mkdir()
    weights = load_file(str(tiny.parent / "tiny.safetensors"))
    manifest = BackboneManifest.read(tiny)
    weights, fields = change(weights, dict(manifest.__dict__))
    save_file(weights, str(folder / "w.safetensors"))
    fields.update(weights="w.safetensors", base_dir=None)
    fields.setdefault("weights_sha256", sha256_file(folder / "w.safetensors"))
    BackboneManifest(**fields).write(folder / "b.json")
    return folder / "b.json"


def _nan(weights, fields):
    key = next(k for k in weights if k.endswith("mlp.fc1.weight"))
    weights[key][0, 0] = float("nan")
    return weights, {k: v for k, v in fields.items() if k != "weights_sha256"}


def _unknown_timm(weights, fields):
    return weights, {**fields, "timm_name": "vit_nonexistent_patch3"}


def _wrong_sha(weights, fields):
    return weights, {**fields, "weights_sha256": "0" * 64}


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        (_nan, DataError, "NaN or inf"),
        (_unknown_timm, UnknownBackboneError, "vit_nonexistent_patch3"),
        (_wrong_sha, DataError, "drop its weights_sha256"),
    ],
)
def test_a_model_that_would_not_load_is_refused_and_nothing_is_stored(
    tiny, tmp_path, change, error, says
) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(error, match=says):
        add_model(store, "bad", _with(tiny, change))
    assert store.models() == []
    assert not (store.root / "models" / "bad").exists()
    assert list((store.root / "tmp").iterdir()) == []


def test_a_hypernetwork_of_another_backbone_is_refused(tiny, tmp_path) -> None:
    from models.hypernet.metatrain import build_hypernetwork
    from models.sites import Sites

    other = load_backbone(BackboneManifest.read(_with(tiny, _shifted)))
    sites = Sites.for_model(other.model)
    build_hypernetwork(other.model, sites).save(tmp_path / "hn", other, sites)
    store = Store(tmp_path / "store")
    with pytest.raises(HypernetworkMismatchError):
        add_model(store, "mine", tiny, hypernetwork=tmp_path / "hn")
    assert store.models() == []


def _shifted(weights, fields):
    key = next(k for k in weights if k.endswith("mlp.fc1.weight"))
    weights[key] = weights[key] + 1.0
    return weights, {k: v for k, v in fields.items() if k != "weights_sha256"}


def test_replace_and_remove_respect_versions(tiny, tmp_path) -> None:
    store = Store(tmp_path / "store")
    add_model(store, "mine", tiny)
    with pytest.raises(StoreError, match="--replace"):
        add_model(store, "mine", tiny)
    (store.root / "models" / "mine" / "versions" / "v1").mkdir(parents=True)  # a version exists
    with pytest.raises(StoreError, match="other base weights"):
        add_model(store, "mine", _with(tiny, _shifted), replace=True)
    with pytest.raises(StoreError, match="has versions"):
        store.unregister_model("mine")
    store.unregister_model("mine", purge=True)
    assert store.models() == []


def test_a_replace_the_registry_refuses_late_puts_the_old_files_back(tiny, tmp_path) -> None:
    """A version of the old weights published while the new files were staged (an edit ending
    during a replace): the registry refuses the new weights, and the files go back to the ones
    its entry names (they were deleted, and the entry then named weights that were gone)."""
    store = Store(tmp_path / "store")
    before = add_model(store, "mine", tiny)
    bench = make_benchmark(tmp_path / "bench")

    def a_version_meanwhile(*staged: Path) -> None:
        (store.root / "models" / "mine" / "versions" / "v1").mkdir(parents=True)

    with pytest.raises(StoreError, match="other base weights"):
        add_model(
            store,
            "mine",
            _with(tiny, _shifted),
            groups=Path(bench["groups"]),
            locality=Path(bench["locality"]),
            replace=True,
            calibrate=a_version_meanwhile,
        )
    entry = store.model("mine")
    assert entry.weights_sha256 == before.weights_sha256 and not entry.benchmark
    assert sha256_file(BackboneManifest.read(entry.backbone).weights_path) == entry.weights_sha256
    assert not (store.model_files("mine") / "benchmark").exists()  # the new copy's
    assert list((store.root / "tmp").iterdir()) == []


def test_a_new_model_whose_entry_cannot_be_written_leaves_no_files(
    tiny, tmp_path, monkeypatch
) -> None:
    store = Store(tmp_path / "store")

    def disk_full(entry) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "register_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        add_model(store, "mine", tiny)
    assert not (store.root / "models" / "mine").exists()
    assert list((store.root / "tmp").iterdir()) == []


def test_add_with_calibrate_records_the_measured_setting_in_the_stored_manifest(
    demo_as_user, tmp_path, capsys
) -> None:
    user = demo_as_user
    root = tmp_path / "store"
    argv = ["models", "add", "my-vit", "--backbone", str(user.manifest), "--store", str(root)]
    argv += ["--calibrate", "--images", str(user.images)]
    argv += ["--groups", str(user.groups), "--locality", str(user.locality)]
    argv += ["--lrs", "1e-3", "--stop-losses", "0.5", "--inner-lrs", "0.1"]
    argv += ["--max-groups", "2", "--edits", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chosen: lr 0.001, max steps 50, stop CE 0.5" in out and "added my-vit" in out

    stored = BackboneManifest.read(Store(root).model("my-vit").backbone)
    assert stored.extra["edit_defaults"] == {"lr": 1e-3, "max_steps": 50, "stop_loss": 0.5}
    assert stored.extra["meta_defaults"] == {"inner_lr": 0.1}
    assert "--calibrate" in stored.extra["calibration"]["command"]
    assert "calibration" not in BackboneManifest.read(user.manifest).extra  # untouched


def test_calibrate_without_a_benchmark_is_refused_before_anything_is_stored(tiny, tmp_path):
    root = tmp_path / "store"
    with pytest.raises(DataError, match="calibration needs the benchmark"):
        add_model(Store(root), "my-vit", tiny, calibrate=lambda *paths: None)
    assert Store(root).models() == []


@pytest.fixture(scope="module")
def remote(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """A real API process (uvicorn) with keys, an admin tenant, and a worker, on an empty store."""
    from cli import launcher
    from tests.redis_server import db_url, worker_process

    url = db_url(redis_url, 12)
    store = Store(tmp_path_factory.mktemp("remote") / "store")
    env = {
        "VITEDIT_REDIS_URL": url,
        "VITEDIT_STORE": str(store.root),
        "VITEDIT_API_KEYS": "ops:k-ops,team:k-team",
        "VITEDIT_ADMIN_TENANTS": "ops",
    }
    group = launcher.ProcessGroup()
    try:
        with worker_process(url, store.root):
            yield launcher.start_api(group, env, "127.0.0.1", launcher.free_port()), store
    finally:
        group.stop()


def test_models_add_list_remove_over_http(remote, tiny, tmp_path, capsys) -> None:
    server, store = remote
    bench = make_benchmark(tmp_path / "bench")
    add = ["models", "add", "far-vit", "--backbone", str(tiny), "--server", server]
    add += ["--groups", bench["groups"], "--locality", bench["locality"]]
    missing = ["models", "add", "x", "--backbone", str(tmp_path / "none.json"), "--server", server]
    assert main(missing) == 2 and "cannot read the backbone manifest" in capsys.readouterr().err
    assert main([*add, "--api-key", "k-team"]) == 2  # not an admin tenant
    assert "VITEDIT_ADMIN_TENANTS" in capsys.readouterr().err
    assert store.models() == []

    assert main([*add, "--api-key", "k-ops"]) == 0
    assert "added far-vit on" in capsys.readouterr().out
    entry = store.model("far-vit")  # the worker copied it into the store, by store keys
    assert Path(entry.benchmark["locality"]).is_dir() and entry.default_method == "saliency"
    assert main(["models", "list", "--server", server, "--api-key", "k-team"]) == 0
    assert "far-vit" in capsys.readouterr().out
    assert main(["models", "remove", "far-vit", "--server", server, "--api-key", "k-ops"]) == 0
    assert store.models() == []


def put_in_incoming(store: Store, tiny: Path, folder: str) -> None:
    """What a team does instead of sending files: copy them into the store's incoming/."""
    target = store.root / folder
    target.mkdir(parents=True)
    manifest = BackboneManifest.read(tiny)
    shutil.copyfile(manifest.weights_path, target / "w.safetensors")
    fields = {**manifest.__dict__, "weights": "w.safetensors", "base_dir": None}
    BackboneManifest(**fields).write(target / "backbone.json")


def test_add_from_a_store_folder_here_and_over_http(remote, tiny, tmp_path, capsys) -> None:
    server, store = remote
    put_in_incoming(store, tiny, "incoming/far")
    add = ["models", "add", "from-far", "--source", "incoming/far"]
    assert main([*add, "--server", server, "--api-key", "k-ops"]) == 0
    assert "added from-far on" in capsys.readouterr().out
    assert store.model("from-far").backbone.endswith("models/from-far/base/backbone.json")
    assert main(["models", "remove", "from-far", "--server", server, "--api-key", "k-ops"]) == 0

    assert main([*add, "--store", str(store.root)]) == 0  # the same, on this host's mount
    assert "added from-far" in capsys.readouterr().out
    assert main(["models", "add", "x", "--source", "models/x", "--store", str(store.root)]) == 2
    assert "incoming/" in capsys.readouterr().err


def test_two_registrations_of_one_name_on_one_store_never_interleave(tiny, tmp_path) -> None:
    # two `vitedit models add` of one new name at once (threads here, processes in use): the
    # folder's lock makes the second wait, then find the name taken
    import threading

    store = Store(tmp_path / "store")
    start, outcomes = threading.Barrier(2), []

    def add() -> None:
        start.wait()
        try:
            outcomes.append(add_model(store, "twin", tiny).weights_sha256)
        except StoreError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=add) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("is registered" in o for o in outcomes) == 1, outcomes
    assert store.model("twin").weights_sha256 in outcomes


def test_a_spill_reading_hypernetwork_is_added_with_its_anchors(tiny, tmp_path) -> None:
    import torch

    from models.hypernet.metatrain import build_hypernetwork
    from models.hypernet.network import ANCHORS_FILE
    from models.sites import Sites

    backbone = load_backbone(BackboneManifest.read(tiny))
    sites = Sites.for_model(backbone.model)
    net = build_hypernetwork(backbone.model, sites, spill_input=True)
    net.anchor_images = torch.randn(3, *backbone.data_config["input_size"])
    net.save(tmp_path / "hn", backbone, sites)
    store = Store(tmp_path / "store")
    entry = add_model(store, "mine", tiny, hypernetwork=tmp_path / "hn")
    copied = store.root / entry.hypernetwork / ANCHORS_FILE
    assert copied.read_bytes() == (tmp_path / "hn" / ANCHORS_FILE).read_bytes()
