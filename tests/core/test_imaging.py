"""Image decoding limits and transforms shared by every entry point."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from taskvision import imaging
from taskvision.errors import ImageTooLargeError, InvalidImageError
from tests.support.images import bomb_png, image_bytes


def test_decode_base64_raw_data_uri_and_wrapped() -> None:
    data = image_bytes(1)
    text = base64.b64encode(data).decode()
    assert imaging.decode_base64(text) == data
    assert imaging.decode_base64("data:image/png;base64," + text) == data
    assert imaging.decode_base64(base64.encodebytes(data).decode()) == data
    with pytest.raises(InvalidImageError):
        imaging.decode_base64("%%%not base64")


def test_probe_reads_the_header_and_stops_bombs_before_decoding() -> None:
    info = imaging.probe(image_bytes(1, size=(30, 20)), max_pixels=10_000)
    assert (info.format, info.width, info.height) == ("PNG", 30, 20)
    bomb = bomb_png()
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError, match="pixels"):
        imaging.probe(bomb, max_pixels=80_000_000)
    with pytest.raises(ImageTooLargeError):
        imaging.load_rgb(bomb, max_pixels=80_000_000)


@pytest.mark.parametrize("data", [b"", b"GIF89a", b"%PDF-1.4 hello", b"\x89PNG\r\n\x1a\n"])
def test_garbage_is_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        imaging.probe(data, max_pixels=10**6)


def test_load_rgb_flattens_alpha_onto_white() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(out, format="PNG")
    image = imaging.load_rgb(out.getvalue(), max_pixels=100)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_large_jpeg_is_decoded_small_when_a_draft_size_is_given() -> None:
    data = image_bytes(2, size=(4000, 3000), fmt="JPEG")
    image = imaging.load_rgb(data, max_pixels=20_000_000, draft_size=(256, 256))
    assert max(image.size) <= 1000  # the DCT scaled by 1/4 or more while decoding


def test_downscale_keeps_aspect_and_format() -> None:
    smaller = imaging.downscale(
        image_bytes(3, size=(3000, 1000), fmt="JPEG"), max_shorter_side=500, max_pixels=10**8
    )
    assert smaller is not None
    image = Image.open(io.BytesIO(smaller))
    assert image.format == "JPEG" and image.size == (1500, 500)
    assert imaging.downscale(image_bytes(4, size=(400, 300)), max_shorter_side=500, max_pixels=10**8) is None
    png = imaging.downscale(image_bytes(5, size=(1200, 900)), max_shorter_side=300, max_pixels=10**8)
    assert png is not None and Image.open(io.BytesIO(png)).format == "PNG"


def test_thumbnail_fits_the_box() -> None:
    thumb = imaging.thumbnail_jpeg(image_bytes(6, size=(900, 300)), max_side=128, max_pixels=10**7)
    assert Image.open(io.BytesIO(thumb)).size == (128, 43)
