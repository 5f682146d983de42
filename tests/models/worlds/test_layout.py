from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DataError, TooLarge
from models.images import WORK_SIDE
from models.worlds.layout import read_benchmark, read_edit_groups, read_locality


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


def test_benchmark_images_are_size_checked_from_the_header_and_kept_small(tmp_path):
    # a PNG of 9,000 x 9,000 flat pixels is a few hundred KB but decodes to 243 MB: refused,
    # naming its folder and file, before it is decoded
    _write_group(tmp_path / "groups", "1-2", 2)
    Image.new("RGB", (9000, 9000)).save(tmp_path / "groups" / "1-2" / "huge.png")
    with pytest.raises(TooLarge, match=r"1-2/huge\.png is 9000x9000 pixels; each side may be"):
        read_edit_groups(tmp_path / "groups")
    # a photo-sized image is kept, reduced while its shorter side stays >= WORK_SIDE
    (tmp_path / "locality").mkdir()
    Image.new("RGB", (4000, 3000)).save(tmp_path / "locality" / "photo.png")
    (kept,) = read_locality(tmp_path / "locality")
    assert WORK_SIDE <= min(kept.size) < 3000 and kept.size[0] > kept.size[1]
    Image.new("RGB", (4000, 100)).save(tmp_path / "locality" / "strip.png")
    with pytest.raises(DataError, match=r"locality/strip\.png .* aspect ratio"):
        read_locality(tmp_path / "locality")


def test_a_served_benchmark_is_counted_before_any_image_is_decoded(tmp_path):
    _write_group(tmp_path / "groups", "1-2", 3)
    (tmp_path / "groups" / "1-2" / "bad.png").write_bytes(b"\x89PNG broken")  # never decoded
    _write_group(tmp_path / "locality", "sub", 2)
    with pytest.raises(TooLarge, match=r"holds 6 images .* at most 5"):
        read_benchmark(tmp_path / "groups", tmp_path / "locality", max_images=5)
    with pytest.raises(DataError, match=r"bad\.png"):  # within the cap, every image is read
        read_benchmark(tmp_path / "groups", tmp_path / "locality", max_images=6)
