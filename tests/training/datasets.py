"""Generated, learnable image datasets for training tests (no real photos needed).

* shapes (multi_class): red circles vs blue squares, on varied backgrounds;
* tags (multi_label): a red blob and/or stripes, or neither (the negative label);
* sizes (regression): a disc whose radius is the value to predict.
"""

from __future__ import annotations

import hashlib
import io
import random

from PIL import Image, ImageDraw

from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


def _canvas(rng: random.Random, size: int = 96) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), tuple(rng.randrange(170, 256) for _ in range(3)))
    return image, ImageDraw.Draw(image)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


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
    return _png(image)


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
    return _png(image)


def size_image(radius: int, seed: int) -> bytes:
    rng = random.Random(f"size-{radius}-{seed}")
    image, draw = _canvas(rng)
    c = 48 + rng.randrange(-4, 5)
    draw.ellipse((c - radius, c - radius, c + radius, c + radius), fill=(20, 90, 200))
    return _png(image)


def shapes_in_store(store: BlobStore, per_label: int) -> tuple[DatasetInfo, list[ManifestRow]]:
    """A multi_class snapshot of ``per_label`` circles (L0) and squares (L1), their bytes put in ``store``.

    For tests that run the pipeline's library steps directly, without the API.
    """
    rows = []
    for kind, label in (("circle", "L0"), ("square", "L1")):
        for i in range(per_label):
            data = shape_image(kind, i)
            sha = hashlib.sha256(data).hexdigest()
            store.put(f"images/{sha}", data)
            rows.append(
                ManifestRow(image_id=f"{kind}{i}", blob_key=f"images/{sha}", sha256=sha, labels=[label])
            )
    info = DatasetInfo(
        "t", TaskType.MULTI_CLASS, [LabelInfo("L0", "circle"), LabelInfo("L1", "square")], "s", "", len(rows)
    )
    return info, rows
