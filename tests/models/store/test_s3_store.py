"""The S3 store across hosts: two stores with their own local caches share one bucket (an S3
emulator, moto's server mode, over real HTTP: tests/s3_server.py).

What one host writes the other reads, sha256-checked; a version exists only once its manifest is
published (last); a tampered object fails on read; concurrent alias and registry updates lose
nothing (conditional writes, no lock); a purge on one host is seen by the other at once.
Every guarantee of the local store is also checked on S3 by tests/models/store/test_store.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from models.errors import IntegrityError, StoreError, StoreUnavailable, UnknownVersionError
from models.store.remote import S3Remote, one_snapshot, parse_store_url
from models.store.store import PATCH_FILE, Store
from tests.models.store.test_store import entry, tamper, write_version
from workers.settings import WorkerSettings


def host(tmp_path: Path, name: str, url: str, endpoint: str) -> Store:
    """A store as one host sees it: its own local cache folder, the shared bucket."""
    return Store(tmp_path / name, remote=S3Remote(url, endpoint_url=endpoint))


@pytest.fixture
def hosts(tmp_path: Path, s3_url: str, s3_endpoint: str) -> tuple[Store, Store]:
    a, b = host(tmp_path, "a", s3_url, s3_endpoint), host(tmp_path, "b", s3_url, s3_endpoint)
    a.register_model(entry())
    return a, b


def test_what_one_host_writes_the_other_reads_checked(hosts: tuple[Store, Store]) -> None:
    a, b = hosts
    assert [m.name for m in b.models()] == ["m"]
    v1 = write_version(a).version
    v2 = write_version(a, parent=v1).version
    a.set_alias("m", "prod", v1)

    assert [m.version for m in b.versions("m")] == [v1, v2]
    assert b.resolve("m@prod").version == v1 and b.resolve("m@latest").version == v2
    assert b.resolve(v2).model == "m"  # a bare version id
    path = b.version_file("m", v2, PATCH_FILE)  # fetched into b's cache, sha256 checked
    assert path.is_relative_to(b.root)
    assert path.read_bytes() == a.version_file("m", v2, PATCH_FILE).read_bytes()

    # merged weights materialised on one host are downloaded by the other (the API's)
    written = a.put_cached_weights("m", v2, lambda p: p.write_bytes(b"merged"))
    cached = b.cached_weights("m", v2)
    assert cached is not None and cached[1] == written[1] and cached[0].read_bytes() == b"merged"

    # an upload written by the API's host is read by a worker's
    upload, _ = a.new_upload()
    key = a.write_upload(upload, "edit-000", b"image bytes")
    assert b.upload_path(key).read_bytes() == b"image bytes"
    a.remove_upload(upload)
    assert a.remote is not None and a.remote.list(f"uploads/{upload}/") == []


def test_a_version_without_its_manifest_does_not_exist(hosts: tuple[Store, Store]) -> None:
    a, b = hosts
    remote = a.remote
    assert remote is not None
    # what a writer that died before publishing leaves: files, but no manifest
    remote.put_bytes("models/m/versions/v20260101-000000-abcdef/patch.safetensors", b"x")
    assert b.versions("m") == [] and b.latest("m") is None
    with pytest.raises(UnknownVersionError):
        b.version("m", "v20260101-000000-abcdef")
    with pytest.raises(UnknownVersionError):
        b.set_alias("m", "prod", "v20260101-000000-abcdef")

    # a publish uploads every file first and the manifest last
    seen: list[str] = []
    upload = remote.upload_file
    put = remote.put_bytes
    remote.upload_file = lambda path, rel: (seen.append(rel), upload(path, rel))[1]  # type: ignore[method-assign]
    remote.put_bytes = lambda rel, data, **kw: (seen.append(rel), put(rel, data, **kw))[1]  # type: ignore[method-assign]
    version = write_version(a).version
    assert seen[-1] == f"models/m/versions/{version}/manifest.json"
    assert sorted(seen[:-1]) == [
        f"models/m/versions/{version}/images/edit-000.png",
        f"models/m/versions/{version}/{PATCH_FILE}",
    ]


def test_a_tampered_object_fails_on_read_and_a_damaged_cache_is_refetched(
    hosts: tuple[Store, Store],
) -> None:
    a, b = hosts
    version = write_version(a).version
    local = a.version_file("m", version, PATCH_FILE)
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF
    local.write_bytes(bytes(data))  # only a's cached copy: the bucket's is intact
    assert a.version_file("m", version, PATCH_FILE).read_bytes() != bytes(data)

    tamper(a, a.version_file("m", version, PATCH_FILE))  # now the bucket's object too
    with pytest.raises(IntegrityError, match="sha256"):
        b.version_file("m", version, PATCH_FILE)  # b never had it cached


def test_concurrent_alias_and_registry_updates_lose_nothing(
    tmp_path: Path, s3_url: str, s3_endpoint: str
) -> None:
    """Eight hosts at once: each points its own alias at a version and registers its own model;
    conditional writes redo a change that lost a race, so every alias and model survives."""
    writers = [host(tmp_path, f"h{i}", s3_url, s3_endpoint) for i in range(8)]
    writers[0].register_model(entry())
    version = write_version(writers[0]).version
    start = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def work(i: int, store: Store) -> None:
        try:
            start.wait()
            store.set_alias("m", f"alias-{i}", version)
            store.register_model(replace(entry(f"model-{i}"), default_method="ft"))
            store.set_alias("m", "shared", version)  # the same alias, moved by everyone
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reader = host(tmp_path, "reader", s3_url, s3_endpoint)
    aliases = reader.aliases("m")
    assert aliases == {**{f"alias-{i}": version for i in range(8)}, "shared": version}
    assert sorted(m.name for m in reader.models()) == ["m"] + [f"model-{i}" for i in range(8)]


def test_a_purge_on_one_host_is_seen_by_the_other(hosts: tuple[Store, Store]) -> None:
    a, b = hosts
    version = write_version(a).version
    b.version_file("m", version, PATCH_FILE)  # cached on b
    with pytest.raises(StoreError, match="versions"):
        a.unregister_model("m")
    a.unregister_model("m", purge=True)
    assert b.models() == []
    assert a.remote is not None and a.remote.list("models/") == []
    a.register_model(entry(sha="b" * 64))  # the name is free again, over other weights
    assert b.versions("m") == []
    with pytest.raises(UnknownVersionError):
        b.version("m", version)  # b's cached copy does not bring it back


def test_sweep_removes_old_uploads_of_every_host(hosts: tuple[Store, Store]) -> None:
    a, b = hosts
    old, _ = a.new_upload()
    a.write_upload(old, "a", b"x")
    kept, _ = a.new_upload()
    a.write_upload(kept, "a", b"y")
    assert b.sweep(max_age_s=3600) == 0  # young: a job may be about to read them
    assert b.sweep(max_age_s=-60, keep={kept}) == 1  # b never had them locally
    assert a.remote is not None
    assert [blob.key for blob in a.remote.list("uploads/")] == [f"uploads/{kept}/a"]


def test_model_files_go_up_before_the_entry_and_come_down_where_needed(
    hosts: tuple[Store, Store],
) -> None:
    a, b = hosts
    folder = a.model_files("m")
    (folder / "hypernet").mkdir(parents=True)
    (folder / "backbone.json").write_text("{}")
    (folder / "hypernet" / "h.safetensors").write_bytes(b"h" * 10)
    a.publish_model_files("m")
    b.fetch_model_files("m")
    assert (b.model_files("m") / "hypernet" / "h.safetensors").read_bytes() == b"h" * 10
    (folder / "backbone.json").write_text('{"changed": 1}')  # a --replace
    (folder / "hypernet" / "h.safetensors").unlink()
    a.publish_model_files("m")
    b.fetch_model_files("m")
    here = b.model_files("m")
    assert (here / "backbone.json").read_text() == '{"changed": 1}'
    assert not (here / "hypernet" / "h.safetensors").exists()  # dropped: from the cache too
    assert a.remote is not None
    assert [blob.key for blob in a.remote.list("models/m/base/")] == ["models/m/base/backbone.json"]

    # retrained weights of one architecture keep their size, and so does a manifest differing
    # only in their sha256: the other host's cache compared sizes and kept the old files
    time.sleep(1.1)  # a later registration: the bucket's times have a resolution of 1 s
    (folder / "backbone.json").write_text('{"changed": 2}')
    a.publish_model_files("m")
    b.fetch_model_files("m")
    assert (here / "backbone.json").read_text() == '{"changed": 2}'

    # the registering host keeps what it wrote after the bucket's copy (its files move in before
    # they go up): a fetch there in between neither reverts nor removes them
    time.sleep(1.1)
    (folder / "backbone.json").write_text('{"changed": 30}')
    (folder / "hypernet" / "h2.safetensors").write_bytes(b"two")
    a.fetch_model_files("m")
    assert (folder / "backbone.json").read_text() == '{"changed": 30}'
    assert (folder / "hypernet" / "h2.safetensors").read_bytes() == b"two"


def test_a_wrong_store_url_or_bucket_stops_the_process_with_the_reason(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for url in ("http://bucket/x", "s3://", "s3:///x", "s3://b/p?x=1"):
        with pytest.raises(StoreError, match="s3://BUCKET"):
            parse_store_url(url)
    with pytest.raises(StoreError, match="is not a URL"):
        WorkerSettings(store=tmp_path, store_url="s3://b", s3_endpoint_url="notaurl").open_store()
    settings = WorkerSettings(
        store=tmp_path, store_url="s3://no-such-bucket", s3_endpoint_url=s3_endpoint
    )
    with pytest.raises(StoreUnavailable, match="does not exist"):
        settings.open_store()
    settings = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StoreUnavailable, match="could not be reached"):
        settings.open_store()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = settings.model_copy(update={"s3_endpoint_url": s3_endpoint})
    with pytest.raises(StoreUnavailable, match=r"no credentials.*AWS_ACCESS_KEY_ID"):
        settings.open_store()


def test_a_relative_cache_folder_reads_what_another_host_wrote(
    tmp_path: Path, s3_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default VITEDIT_STORE is relative (var/store): fetches must work from it too."""
    a = host(tmp_path, "a", s3_url, s3_endpoint)
    a.register_model(entry())
    version = write_version(a).version
    upload, _ = a.new_upload()
    key = a.write_upload(upload, "edit-000", b"image bytes")
    monkeypatch.chdir(tmp_path)
    b = Store(Path("var/store"), remote=S3Remote(s3_url, endpoint_url=s3_endpoint))
    assert b.upload_path(key).read_bytes() == b"image bytes"
    assert b.version_file("m", version, PATCH_FILE).is_file()


