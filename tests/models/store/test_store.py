"""The store: versions are atomic, immutable and self-describing; reads check sha256; aliases,
lineage, weights cache and uploads behave. Torch-free (patches written with safetensors.numpy)."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.errors import (
    DataError,
    IntegrityError,
    ManifestError,
    StoreError,
    UnknownModelError,
    UnknownVersionError,
)
from models.store import store as store_module
from models.store.manifest import (
    DEFAULT_TENANT,
    ImageRecord,
    MethodInfo,
    ModelEntry,
    VersionManifest,
    utc_now,
)
from models.store.remote import S3Remote
from models.store.store import PATCH_FILE, Store, VersionDraft, check_name


def entry(name: str = "m", sha: str = "a" * 64) -> ModelEntry:
    return ModelEntry(
        name=name,
        backbone="/nowhere/backbone.json",
        weights_sha256=sha,
        num_classes=3,
        class_names=("cat", "dog", "Bird"),
        default_method="ft",
        methods={"ft": MethodInfo(options={"lr": 0.1})},
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Every test runs on both backends: a folder, and an S3 bucket (tests/s3_server.py) with
    the folder as its local cache; the guarantees are the same."""
    remote = None
    if request.param == "s3":
        url = request.getfixturevalue("s3_url")
        remote = S3Remote(url, endpoint_url=request.getfixturevalue("s3_endpoint"))
    s = Store(tmp_path / "store", remote=remote)
    s.register_model(entry())
    return s


