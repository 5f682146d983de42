"""``POST /v1/models`` and ``DELETE /v1/models/{m}`` against a real redis-server and a real
worker process: a model registered over HTTP is loaded by the worker first (refused with the
reason if it does not load), then served; what cannot be read as safetensors, JSON or a safe zip
is refused by the API before any worker sees it; with API keys only admin tenants may register."""

from __future__ import annotations

import io
import json
import pickle
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load, save

from models.store.store import Store
from models.worlds.layout import MAX_SERVED_IMAGES
from tests.redis_server import (
    benchmark_zip,
    db_url,
    make_benchmark,
    make_tiny_backbone,
    png,
    worker_process,
)
from tests.service.conftest import api

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    url = db_url(redis_url, 12)
    store = Store(tmp_path_factory.mktemp("registration") / "store")
    with (
        worker_process(url, store.root),
        api(url, store.root) as open_client,
        api(url, store.root, api_keys="ops:k-admin,team:k-user", admin_tenants="ops") as keyed,
    ):
        yield open_client, keyed, store


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("files")
    manifest_path = make_tiny_backbone(folder / "backbone")
    manifest = json.loads(manifest_path.read_text())
    weights = Path(manifest_path.parent / manifest["weights"]).read_bytes()
    bench = make_benchmark(folder / "bench")
    return {
        "manifest": json.dumps(manifest).encode(),
        "weights": weights,
        "zip": benchmark_zip(bench),
    }


def post(
    client: TestClient, name: str, files: dict[str, bytes], key: str | None = None, **extra
) -> tuple[int, dict]:
    parts = [
        ("backbone", ("my.json", files["manifest"], "application/json")),
        ("weights", ("my.safetensors", files["weights"], "application/octet-stream")),
    ]
    if "zip" in files:
        parts.append(("benchmark", ("bench.zip", files["zip"], "application/zip")))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = client.post("/v1/models", files=parts, data={"name": name, **extra}, headers=headers)
    return r.status_code, r.json() if r.content else {}


def assert_nothing_left(store: Store, name: str) -> None:
    assert name not in [m.name for m in store.models()]
    assert not (store.root / "models" / name).exists()
    assert not any((store.root / "uploads").iterdir())


def test_a_model_registered_over_http_is_served_and_removable(served, files) -> None:
    client, _, store = served
    status, body = post(client, "mine", files)
    assert status == 201, body
    assert body["name"] == "mine" and body["n_versions"] == 0
    assert body["backbone"]["weights_sha256"] == store.model("mine").weights_sha256
    assert json.loads((store.root / "models.json").read_text())["mine"]["backbone"] == (
        "models/mine/base/backbone.json"  # a store-relative key
    )
    assert not any((store.root / "uploads").iterdir())  # the worker cleaned its upload
    assert client.get("/v1/models/mine").status_code == 200

    # the worker that registered it now edits it
    r = client.post(
        "/v1/edits",
        files=[("images", ("x.png", png(5), "image/png"))],
        data={"label": "3", "model": "mine", "method": "ft", "max_steps": "20", "min_sr": "0"},
    )
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/edits/{r.json()['id']}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job

    assert post(client, "mine", files)[0] == 422  # registered: needs replace
    r = client.delete("/v1/models/mine")
    assert r.status_code == 422 and "versions" in r.json()["detail"]  # it has a version
    assert client.delete("/v1/models/mine", params={"purge": True}).status_code == 204
    assert client.get("/v1/models/mine").status_code == 404
    assert_nothing_left(store, "mine")


@pytest.mark.parametrize("keep_sha", [True, False])
def test_weights_that_do_not_load_are_refused_by_the_worker_with_the_reason(
    served, files, keep_sha
) -> None:
    client, _, store = served
    state = load(files["weights"])  # safetensors bytes: nothing unpickled
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].clone().fill_(float("nan"))
    manifest = json.loads(files["manifest"])
    if not keep_sha:
        del manifest["weights_sha256"]
    changed = {"weights": save(state), "manifest": json.dumps(manifest).encode()}
    status, body = post(client, "broken", {**files, **changed})
    assert status == 422, body
    assert ("drop its weights_sha256" if keep_sha else "NaN or inf") in body["detail"]
    assert_nothing_left(store, "broken")


