"""Every generated image the tests use, in one place (no real photos: those are in ../shared/datasets).

* :func:`image_bytes`: a distinct picture per seed (coloured background, a few rectangles), PNG or JPEG;
* learnable sets for training tests: :func:`shape_image` (red circles vs blue squares, multi_class),
  :func:`tag_image` (a red blob and/or stripes, or neither: multi_label), :func:`size_image`
  (a disc whose radius is the value: regression);
* hostile inputs: :func:`bomb_png` (a tiny PNG declaring a huge size), :func:`solid_png` (any
  width x height, e.g. an elongated 60000x1 strip).
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageDraw


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def image_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A distinct image per seed: a coloured background with a few random shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(1, size[0]), y0 + rng.randrange(1, size[1])
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return encode(image, fmt)


def solid_png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A one-colour PNG of any size (a 60000x1 strip is 254 bytes)."""
    return encode(Image.new("RGB", (width, height), colour))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A small, well-formed PNG whose header declares ``width`` x ``height`` pixels.

    Its IDAT holds a few compressed rows of zeros, so the file is a few KB while
    a decoder that trusted the header would allocate width*height*3 bytes.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(b"\x00" * (1 + width * 3) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _canvas(rng: random.Random, size: int = 96) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), tuple(rng.randrange(170, 256) for _ in range(3)))
    return image, ImageDraw.Draw(image)


def shape_image(kind: str, seed: int) -> bytes:
    rng = random.Random(f"shape-{kind}-{seed}")
    image, draw = _canvas(rng)
    x, y, r = rng.randrange(25, 71), rng.randrange(25, 71), rng.randrange(12, 24)
    jitter = [rng.randrange(-30, 30) for _ in range(3)]
    if kind == "circle":
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=(200 + jitter[0] // 3, 30 + jitter[1], 30 + jitter[2])
        )
    else:
        draw.rectangle(
            (x - r, y - r, x + r, y + r), fill=(30 + jitter[0], 40 + jitter[1], 200 + jitter[2] // 3)
        )
    return encode(image)


def tag_image(red: bool, striped: bool, seed: int) -> bytes:
    rng = random.Random(f"tags-{red}-{striped}-{seed}")
    image, draw = _canvas(rng)
    if striped:
        step = rng.randrange(8, 14)
        for y0 in range(0, 96, step):
            draw.rectangle((0, y0, 95, y0 + step // 2 - 1), fill=(20, 20, 20))
    if red:
        x, y, r = rng.randrange(25, 71), rng.randrange(25, 71), rng.randrange(14, 22)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(230, 20, 20))
    return encode(image)


def size_image(radius: int, seed: int) -> bytes:
    rng = random.Random(f"size-{radius}-{seed}")
    image, draw = _canvas(rng)
    c = 48 + rng.randrange(-4, 5)
    draw.ellipse((c - radius, c - radius, c + radius, c + radius), fill=(20, 90, 200))
    return encode(image)