def test_one_snapshot_reads_an_index_once_and_sees_its_own_writes(
    hosts: tuple[Store, Store],
) -> None:
    a, b = hosts
    version = write_version(a).version
    with one_snapshot():
        assert [m.name for m in b.models()] == ["m"]
        a.register_model(replace(entry("other"), default_method="ft"))  # another host writes
        assert [m.name for m in b.models()] == ["m"]  # one snapshot per block
        b.set_alias("m", "prod", version)  # a write reads afresh, and is seen after
        assert b.aliases("m") == {"prod": version}
        with one_snapshot():  # a new block (a new request) sees the other host's write
            assert [m.name for m in b.models()] == ["m", "other"]
    assert [m.name for m in b.models()] == ["m", "other"]  # outside: every read asks


def test_a_registration_lease_excludes_other_hosts_until_released_or_expired(
    hosts: tuple[Store, Store],
) -> None:
    import json
    import time

    from models.errors import Conflict

    a, b = hosts
    key = ".locks/register-twin"
    with a.remote.lease(key, ttl_s=60, wait_s=1, what="a's registration"):
        start = time.monotonic()
        with (
            pytest.raises(Conflict, match=r"a's registration has been running for over 0\.5 s"),
            b.remote.lease(key, ttl_s=60, wait_s=0.5, what="a's registration"),
        ):
            pass
        assert time.monotonic() - start >= 0.5  # it waited first
    assert a.remote.get_bytes(key) is None  # released: deleted
    with b.remote.lease(key, ttl_s=60, wait_s=0.5, what="x"):
        pass  # free again

    # a holder that died: its lease expired, and the next one takes it over
    a.remote.put_bytes(key, json.dumps({"holder": "dead", "expires": time.time() - 1}).encode())
    with b.remote.lease(key, ttl_s=60, wait_s=0.5, what="x"):
        assert json.loads(b.remote.get_bytes(key)[0])["holder"] != "dead"
    a.remote.put_bytes(key, b"not json")  # unreadable: taken over as well
    with b.remote.lease(key, ttl_s=60, wait_s=0.5, what="x"):
        pass