def test_overrides_far_larger_than_the_weights_are_refused_with_what_to_check(
    served, files
) -> None:
    # 64 blocks of width 16384 would need ~800 GB: refused from the shapes alone (the worker
    # builds the model on the meta device first), not by running the worker out of memory
    client, _, store = served
    manifest = json.loads(files["manifest"])
    manifest["overrides"] = {**manifest["overrides"], "embed_dim": 16384, "depth": 64}
    manifest["overrides"]["num_heads"] = 16
    status, body = post(client, "huge", {**files, "manifest": json.dumps(manifest).encode()})
    assert status == 422, body
    assert "does not fit this model" in body["detail"] and "overrides" in body["detail"]
    assert_nothing_left(store, "huge")
    assert client.get("/readyz").status_code == 200  # the worker is still there


def test_a_depth_far_beyond_the_weights_is_refused_in_seconds(served, files) -> None:
    # depth 12,000 answered 422 after 54 s (1.6 GB in the worker), built on the meta device
    # before its shapes were compared: the build now stops at the tensors the file could fit
    client, _, store = served
    manifest = json.loads(files["manifest"])
    manifest["overrides"] = {**manifest["overrides"], "depth": 100_000}
    start = time.monotonic()
    status, body = post(client, "deep", {**files, "manifest": json.dumps(manifest).encode()})
    assert status == 422, body
    assert time.monotonic() - start < 5
    assert "made more than" in body["detail"] and "depth" in body["detail"], body
    assert body["error"] == "WeightsMismatchError"
    assert_nothing_left(store, "deep")


def test_integer_weights_are_refused_naming_a_tensor_and_its_dtype(served, files) -> None:
    # int32 weights were cast to float on load and registered: a model of useless answers
    client, _, store = served
    state = {k: v.to(torch.int32) for k, v in load(files["weights"]).items()}
    manifest = json.loads(files["manifest"])
    del manifest["weights_sha256"]
    changed = {"weights": save(state), "manifest": json.dumps(manifest).encode()}
    status, body = post(client, "ints", {**files, **changed})
    assert status == 422, body
    assert "as I32" in body["detail"] and "floating-point" in body["detail"], body
    assert_nothing_left(store, "ints")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"class_names": ["a", "b"]}, "names 2 classes, its model has 10"),
        ({"class_names": ["a"] * 10}, "name classes twice: ['a']"),
        (
            {"class_names": ["Cat", "cat", *"abcdefgh"]},
            "differ only by case: 'Cat' (class 0) and 'cat' (class 1)",
        ),
        ({"class_names": [*"abcdefgh", "7", "j"]}, "class 8 is named '7'"),
        ({"class_names": "abcdefghij"}, "'class_names' must be a list of strings"),
        ({"class_names": [""] * 10}, "must be non-empty strings"),
        ({"class_names": list(range(10))}, "must be non-empty strings"),
        ({"name": 5}, "'name' must be a non-empty string"),
        ({"timm_name": ["x"]}, "'timm_name' must be a non-empty string"),
        ({"extra": []}, "'extra' must be a JSON object"),
        ({"weights_sha256": 5}, "'weights_sha256' must be a string or null"),
    ],
)
def test_a_manifest_field_of_the_wrong_kind_is_refused_by_name(served, files, change, why):
    """Each of these registered (and then failed edits, or answered 500) or failed with a
    Python error message; now each is a 422 saying which field to fix."""
    client, _, store = served
    manifest = {**json.loads(files["manifest"]), **change}
    status, body = post(client, "kinds", {**files, "manifest": json.dumps(manifest).encode()})
    assert status == 422, body
    assert why in body["detail"], body
    assert_nothing_left(store, "kinds")


