"""read_json turns every unreadable file into a ManifestError that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ManifestError
from models.store.manifest import read_json


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xe4\x00\xff binary", "is not valid JSON"),  # not UTF-8
        (b"{", "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
    ],
)
def test_an_unreadable_file_is_a_manifest_error(tmp_path: Path, content, message) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        read_json(path)
    with pytest.raises(ManifestError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_json(tmp_path)  # a directory
