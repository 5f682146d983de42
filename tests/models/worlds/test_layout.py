from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DataError
from models.worlds.layout import read_benchmark, read_edit_groups


def _write_group(root: Path, name: str, n: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((28, 28), i * 10, np.uint8)).save(folder / f"{i}.png")


def test_reads_the_papers_layout_with_true_class_from_folder_name(tmp_path):
    _write_group(tmp_path / "groups", "609-586", 3)
    _write_group(tmp_path / "groups", "3-invert", 2)
    _write_group(tmp_path / "locality", "sub", 4)
    bench = read_benchmark(tmp_path / "groups", tmp_path / "locality")
    assert [(g.name, g.label, len(g.images)) for g in bench.groups] == [
        ("3-invert", 3, 2),
        ("609-586", 609, 3),
    ]
    assert len(bench.locality) == 4


def test_group_folder_without_a_class_index_is_rejected(tmp_path):
    _write_group(tmp_path, "cats", 3)
    with pytest.raises(DataError, match="true class index"):
        read_edit_groups(tmp_path)


def test_group_with_a_single_image_is_rejected(tmp_path):
    _write_group(tmp_path, "1-2", 1)
    with pytest.raises(DataError, match=r"need >= 2"):
        read_edit_groups(tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    _write_group(tmp_path, "1-2", 2)
    (tmp_path / "1-2" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"bad\.png"):
        read_edit_groups(tmp_path)