@pytest.mark.parametrize(
    ("defaults", "why"),
    [
        ({"max_steps": 10**9}, "option max_steps=1000000000 must be an integer in [1, 10000]"),
        ({"lr": "abc"}, "option lr='abc' must be a number in (0, 1]"),
        ({"rho": 5.0}, "option rho=5.0 must be a number in (0, 1]"),
        # 1 and 400 zeros: past a float's range (an OverflowError, a failed job), quoted short
        ({"lr": 10**400}, "option lr=1000000000000000000000000000000000000000000000000000000000"),
        ({"lr": 10**400}, "... (401 characters) must be a number in (0, 1]"),
        ({"max_steps": 10**400}, "... (401 characters) must be an integer in [1, 10000]"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_edit_defaults_out_of_bounds_are_refused_not_failed_at_every_edit(
    served, files, defaults, why
) -> None:
    """A manifest's extra.edit_defaults become the model's option defaults: one out of its
    bounds registered fine and then failed every edit that did not set the option."""
    client, _, store = served
    manifest = json.loads(files["manifest"])
    manifest["extra"] = {"edit_defaults": defaults}
    status, body = post(client, "defaults", {**files, "manifest": json.dumps(manifest).encode()})
    assert status == 422, body
    assert "extra.edit_defaults" in body["detail"] and why in body["detail"], body
    assert_nothing_left(store, "defaults")


def test_a_long_default_method_is_refused_and_not_echoed_whole(served, files) -> None:
    client, _, store = served
    status, body = post(client, "long-default", files, default_method="m" * 100_000)
    assert status == 422, body
    assert "default method 'mmmm" in body["detail"] and "(100000 characters)" in body["detail"]
    assert len(json.dumps(body)) < 2048, body
    assert_nothing_left(store, "long-default")


@pytest.mark.parametrize(
    ("overlay", "why"),
    [
        # every image resized to 28 / 0.0005 = 56,000 px before the crop: 3 GB each, an OOM
        ({"crop_pct": 0.0005}, "resizes images to 56000 px"),
        ({"input_size": [1, 60000, 60000]}, "at most 4096"),
        ({"std": [0.0]}, "each above 0"),
        (
            {"mean": [0.5, 0.5, 0.5]},
            "has mean [0.5, 0.5, 0.5]: give one finite number per channel (1)",
        ),
        # timm's 224 px default, which this 28 px ViT refuses: found at registration, not later
        ({"input_size": [1, 224, 224]}, "does not run on its data config's input 224x224"),
    ],
)
def test_a_data_config_a_worker_cannot_serve_is_refused(served, files, overlay, why) -> None:
    client, _, store = served
    manifest = json.loads(files["manifest"])
    manifest["pretrained_cfg_overlay"] = {**manifest["pretrained_cfg_overlay"], **overlay}
    status, body = post(client, "overlay", {**files, "manifest": json.dumps(manifest).encode()})
    assert status == 422, body
    assert why in body["detail"] and "pretrained_cfg_overlay" in body["detail"], body
    assert_nothing_left(store, "overlay")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"weights": b"\x80\x02}q\x00(X\x06\x00\x00\x00weightq"}, "not a safetensors file"),
        ({"manifest": b"{not json"}, "not JSON"),
        ({"manifest": b"[" * 100_000}, "not JSON"),  # deeper than the parser's recursion limit
        ({"weights": len(b"[" * 100_000).to_bytes(8, "little") + b"[" * 100_000}, "header"),
        ({"manifest": json.dumps({"name": "x"}).encode()}, "timm_name"),
        (
            {
                "manifest": json.dumps(
                    {"name": "x", "timm_name": "vit", "pretrained": True}
                ).encode()
            },
            "pretrained",
        ),
        ({"zip": b"PK\x03\x04 not really"}, "not a zip file"),
    ],
)
def test_files_the_api_cannot_read_are_refused_before_any_worker(served, files, change, why):
    client, _, store = served
    status, body = post(client, "bad", {**files, **change})
    assert status == 422, body
    assert why in body["detail"]
    assert_nothing_left(store, "bad")


def test_a_benchmark_image_too_large_to_decode_is_refused_by_name(served, files) -> None:
    # 9,000 x 9,000 flat pixels: a small PNG that would decode to 243 MB
    client, _, store = served
    buf = io.BytesIO()
    Image.new("RGB", (9000, 9000)).save(buf, format="PNG")
    bench = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(files["zip"])) as src, zipfile.ZipFile(bench, "w") as zf:
        for member in src.infolist():
            zf.writestr(member, src.read(member))
        zf.writestr("locality/huge.png", buf.getvalue())
    status, body = post(client, "big-bench", {**files, "zip": bench.getvalue()})
    assert 400 <= status < 500, body
    assert "huge.png is 9000x9000 pixels" in body["detail"], body
    assert_nothing_left(store, "big-bench")


