"""The merged-weights cache stays within its size bound: least recently used entries go first, and
an entry used in the last ``min_idle_s`` (it may be downloading) is never removed. Torch-free."""

from __future__ import annotations

import os
import time
from pathlib import Path

from models.store.store import Store


def put(store: Store, version: str, size: int = 1000) -> None:
    store.put_cached_weights("m", version, lambda path: path.write_bytes(b"w" * size))


def used(store: Store, version: str, seconds_ago: float) -> None:
    info = store.root / "cache" / "m" / version / "model.json"
    when = time.time() - seconds_ago
    os.utime(info, (when, when))


def test_cache_evicts_the_least_recently_used_entries_beyond_its_bound(tmp_path: Path) -> None:
    store = Store(tmp_path, cache_max_bytes=2500, cache_min_idle_s=60)
    put(store, "v1")
    put(store, "v2")
    used(store, "v1", 300)
    used(store, "v2", 600)
    assert store.cached_weights("m", "v1") is not None  # a download: v1 is now the most recent
    used(store, "v1", 120)
    put(store, "v3")  # 3000 bytes > 2500: the least recently used (v2) goes
    assert store.cached_weights("m", "v2") is None
    assert store.cached_weights("m", "v1") is not None
    assert store.cached_weights("m", "v3") is not None
    assert not list((tmp_path / "tmp").iterdir())  # removed, not parked


def test_cache_keeps_entries_used_recently_even_above_its_bound(tmp_path: Path) -> None:
    store = Store(tmp_path, cache_max_bytes=1500, cache_min_idle_s=60)
    put(store, "v1")
    put(store, "v2")  # over the bound, but v1 was used a moment ago
    assert store.cached_weights("m", "v1") is not None
    used(store, "v1", 120)
    assert store.evict_cached_weights(1500, min_idle_s=60) == ["m@v1"]
    assert store.cached_weights("m", "v2") is not None


def test_a_store_without_a_bound_never_evicts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for version in ("v1", "v2", "v3"):
        put(store, version, size=10_000)
        used(store, version, 3600)
    assert all(store.cached_weights("m", v) for v in ("v1", "v2", "v3"))
