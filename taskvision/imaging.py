"""Image decoding and checks shared by the control plane, training and serving.

Everything that turns untrusted bytes into pixels goes through here, so the
same limits apply wherever an image enters the system:

* the byte size is checked by the caller before decoding (it knows the cap);
* the pixel count is read from the header and checked *before* any pixel is
  decoded, which is what stops a decompression bomb (a tiny PNG that declares
  50000x50000 pixels);
* so is the shape: an aspect ratio beyond 1:``MAX_ASPECT_RATIO`` is refused
  before any resize, because every resize here scales the *shorter* side, and
  a 254-byte PNG of 60000x1 pixels would otherwise become a 15,000,000x256
  picture (16 GiB) on its way to the model;
* EXIF orientation is applied, so width/height are what a person sees.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from taskvision.errors import ImageGeometryError, ImageTooLargeError, InvalidImageError

# Formats we accept from users. Pillow can open more (EPS, PDF via plugins...),
# and some of those parse in risky ways, so the list is explicit.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# Modes Pillow can write as PNG (what ``downscale`` re-encodes non-JPEG images to).
_PNG_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"})

# The most elongated picture accepted (longer side / shorter side). Panoramas are about 1:4,
# a 360-degree strip about 1:10; beyond 1:50 an image carries no usable signal at 224x224
# and exists only to make resizing expensive.
MAX_ASPECT_RATIO = 50.0

_DATA_URI = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image says, after its pixel count was checked."""

    format: str
    width: int
    height: int


def decode_base64(data: str) -> bytes:
    """Decode a base64 string, raw or as a ``data:image/...;base64,`` URI.

    Raises:
        InvalidImageError: when the text is not valid base64.
    """
    text = _DATA_URI.sub("", data.strip(), count=1)
    # Clients wrap long base64 lines; whitespace is never meaningful in it.
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError("The base64 data is not valid base64.") from exc


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit raises) on big images; we
            # apply our own explicit limit below instead of its global one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageTooLargeError(f"The image declares too many pixels: {exc}") from exc
        raise InvalidImageError("The data is not an image in a supported format.") from exc
    except Exception as exc:  # Pillow raises assorted errors on corrupt headers
        raise InvalidImageError("The data is not an image in a supported format.") from exc
    if image.format not in ALLOWED_FORMATS:
        raise InvalidImageError(
            f"Image format {image.format!r} is not supported; "
            f"use one of {', '.join(sorted(ALLOWED_FORMATS))}."
        )
    return image


def check_geometry(width: int, height: int, *, max_pixels: int) -> None:
    """Refuse, from the declared size alone, an image whose decoding or resizing would be unbounded.

    Raises:
        InvalidImageError: no pixels.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageGeometryError: longer side / shorter side beyond ``MAX_ASPECT_RATIO``.
    """
    if width <= 0 or height <= 0:
        raise InvalidImageError("The image has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"The image declares {width}x{height} pixels; at most {max_pixels} pixels are accepted."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageGeometryError(
            f"The image is {width}x{height} pixels, an aspect ratio of 1:{ratio:.4g}; "
            f"at most 1:{MAX_ASPECT_RATIO:g} is accepted."
        )


def probe(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Read an image's header and check its declared geometry without decoding it.

    Every path that decodes pixels (upload, thumbnail, classify, validation, the
    train and evaluate steps) comes through here first.

    Raises:
        InvalidImageError: not an image, or a format we do not accept.
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels.
        ImageGeometryError: the aspect ratio is beyond 1:``MAX_ASPECT_RATIO``.
    """
    image = _open(data)
    width, height = image.size
    check_geometry(width, height, max_pixels=max_pixels)
    return ImageInfo(format=str(image.format), width=width, height=height)


def load_rgb(data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to an upright RGB picture, checking its size first.

    ``draft_size`` lets JPEG decoding skip work when only a smaller picture is
    needed (the DCT is scaled by 1/2, 1/4 or 1/8 while decoding), so a huge
    photo is never decoded at full size when a thumbnail or model input is all
    that is wanted.

    Raises:
        InvalidImageError: not a decodable image.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    return load_upright(data, max_pixels=max_pixels, draft_size=draft_size)[0]


def load_upright(
    data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_rgb`'s picture and :func:`upright_size`'s (width, height), parsing the header once.

    Every model input is decoded here (see :func:`taskvision.preprocess.decode_image`); opening
    the image once instead of four times saves a tenth of a millisecond per image.
    """
    image = _open(data)
    width, height = image.size
    check_geometry(width, height, max_pixels=max_pixels)
    size = (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if image.mode != "RGB":
            image = _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"The image data is corrupt: {exc}") from exc
    return image, size


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white (what a person sees in a browser)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def upright_size(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """Width and height as displayed (EXIF rotation applied), from the header only."""
    image = _open(data)
    probe(data, max_pixels=max_pixels)
    width, height = image.size
    if _orientation(image) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        return height, width
    return width, height


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: upright, also when the EXIF data cannot be read)."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def thumbnail_jpeg(data: bytes, *, max_side: int, max_pixels: int, quality: int = 85) -> bytes:
    """A JPEG thumbnail whose longer side is at most ``max_side`` pixels."""
    image = load_rgb(data, max_pixels=max_pixels, draft_size=(max_side, max_side))
    # reducing_gap: shrink by an integer factor first (fast), then resample the rest with LANCZOS.
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def downscale(data: bytes, *, max_shorter_side: int, max_pixels: int) -> bytes | None:
    """Re-encode an image so its shorter side is ``max_shorter_side``, if it is larger.

    Returns None when the image is already small enough (keep the original
    bytes). JPEG input stays JPEG (quality 95); anything else becomes PNG, so
    transparency and line art are not damaged.
    """
    info = probe(data, max_pixels=max_pixels)
    if min(info.width, info.height) <= max_shorter_side:
        return None
    image = _open(data)
    scale = max_shorter_side / min(info.width, info.height)
    try:
        if image.format == "JPEG":
            # Let the JPEG decoder do most of the shrinking (never a full-size decode).
            image.draft("RGB", (math.ceil(info.width * scale), math.ceil(info.height * scale)))
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"The image data is corrupt: {exc}") from exc
    width, height = image.size
    scale = max_shorter_side / min(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if info.format == "JPEG":
        image.convert("RGB").save(out, format="JPEG", quality=95)
    else:
        if image.mode not in _PNG_MODES:
            # PNG cannot hold CMYK, 32-bit integer/float and other TIFF modes.
            image = _to_rgb(image)
        image.save(out, format="PNG", optimize=False)
    return out.getvalue()