def test_a_benchmark_of_more_images_than_a_served_model_may_hold_is_refused(served, files) -> None:
    client, _, store = served
    bench = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(files["zip"])) as src, zipfile.ZipFile(bench, "w") as zf:
        for member in src.infolist():
            zf.writestr(member, src.read(member))
        for i in range(MAX_SERVED_IMAGES):
            zf.writestr(f"locality/more/{i}.png", png(0))
    status, body = post(client, "many", {**files, "zip": bench.getvalue()})
    assert status == 413 and f"at most {MAX_SERVED_IMAGES}" in body["detail"], body
    assert_nothing_left(store, "many")


def _zip_with(files: dict[str, bytes], extra: dict[str, bytes], drop: str = "") -> bytes:
    """The test benchmark's zip with more members (and without those under ``drop``)."""
    bench = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(files["zip"])) as src,
        zipfile.ZipFile(bench, "w", zipfile.ZIP_DEFLATED) as zf,
    ):
        for member in src.infolist():
            if not drop or not member.filename.startswith(drop):
                zf.writestr(member, src.read(member))
        for name, data in extra.items():
            zf.writestr(name, data)
    return bench.getvalue()


def _stored_files(store: Store, name: str) -> list[str]:
    folder = store.root / "models" / name / "base" / "benchmark"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["upload", "source"])
def test_files_of_a_benchmark_that_are_not_images_are_not_stored(served, files, how) -> None:
    # a 200 KB zip with a 200 MB locality/junk.bin was accepted and stored with the model
    client, _, store = served
    junk = {"locality/junk.bin": bytes(20 << 20), "edit_groups/3-noise/notes.txt": b"hello"}
    if how == "upload":
        status, body = post(client, f"junk-{how}", {**files, "zip": _zip_with(files, junk)})
    else:
        put_source(store, f"incoming/junk-{how}", files)
        for name, data in junk.items():
            (store.root / f"incoming/junk-{how}/benchmark" / name).write_bytes(data)
        r = client.post(
            "/v1/models", data={"name": f"junk-{how}", "source": f"incoming/junk-{how}"}
        )
        status, body = r.status_code, r.json()
    assert status == 201, body
    stored = _stored_files(store, f"junk-{how}")
    assert len(stored) == 14 and all(name.endswith(".png") for name in stored), stored
    assert not any((store.root / "uploads").iterdir())
    assert client.delete(f"/v1/models/junk-{how}").status_code == 204


def test_a_file_named_as_an_image_that_is_not_one_is_refused_by_name(served, files) -> None:
    client, _, store = served
    zipped = _zip_with(files, {"locality/junk.png": bytes(1 << 20)})
    status, body = post(client, "fake-png", {**files, "zip": zipped})
    assert status == 422, body
    assert "junk.png: not a readable image" in body["detail"], body
    assert_nothing_left(store, "fake-png")


def test_a_benchmark_image_of_more_bytes_than_an_edits_is_refused_by_name(served, files) -> None:
    # a real PNG followed by 5 MB: Pillow reads it, and the padding was stored with the model
    client, _, store = served
    zipped = _zip_with(files, {"locality/padded.png": png(9) + bytes(5 << 20)})
    status, body = post(client, "padded", {**files, "zip": zipped})
    assert status == 413, body
    assert "'locality/padded.png' is 5" in body["detail"] and "at most 4194304" in body["detail"]
    assert_nothing_left(store, "padded")


def test_an_edit_group_of_a_class_the_model_does_not_have_is_refused(served, files) -> None:
    client, _, store = served
    groups = {f"edit_groups/99-noise/{i}.png": png(400 + i) for i in range(3)}
    zipped = _zip_with(files, groups, drop="edit_groups/5-")
    status, body = post(client, "class-99", {**files, "zip": zipped})
    assert status == 422, body
    assert "edit group '99-noise' names true class 99" in body["detail"], body
    assert "has 10 classes (0-9)" in body["detail"], body
    assert_nothing_left(store, "class-99")


