"""service/validation.py: the checks of an upload, before anything is written or enqueued."""

from __future__ import annotations

import io
import re
import warnings

import pytest
from fastapi import UploadFile
from PIL import Image

from models.errors import TooLarge
from service.settings import ApiSettings
from service.validation import check_image


def _png(side: int) -> UploadFile:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # one bit a pixel: a small file
    return UploadFile(io.BytesIO(buf.getvalue()), filename="bomb.png")


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (10_000, "bomb.png is 10000x10000 pixels; each side may be at most 4096"),  # Pillow warns
        (20_000, "bomb.png: Image size (400000000 pixels) exceeds limit"),  # Pillow raises
    ],
)
def test_a_decompression_bomb_is_refused_by_its_header(side: int, message: str) -> None:
    # refused whatever the warning filters say: check_image sets none (they are process-wide)
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0", max_image_bytes=1 << 24)
    with pytest.raises(TooLarge, match=re.escape(message)), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        check_image(_png(side), settings)
