"""read_json and read_safetensors_header turn every unreadable file into a ManifestError that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ManifestError
from models.store import manifest
from models.store.manifest import read_json, read_safetensors_header


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xe4\x00\xff binary", "is not valid JSON"),  # not UTF-8
        (b"{", "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b"[" * 100_000, "is not valid JSON"),  # deeper than the parser's recursion limit
        (b'{"a": ' + b"1" * 5000 + b"}", "is not valid JSON"),  # more digits than int() takes
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


def test_a_device_or_an_oversized_file_is_refused_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ManifestError, match="/dev/zero is not a regular file"):
        read_json(Path("/dev/zero"))  # endless: it would be read until memory ran out
    monkeypatch.setattr(manifest, "MAX_JSON_BYTES", 16)
    path = tmp_path / "big.json"
    path.write_text('{"a": "' + "x" * 16 + '"}')
    with pytest.raises(ManifestError, match="is larger than 0 MiB"):
        read_json(path)
    path.write_text('{"a": 1}')  # within the bound: read as ever
    assert read_json(path) == {"a": 1}


@pytest.mark.parametrize("header", [b"[1, 2]", b"[" * 100_000])
def test_a_safetensors_header_that_is_not_an_object_is_a_manifest_error(
    tmp_path: Path, header: bytes
) -> None:
    path = tmp_path / "patch.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ManifestError, match="not a"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"overrides": {"checkpoint_path": "/x.pth"}}, r"may not set \['checkpoint_path'\]"),
        ({"overrides": {"pretrained_cfg": {"file": "/x"}, "cache_dir": "/"}}, "may not set"),
        ({"overrides": [1]}, "'overrides' must be a JSON object"),
        ({"pretrained_cfg_overlay": "x"}, "'pretrained_cfg_overlay' must be a JSON object"),
    ],
)
def test_a_backbone_manifest_holds_constructor_arguments_only(fields, message) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest.BackboneManifest.from_json(
            {"name": "m", "timm_name": "vit_tiny_patch16_224", **fields}
        )