def test_a_zip_member_outside_its_folder_is_refused(served, files) -> None:
    client, _, store = served
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("edit_groups/3-a/0.png", png(1))
        zf.writestr("../../escaped.png", png(2))
    status, body = post(client, "slip", {**files, "zip": buf.getvalue()})
    assert status == 422 and "outside" in body["detail"], body
    assert not (store.root.parent / "escaped.png").exists()
    assert_nothing_left(store, "slip")


def test_with_api_keys_only_admin_tenants_register_or_remove(served, files) -> None:
    _, keyed, store = served
    status, body = post(keyed, "team-model", files, key="k-user")
    assert status == 403 and "VITEDIT_ADMIN_TENANTS" in body["detail"], body
    assert_nothing_left(store, "team-model")
    assert post(keyed, "ops-model", files, key="k-admin")[0] == 201
    refused = keyed.delete("/v1/models/ops-model", headers={"Authorization": "Bearer k-user"})
    assert refused.status_code == 403
    gone = keyed.delete("/v1/models/ops-model", headers={"Authorization": "Bearer k-admin"})
    assert gone.status_code == 204


def put_source(store: Store, folder: str, files: dict[str, bytes], **manifest_changes) -> None:
    """What a team does before registering from the store: copy the files into incoming/."""
    target = store.root / folder
    (target / "benchmark").mkdir(parents=True)
    manifest = {**json.loads(files["manifest"]), "weights": "w.safetensors", **manifest_changes}
    (target / "backbone.json").write_text(json.dumps(manifest))
    (target / "w.safetensors").write_bytes(files["weights"])
    with zipfile.ZipFile(io.BytesIO(files["zip"])) as zf:
        zf.extractall(target / "benchmark")


def test_a_model_is_registered_from_a_folder_of_the_store(served, files) -> None:
    client, _, store = served
    put_source(store, "incoming/team/big-vit", files)
    r = client.post("/v1/models", data={"name": "from-store", "source": "incoming/team/big-vit"})
    assert r.status_code == 201, r.text
    entry = store.model("from-store")
    assert entry.backbone == str(store.root / "models/from-store/base/backbone.json")
    assert entry.benchmark["kind"] == "folders"  # its benchmark came along
    assert client.delete("/v1/models/from-store").status_code == 204


@pytest.mark.parametrize(
    ("source", "changes", "status", "why"),
    [
        # changes None: nothing is put in the folder
        ("models/other/base", None, 422, "not a folder of the store's incoming/ area"),
        ("incoming/../models", None, 422, "invalid source folder name"),
        ("incoming", None, 422, "not a folder of the store's incoming/ area"),
        ("incoming/nothing-here", None, 422, "has no incoming/nothing-here/backbone.json"),
        ("incoming/escape", {"weights": "../../models.json"}, 422, "relative to the manifest"),
        ("incoming/hub", {"pretrained": True}, 422, "workers never download"),
        ("incoming/garbled", {}, 422, "is not valid JSON"),
        ("incoming/bad-hypernet", {}, 422, "the hypernetwork does not load"),
        ("incoming/linked", {}, 422, "holds symbolic links (benchmark/locality/linked.png)"),
    ],
)
def test_a_source_folder_outside_incoming_or_unsafe_is_refused(
    served, files, source, changes, status, why
) -> None:
    client, _, store = served
    if changes is not None:
        put_source(store, source, files, **changes)
    if source == "incoming/linked":  # an image of another model, followed by the copy before
        other = store.root / "elsewhere.png"
        other.write_bytes(png(1))
        (store.root / source / "benchmark" / "locality" / "linked.png").symlink_to(other)
    if source == "incoming/garbled":
        (store.root / source / "backbone.json").write_text("not json")
    if source == "incoming/bad-hypernet":
        (store.root / source / "hypernet").mkdir()
        (store.root / source / "hypernet" / "hypernet.json").write_text("not json")
        (store.root / source / "hypernet" / "hypernet.safetensors").write_bytes(b"x")
    r = client.post("/v1/models", data={"name": "nope", "source": source})
    assert r.status_code == status, r.text
    assert why in r.json()["detail"]
    assert "nope" not in [m.name for m in store.models()]