def tamper(store: Store, path: Path) -> None:
    """Flip the last byte of a stored file: in the folder, and in the bucket if there is one."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if store.remote is not None:
        store.remote.put_bytes(store.key(path), bytes(data))


def draft_manifest(draft: VersionDraft, parent: str | None = None) -> VersionManifest:
    return VersionManifest(
        version=draft.version,
        model=draft.model,
        parent=parent,
        backbone={"name": "b"},
        method="ft",
        config={"lr": 0.1},
        hypernetwork=None,
        sites={"mlps": ["blocks.1.mlp"]},
        patch=[],
        files={},
        images=[ImageRecord("images/edit-000.png", 1)],
        report={"metrics": {"SR": 1.0}},
        created_at=utc_now(),
        code_version="t",
    )


def write_version(
    store: Store, parent: str | None = None, owner: str = DEFAULT_TENANT
) -> VersionManifest:
    with store.begin_version("m") as draft:
        save_file(
            {
                "blocks.1.mlp.fc1.weight.indices": np.arange(2, dtype=np.int64),
                "blocks.1.mlp.fc1.weight.values": np.ones((2, 4), dtype=np.float32),
            },
            str(draft.dir / PATCH_FILE),
            metadata={"format": "vitedit.patch/1"},
        )
        (draft.dir / "images").mkdir()
        (draft.dir / "images" / "edit-000.png").write_bytes(b"png bytes")
        return draft.commit(replace(draft_manifest(draft, parent), owner=owner))


def test_commit_makes_a_version_visible_in_one_step(store: Store) -> None:
    with store.begin_version("m") as draft:
        save_file({"x.indices": np.arange(1)}, str(draft.dir / PATCH_FILE))
        assert store.versions("m") == []  # the draft lives in tmp/, invisible
        manifest = draft.commit(draft_manifest(draft))
    assert [v.version for v in store.versions("m")] == [manifest.version]
    assert not list((store.root / "tmp").iterdir())


def test_failed_draft_leaves_nothing_visible(store: Store) -> None:
    with pytest.raises(RuntimeError), store.begin_version("m") as draft:
        (draft.dir / PATCH_FILE).write_bytes(b"half a file")
        raise RuntimeError("the worker died here")
    assert store.versions("m") == []
    assert not list((store.root / "tmp").iterdir())


def test_version_ids_are_server_generated_unique_and_sortable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [store.new_version_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(i.startswith("v") for i in ids)
    # ids made at later times sort later, across second, hour, day, month and year boundaries
    # (where an unpadded or day-first format would misorder them)
    times = [
        datetime(2026, 1, 9, 9, 59, 59, tzinfo=UTC),
        datetime(2026, 1, 9, 10, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 10, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 9, 30, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 10, 1, 0, 0, 0, tzinfo=UTC),
        datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC),
    ]
    clock = iter(times)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return next(clock)

    monkeypatch.setattr(store_module, "datetime", Clock)
    timed = [store.new_version_id() for _ in times]
    assert sorted(timed) == timed
    assert sorted(reversed(timed)) == timed


@pytest.mark.parametrize(
    "name", ["..", "../../etc", "..%2F..%2Fetc", "a/b", ".hidden", "-x", "", "x" * 65, "a b"]
)
def test_check_name_refuses_names_that_are_not_one_safe_path_segment(name: str) -> None:
    with pytest.raises(StoreError, match="invalid version"):
        check_name(name, "version")


def test_check_name_accepts_version_ids_aliases_and_dotted_names(store: Store) -> None:
    for name in (store.new_version_id(), "prod", "v1.2_rc-3", "x" * 64):
        assert check_name(name, "version") == name


def test_commit_never_overwrites_an_existing_version(store: Store) -> None:
    with store.begin_version("m") as draft:
        save_file({"x.indices": np.arange(1)}, str(draft.dir / PATCH_FILE))
        final = store.version_dir("m", draft.version)
        if store.remote is None:  # another writer got there first
            final.mkdir(parents=True)
            (final / "keep").write_text("old")
        else:
            store.remote.put_bytes(f"{store.key(final)}/manifest.json", b"old")
        with pytest.raises(StoreError, match="immutable"):
            draft.commit(draft_manifest(draft))
    if store.remote is None:
        assert (final / "keep").read_text() == "old"
    else:
        assert store.remote.get_bytes(f"{store.key(final)}/manifest.json")[0] == b"old"
        assert [b.key for b in store.remote.list(f"{store.key(final)}/")] == [
            f"{store.key(final)}/manifest.json"  # and no file of the refused draft went up
        ]


def test_commit_requires_an_existing_parent(store: Store) -> None:
    with pytest.raises(UnknownVersionError):
        write_version(store, parent="v-missing")


def test_manifest_records_every_file_and_the_patch_tensors(store: Store) -> None:
    manifest = store.version("m", write_version(store).version)
    assert set(manifest.files) == {PATCH_FILE, "images/edit-000.png"}
    assert {p["name"]: p["shape"] for p in manifest.patch} == {
        "blocks.1.mlp.fc1.weight.indices": [2],
        "blocks.1.mlp.fc1.weight.values": [2, 4],
    }
    assert manifest.edit_images[0].target == 1


def test_tampered_file_fails_the_sha256_check_on_read(store: Store) -> None:
    version = write_version(store).version
    tamper(store, store.version_file("m", version, PATCH_FILE))
    with pytest.raises(IntegrityError, match="sha256"):
        store.version_file("m", version, PATCH_FILE)


def test_lineage_aliases_latest_and_base_resolve(store: Store) -> None:
    v1 = write_version(store).version
    v2 = write_version(store, parent=v1).version
    assert [m.version for m in store.lineage("m", v2)] == [v1, v2]
    store.set_alias("m", "prod", v1)
    assert store.resolve("m@prod").version == v1
    store.set_alias("m", "prod", v2)  # aliases move
    assert store.resolve("m@prod").version == v2
    assert store.resolve("m@latest").version == v2
    assert store.resolve("m").version is None
    assert store.resolve("m@base").version is None
    assert store.resolve(v1).model == "m"  # a bare version id
    for ref in ("m@", "m@@"):  # an '@' must name something: not silently the base
        with pytest.raises(StoreError, match="invalid alias or version"):
            store.resolve(ref)
    store.delete_alias("m", "prod")
    with pytest.raises(UnknownVersionError):
        store.resolve("m@prod")
    for reserved in ("latest", "base"):
        with pytest.raises(StoreError, match="reserved and cannot be deleted"):
            store.delete_alias("m", reserved)
    assert store.resolve("m@latest").version == v2


def test_a_scoped_store_shows_its_tenant_only_its_own_versions_and_aliases(store: Store) -> None:
    old = write_version(store).version  # before tenants: no owner, the default tenant's
    store.set_alias("m", "prod", old)
    alice, bob = store.scoped("alice"), store.scoped("bob")
    mine = write_version(alice, owner="alice").version
    child = write_version(alice, parent=mine, owner="alice").version
    alice.set_alias("m", "prod", child)
    assert [m.version for m in alice.versions("m")] == [mine, child]
    assert alice.resolve("m@prod").version == child and alice.latest("m") == child
    assert store.scoped(DEFAULT_TENANT).resolve("m@prod").version == old  # aliases.json kept
    assert store.aliases("m") == {"prod": old} and alice.aliases("m") == {"prod": child}
    assert bob.versions("m") == [] and bob.latest("m") is None and bob.aliases("m") == {}
    assert bob.resolve("m@latest").version is None  # Bob's latest is the base
    for ref in (f"m@{mine}", "m@prod"):
        with pytest.raises(UnknownVersionError):
            bob.resolve(ref)
    with pytest.raises(UnknownVersionError):
        bob.set_alias("m", "prod", mine)
    with pytest.raises(UnknownVersionError):
        bob.delete_alias("m", "prod")
    with pytest.raises(UnknownModelError):
        bob.resolve(mine)  # a bare version id of another tenant's: unknown
    assert {m.version for m in store.versions("m")} == {old, mine, child}  # unscoped: all
    with pytest.raises(StoreError, match="another tenant"):  # what a worker (unscoped) saves
        write_version(store, parent=mine, owner="bob")


def test_reserved_or_malformed_names_are_refused(store: Store) -> None:
    v1 = write_version(store).version
    for alias in ("latest", "base"):
        with pytest.raises(StoreError, match="reserved"):
            store.set_alias("m", alias, v1)
    with pytest.raises(StoreError):
        store.version("m", "../../etc")
    with pytest.raises(StoreError, match="upload area"):
        store.upload_path("uploads/../models.json")
    with pytest.raises(UnknownModelError):
        store.resolve("other@latest")


def test_cached_weights_appear_atomically_and_are_checked(store: Store) -> None:
    version = write_version(store).version
    assert store.cached_weights("m", version) is None
    path, sha = store.put_cached_weights("m", version, lambda p: p.write_bytes(b"weights"))
    assert store.cached_weights("m", version) == (path, sha)
    path.write_bytes(b"changed")
    with pytest.raises(IntegrityError):
        store.cached_weights("m", version)


def test_register_refuses_new_base_weights_under_a_name_with_versions(store: Store) -> None:
    store.register_model(replace(entry(), default_method="ft"))  # same weights: fine
    write_version(store)
    with pytest.raises(StoreError, match="new name"):
        store.register_model(entry(sha="b" * 64))


def test_labels_resolve_by_index_or_case_insensitive_name(store: Store) -> None:
    model = store.model("m")
    assert model.label_index("bird") == 2 and model.label_index("1") == 1
    with pytest.raises(DataError, match=r"label '1111.*\(5000 characters\) is out of range"):
        model.label_index("1" * 5000)  # int() of it would raise (over Python's digit limit)
    with pytest.raises(DataError, match=r"unknown label 'xxx.*\(100000 characters\) for model"):
        model.label_index("x" * 100_000)
    many = replace(model, class_names=tuple(f"c{i}" for i in range(1000)), num_classes=1000)
    with pytest.raises(DataError, match=r"'c19'\] \(and 980 more: GET /v1/models/m\)$"):
        many.label_index("giraffe")


def test_sweep_removes_only_old_uploads(store: Store) -> None:
    old, _ = store.new_upload()
    store.write_upload(old, "a", b"x")
    new, _ = store.new_upload()
    store.write_upload(new, "a", b"y")
    assert store.sweep(max_age_s=3600) == 0  # young: a job may be about to read them
    assert store.sweep(max_age_s=-60, keep={new}) == 1  # all "old" now, but a live job's
    assert store.upload_path(f"uploads/{new}/a").read_bytes() == b"y"
    assert not store.upload_path(f"uploads/{old}/a").exists()


def test_sweep_goes_by_the_age_of_an_upload(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old, old_path = store.new_upload()
    store.write_upload(old, "a", b"x")
    os.utime(old_path, (0, 0))
    new, _ = store.new_upload()
    assert store.sweep(max_age_s=3600) == 1
    assert [p.name for p in (store.root / "uploads").iterdir()] == [new]


def test_manifests_round_trip_and_refuse_an_unknown_schema() -> None:
    from models.errors import ManifestError
    from models.store.manifest import BackboneManifest

    data = entry().to_json()
    assert ModelEntry.from_json(data) == entry()
    with pytest.raises(ManifestError, match=r"model entry schema 2 is not supported \(want 1\)"):
        ModelEntry.from_json({**data, "schema": 2})
    with pytest.raises(ManifestError, match="model entry schema None"):
        ModelEntry.from_json({k: v for k, v in data.items() if k != "schema"})
    backbone = {"name": "b", "timm_name": "vit_small_patch16_224"}
    assert BackboneManifest.from_json(backbone).name == "b"  # schema optional: defaults to 1
    with pytest.raises(ManifestError, match="backbone manifest schema 9"):
        BackboneManifest.from_json({**backbone, "schema": 9})


def test_a_version_is_not_published_for_a_model_removed_or_replaced_while_it_was_made(
    store: Store,
) -> None:
    with store.begin_version("m") as draft:
        save_file({"x.indices": np.arange(1)}, str(draft.dir / PATCH_FILE))
        store.unregister_model("m")  # an admin removes the model mid-edit
        with pytest.raises(StoreError, match="was removed while this edit ran"):
            draft.commit(draft_manifest(draft))
    assert not (store.root / "models" / "m").exists() and store._has_versions("m") is False
    store.register_model(entry())
    with store.begin_version("m") as draft:
        save_file({"x.indices": np.arange(1)}, str(draft.dir / PATCH_FILE))
        store.register_model(entry(sha="b" * 64))  # replaced by other weights mid-edit
        made_on = replace(draft_manifest(draft), backbone={"name": "b", "weights_sha256": "a" * 64})
        with pytest.raises(StoreError, match="registered again over other base weights"):
            draft.commit(made_on)
    assert store.versions("m") == [] and not list((store.root / "tmp").iterdir())


def test_a_registration_waits_for_another_of_its_name_then_says_it_is_running(
    tmp_path: Path,
) -> None:
    import threading
    import time

    from models.errors import Conflict

    store, other = Store(tmp_path), Store(tmp_path)  # two processes' views of one folder
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.registering("twin"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    start = time.monotonic()
    with (
        pytest.raises(Conflict, match="another registration of 'twin' has been running for over"),
        other.registering("twin", wait_s=0.3),
    ):
        pass
    assert time.monotonic() - start >= 0.3
    with other.registering("other-name", wait_s=0.3):
        pass  # another name is not held
    release.set()
    thread.join()
    with other.registering("twin", wait_s=0.3):
        pass  # released


def test_names_a_reference_would_read_as_a_version_or_reserved_are_refused(store: Store) -> None:
    """An alias or a model named like a version id shadowed that version in ``m@<id>`` and in a
    bare ``model=<id>``; ``latest`` and ``base`` as a model name hijacked those words."""
    v1, v2 = write_version(store).version, write_version(store).version
    assert store_module.VERSION_ID.fullmatch(store.new_version_id())
    assert store_module.VERSION_ID.fullmatch("v20250101-120000-0a1b2c")  # the older hex ids
    for alias in (v2, "v20260101-000000-abcdef", "latest", "base"):
        with pytest.raises(StoreError, match=r"shape of a version id|reserved"):
            store.set_alias("m", alias, v1)
    assert store.aliases("m") == {}
    for name in (v1, "v20260101-000000-abcdef", "latest", "base"):
        with pytest.raises(StoreError, match="pick another name"):
            store.register_model(entry(name))
    assert [m.name for m in store.models()] == ["m"]
    for fine in ("prod", "v2", "v20260101", "release-2026-01-01"):
        store.set_alias("m", fine, v1)
    assert store.resolve(f"m@{v2}").version == v2 and store.resolve(v2).version == v2


def test_a_damaged_version_is_left_out_of_the_listing_not_breaking_it(store: Store) -> None:
    good = write_version(store).version
    bad = write_version(store).version
    path = store.version_dir("m", bad) / "manifest.json"
    path.write_text("{")
    if store.remote is not None:
        store.remote.put_bytes(store.key(path), b"{")
    assert [m.version for m in store.versions("m")] == [good]
    assert store.latest("m") == good
    with pytest.raises(ManifestError, match="not valid JSON"):
        store.version("m", bad)  # read by itself it still says what is wrong