def test_two_hosts_registering_one_name_at_once_leave_one_consistent_model(
    hosts: tuple[Store, Store], tmp_path: Path
) -> None:
    # a `vitedit models add` on one host, a worker's registration on another, no Redis between
    # them: the bucket's lease makes the second wait, then find the name taken
    from safetensors.torch import load_file, save_file

    from models.store.manifest import BackboneManifest, sha256_file
    from tests.redis_server import make_tiny_backbone
    from workers.model_files import add_model

    manifests = []
    for k in range(2):  # the same model with other weights
        path = make_tiny_backbone(tmp_path / f"twin{k}")
        weights = BackboneManifest.read(path).weights_path
        state = load_file(weights)
        state = {n: t + k for n, t in state.items()}
        save_file(state, weights)
        manifest = BackboneManifest.read(path)
        fields = {**manifest.__dict__, "weights_sha256": sha256_file(weights), "base_dir": None}
        BackboneManifest(**fields).write(path)
        manifests.append(path)
    start, outcomes = threading.Barrier(2), []

    def add(store: Store, manifest: Path) -> None:
        start.wait()
        try:
            outcomes.append(add_model(store, "twin", manifest).weights_sha256)
        except StoreError as exc:
            outcomes.append(str(exc))

    threads = [
        threading.Thread(target=add, args=pair) for pair in zip(hosts, manifests, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("is registered" in o for o in outcomes) == 1, outcomes
    a, b = hosts
    registered = b.model("twin").weights_sha256
    assert registered in outcomes and a.model("twin").weights_sha256 == registered


def test_a_replace_refused_late_puts_the_old_files_back_in_the_bucket(
    hosts: tuple[Store, Store], tmp_path: Path
) -> None:
    # the registry refuses the new weights after they were uploaded (a version of the old ones
    # was published meanwhile, by a worker on another host): the bucket gets the old files back
    from models.store.manifest import BackboneManifest, sha256_file
    from models.store.store import MANIFEST_FILE
    from tests.cli.test_models_command import _shifted, _with
    from tests.redis_server import make_benchmark, make_tiny_backbone
    from workers.model_files import add_model

    a, b = hosts
    tiny = make_tiny_backbone(tmp_path / "mine")
    before = add_model(a, "mine", tiny)
    bench = make_benchmark(tmp_path / "bench")
    assert a.remote is not None
    version = f"models/mine/versions/v20260101-000000-abcdef/{MANIFEST_FILE}"

    with pytest.raises(StoreError, match="other base weights"):
        add_model(
            a,
            "mine",
            _with(tiny, _shifted),
            groups=Path(bench["groups"]),
            locality=Path(bench["locality"]),
            replace=True,
            calibrate=lambda *staged: a.remote.put_bytes(version, b"{}"),
        )
    entry = b.model("mine")  # another host reads the entry and the files from the bucket
    assert entry.weights_sha256 == before.weights_sha256
    b.fetch_model_files("mine")
    assert sha256_file(BackboneManifest.read(entry.backbone).weights_path) == entry.weights_sha256
    assert a.remote.list("models/mine/base/benchmark/") == []  # the refused copy's, deleted