class _Marker:
    """A pickle that, if ever unpickled with full pickle, leaves a file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("how", ["upload", "source"])
def test_overrides_that_would_make_timm_load_a_file_are_refused(served, files, how) -> None:
    """timm.create_model(checkpoint_path=...) reads a file with torch.load (an unpickler): a
    manifest's overrides are the model's constructor arguments, never where weights come from."""
    client, _, store = served
    folder = store.root / "incoming" / f"loader-{how}"
    marker = store.root / "unpickled"
    manifest = json.loads(files["manifest"])
    manifest["overrides"] = {**manifest["overrides"], "checkpoint_path": str(folder / "evil.pth")}
    put_source(store, f"incoming/loader-{how}", files, overrides=manifest["overrides"])
    (folder / "evil.pth").write_bytes(pickle.dumps({"state_dict": _Marker(marker)}))
    if how == "upload":
        status, body = post(client, "loader", {**files, "manifest": json.dumps(manifest).encode()})
    else:
        r = client.post("/v1/models", data={"name": "loader", "source": f"incoming/loader-{how}"})
        status, body = r.status_code, r.json()
    assert status == 422, body
    assert "may not set ['checkpoint_path']" in body["detail"], body
    assert not marker.exists()
    assert_nothing_left(store, "loader")


def _with_hypernetwork(
    files: dict[str, bytes], hn: dict[str, bytes], manifest: dict, anchors: bool = False
) -> list:
    """The multipart parts of a registration with a hypernetwork whose manifest is ``manifest``."""
    parts = [
        ("backbone", ("my.json", files["manifest"], "application/json")),
        ("weights", ("my.safetensors", files["weights"], "application/octet-stream")),
        ("hypernet", ("hypernet.json", json.dumps(manifest).encode(), "application/json")),
        (
            "hypernet_weights",
            ("h.safetensors", hn["hypernet.safetensors"], "application/octet-stream"),
        ),
    ]
    if anchors:
        spill = hn["spill-anchors.safetensors"]
        parts.append(("hypernet_anchors", ("a.safetensors", spill, "application/octet-stream")))
    return parts


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"sites": 5}, "its 'sites' must be a JSON object"),
        ({"config": None}, "its 'config' must be a JSON object"),
        ({"sites": {"mlps": "blocks.1.mlp"}}, "'sites' must hold the lists 'mlps' and 'hidden'"),
        ({"backbone": []}, "its 'backbone' must be a JSON object"),
        ({"training": []}, "its 'training' must be a JSON object"),
        ({"weights_sha256": 5}, "its 'weights_sha256' must be a string"),
        ({"backbone": {"name": "x"}}, "its 'backbone.weights_sha256' must be a string"),
    ],
)
def test_a_hypernetwork_manifest_field_of_the_wrong_kind_is_refused_by_name(
    served, files, tmp_path, change, why
) -> None:
    """Each was a 422 quoting a Python error ("'int' object is not subscriptable")."""
    client, _, store = served
    hn = _spill_hypernetwork(files, tmp_path)
    manifest = {**json.loads(hn["hypernet.json"]), **change}
    parts = _with_hypernetwork(files, hn, manifest)
    r = client.post("/v1/models", files=parts, data={"name": "hn-kinds"})
    assert r.status_code == 422, r.text
    assert why in r.json()["detail"], r.text
    assert_nothing_left(store, "hn-kinds")


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_a_hypernetwork_manifest_naming_weights_elsewhere_is_refused(
    served, files, tmp_path
) -> None:
    """hypernet.json's "weights" comes from the user: a path out of its folder (here the
    server's copy of the backbone weights) must not be what the worker reads."""
    client, _, store = served
    hn = _spill_hypernetwork(files, tmp_path)
    manifest = json.loads(hn["hypernet.json"])
    manifest["weights"] = "../../../../models/elsewhere/w.safetensors"
    parts = _with_hypernetwork(files, hn, manifest, anchors=True)
    r = client.post("/v1/models", files=parts, data={"name": "elsewhere"})
    assert r.status_code == 422, r.text
    assert "names weights '../../../../models/elsewhere/w.safetensors'" in r.json()["detail"]
    assert "hypernet.safetensors beside it" in r.json()["detail"]
    assert_nothing_left(store, "elsewhere")


