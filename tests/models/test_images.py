"""Decoding images of more than 8 bits a channel (models/images.py): scaled, or refused, never
clipped at 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DataError
from models.images import WORK_SIDE, open_image


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def _grey(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_a_16_bit_grey_png_decodes_to_the_8_bit_picture_it_holds(tmp_path: Path) -> None:
    pixels = _grey((28, 28))
    path = tmp_path / "grey16.png"
    Image.fromarray(pixels.astype(np.uint16) * 257).save(path)  # 0-255 -> 0-65535
    assert _mode(path) == "I;16"  # what Pillow reads it as
    image = open_image(path)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_a_large_16_bit_image_is_scaled_and_then_reduced(tmp_path: Path) -> None:
    side = 4 * WORK_SIDE
    path = tmp_path / "big16.png"
    Image.fromarray(np.full((side, side), 40_000, dtype=np.uint16)).save(path)
    image = open_image(path)
    assert image.mode == "L" and WORK_SIDE <= min(image.size) < side
    assert np.asarray(image).min() == np.asarray(image).max() == round(40_000 / 257)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_pixels_within_0_255_are_kept(tmp_path: Path, mode: str) -> None:
    pixels = _grey((16, 16), seed=1)
    path = tmp_path / "wide.tif"
    Image.fromarray(pixels).convert(mode).save(path)
    assert _mode(path) == mode
    image = open_image(path)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(("mode", "value"), [("I", 4095), ("I", -3), ("F", 1000.5)])
def test_32_bit_pixels_out_of_0_255_are_refused_naming_their_range(
    tmp_path: Path, mode: str, value: float
) -> None:
    path = tmp_path / "scan.tif"
    pixels = np.zeros((8, 8), dtype=np.int32 if mode == "I" else np.float32)
    pixels[0, 0] = value
    Image.fromarray(pixels).save(path)
    assert _mode(path) == mode
    with pytest.raises(DataError, match=r"scan\.tif has 32-bit") as refused:
        open_image(path)
    assert f"{value:g}" in str(refused.value)  # the range it found


def test_an_unknown_format_is_refused_without_the_servers_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text")
    with pytest.raises(DataError, match=r"notes\.png: not a readable image") as refused:
        open_image(path)
    assert "not one of the accepted formats: PNG, JPEG, BMP, WebP, GIF or TIFF" in str(
        refused.value
    )
    assert str(tmp_path) not in str(refused.value)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"
"""A minimal EPS file: Pillow reads its header, and loading it would run Ghostscript."""


def _pgm(path: Path) -> None:
    Image.fromarray(_grey((8, 8))).save(path, format="PPM")  # a grey image: PGM (P5)


@pytest.mark.parametrize("name", ["figure.eps", "scan.pgm", "favicon.ico"])
def test_formats_outside_the_allow_list_are_refused_unparsed(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import EpsImagePlugin, IcoImagePlugin, PpmImagePlugin

    path = tmp_path / name
    if name.endswith(".eps"):
        path.write_bytes(EPS)
    elif name.endswith(".pgm"):
        _pgm(path)
    else:
        Image.fromarray(_grey((16, 16))).save(path, format="ICO")
    with Image.open(path) as im:  # what Pillow would read it as, left to itself
        assert im.format in ("EPS", "PPM", "ICO")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused format's plugin was run")

    for plugin, cls in [
        (EpsImagePlugin, "EpsImageFile"),
        (PpmImagePlugin, "PpmImageFile"),
        (IcoImagePlugin, "IcoImageFile"),
    ]:
        monkeypatch.setattr(getattr(plugin, cls), "_open", never)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    with pytest.raises(DataError, match=rf"{name}: not a readable image") as refused:
        open_image(path)
    assert "accepted formats: PNG, JPEG, BMP, WebP, GIF or TIFF" in str(refused.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"])
def test_every_accepted_format_opens(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(_grey((16, 16))).save(path, format=fmt)
    assert open_image(path).size == (16, 16)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_float_pixels_that_are_not_numbers_are_refused(tmp_path: Path, value: float) -> None:
    path = tmp_path / "nan.tif"
    pixels = np.full((8, 8), 100.0, dtype=np.float32)
    pixels[3, 3] = value  # one pixel among numbers
    Image.fromarray(pixels).save(path)
    with pytest.raises(DataError, match=r"nan\.tif has 32-bit float pixels that are not numbers"):
        open_image(path)