def test_files_and_a_source_together_or_neither_are_refused(served, files) -> None:
    client, _, _ = served
    both = client.post(
        "/v1/models",
        files=[("backbone", ("b.json", files["manifest"], "application/json"))],
        data={"name": "nope", "source": "incoming/x"},
    )
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    neither = client.post("/v1/models", data={"name": "nope"})
    assert neither.status_code == 422 and "'source'" in neither.json()["detail"]


def _spill_hypernetwork(files: dict[str, bytes], folder: Path) -> dict[str, bytes]:
    """A --spill-input hypernetwork for the tiny backbone, saved with four anchor images."""
    import torch

    from models.backbones import load_backbone
    from models.hypernet.metatrain import build_hypernetwork
    from models.sites import Sites
    from models.store.manifest import BackboneManifest

    (folder / "backbone").mkdir(parents=True)
    (folder / "backbone" / "backbone.json").write_bytes(files["manifest"])
    name = json.loads(files["manifest"])["weights"]
    (folder / "backbone" / name).write_bytes(files["weights"])
    backbone = load_backbone(BackboneManifest.read(folder / "backbone" / "backbone.json"))
    sites = Sites.for_model(backbone.model)
    net = build_hypernetwork(backbone.model, sites, spill_input=True)
    net.anchor_images = torch.randn(4, *backbone.data_config["input_size"])
    net.save(folder / "hn", backbone, sites)
    return {f.name: f.read_bytes() for f in (folder / "hn").iterdir()}


# the Python client passes its upload timeout on, which FastAPI's in-process TestClient ignores
@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_a_spill_reading_hypernetwork_is_registered_with_its_anchors_or_refused(
    served, files, tmp_path
) -> None:
    client, _, store = served
    hn = _spill_hypernetwork(files, tmp_path)
    parts = [
        ("backbone", ("my.json", files["manifest"], "application/json")),
        ("weights", ("my.safetensors", files["weights"], "application/octet-stream")),
        ("hypernet", ("hypernet.json", hn["hypernet.json"], "application/json")),
        (
            "hypernet_weights",
            ("h.safetensors", hn["hypernet.safetensors"], "application/octet-stream"),
        ),
    ]
    r = client.post("/v1/models", files=parts, data={"name": "spill-less"})
    assert r.status_code == 422 and "needs its anchors" in r.json()["detail"], r.text
    assert "uploads" not in r.json()["detail"]  # no path of the server's store
    assert_nothing_left(store, "spill-less")
    anchors = (
        "hypernet_anchors",
        ("a.safetensors", hn["spill-anchors.safetensors"], "application/octet-stream"),
    )
    r = client.post("/v1/models", files=[parts[0], parts[1], anchors], data={"name": "lone"})
    assert r.status_code == 422 and "belongs to a hypernetwork" in r.json()["detail"], r.text
    r = client.post("/v1/models", files=[*parts, anchors], data={"name": "spilly"})
    assert r.status_code == 201, r.text
    stored = store.root / "models" / "spilly" / "base" / "hypernet" / "spill-anchors.safetensors"
    assert stored.read_bytes() == hn["spill-anchors.safetensors"]
    r = client.post(  # where2edit reads the edit's fix per spill on the stored anchors
        "/v1/edits",
        files=[("images", ("x.png", png(5), "image/png"))],
        data={
            "label": "3",
            "model": "spilly",
            "method": "where2edit",
            "max_steps": "5",
            "min_sr": "0",
        },
    )
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/edits/{r.json()['id']}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job
    assert client.delete("/v1/models/spilly", params={"purge": True}).status_code == 204
    # the Python client sends the anchors it finds beside the hypernetwork
    from cli.http_client import ViteditClient

    (tmp_path / "hn2").mkdir()
    for name, data in hn.items():
        (tmp_path / "hn2" / name).write_bytes(data)
    backbone = tmp_path / "backbone" / "backbone.json"
    model = ViteditClient("http://testserver", http=client).register_model(
        "by-client", backbone, hypernetwork=tmp_path / "hn2"
    )
    assert model.name == "by-client"
    stored = store.root / "models" / "by-client" / "base" / "hypernet" / "spill-anchors.safetensors"
    assert stored.read_bytes() == hn["spill-anchors.safetensors"]
    assert client.delete("/v1/models/by-client", params={"purge": True}).status_code == 204


@pytest.mark.parametrize("name", ["latest", "base", "v20260101-000000-abcdef"])
def test_a_model_name_a_reference_would_misread_is_refused_before_any_upload(
    served, files, name
) -> None:
    """``model=<version id>`` names a version, ``latest``/``base`` are reserved words."""
    client, _, store = served
    status, body = post(client, name, files)
    assert status == 422 and "pick another name" in body["detail"], body
    assert_nothing_left(store, name)


def _commit_version(store: Store, model: str) -> str:
    """A version of ``model`` straight into the store: what makes a model's files immutable."""
    import numpy as np
    from safetensors.numpy import save_file

    from models.store.manifest import VersionManifest, utc_now
    from models.store.store import PATCH_FILE

    with store.begin_version(model) as draft:
        save_file({"x": np.zeros(1, np.float32)}, str(draft.dir / PATCH_FILE))
        fields = dict(backbone={}, method="ft", config={}, hypernetwork=None, sites={})
        manifest = VersionManifest(
            version=draft.version, model=model, parent=None, patch=[], files={}, images=[],
            report={}, created_at=utc_now(), code_version="test", **fields,
        )  # fmt: skip
        return draft.commit(manifest).version


def test_a_replace_with_the_same_weights_may_not_change_what_defines_the_model(
    served, files
) -> None:
    """Its versions were made (and predict) on the class names, overrides and data config
    registered: a replace that changes them is refused, naming what differs; the rest may."""
    client, _, store = served
    assert post(client, "fixed", files)[0] == 201
    _commit_version(store, "fixed")
    entry = store.model("fixed")
    manifest = json.loads(files["manifest"])
    for field, value in (
        ("class_names", list(reversed(manifest["class_names"]))),
        ("pretrained_cfg_overlay", {**manifest["pretrained_cfg_overlay"], "std": [0.25]}),
        ("overrides", {**manifest["overrides"], "drop_path_rate": 0.1}),
    ):
        changed = {**manifest, field: value}
        status, body = post(
            client, "fixed", {**files, "manifest": json.dumps(changed).encode()}, replace="true"
        )
        assert status == 422, body
        assert f"{field}:" in body["detail"] and "versions are immutable" in body["detail"], body
        assert store.model("fixed") == entry
    renamed = {**manifest, "name": "a new display name", "extra": {"note": "documentation"}}
    status, body = post(
        client, "fixed", {**files, "manifest": json.dumps(renamed).encode()}, replace="true"
    )
    assert status == 201, body
    assert store.model("fixed").class_names == entry.class_names
    assert client.delete("/v1/models/fixed", params={"purge": True}).status_code == 204


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_a_hypernetwork_of_nan_weights_is_refused_even_with_a_matching_sha256(
    served, files, tmp_path
) -> None:
    import torch

    from models.store.manifest import sha256_file

    client, _, store = served
    hn = _spill_hypernetwork(files, tmp_path)
    state = load(hn["hypernet.safetensors"])
    nan = save({k: torch.full_like(v, float("nan")) for k, v in state.items()})
    (tmp_path / "nan.safetensors").write_bytes(nan)
    manifest = {
        **json.loads(hn["hypernet.json"]),
        "weights_sha256": sha256_file(tmp_path / "nan.safetensors"),
    }
    parts = _with_hypernetwork(files, {**hn, "hypernet.safetensors": nan}, manifest, anchors=True)
    r = client.post("/v1/models", files=parts, data={"name": "nan-hn"})
    assert r.status_code == 422, r.text
    assert "NaN or inf" in r.json()["detail"] and "must be finite" in r.json()["detail"]
    assert "uploads" not in r.json()["detail"]
    assert_nothing_left(store, "nan-hn")
