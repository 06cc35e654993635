"""Procedural sample datasets for `dvc repro` (the `generate` stage).

The project ships no photos, so the sample data is drawn: one dataset per task type,
deterministic from ``generate.seed`` in params.yaml (each image from its own seed, so
adding images never changes the others), varied enough that the task is not trivial:
random backgrounds (flat, gradient or blotchy), positions, sizes, rotations and
colours, thin distractor lines, pixel noise, blur and partial occlusion.

* ``shapes`` (multi_class): a circle, square or triangle in any colour;
* ``tags`` (multi_label): an object whose fill is red, blue or another colour, plain,
  striped or dotted; tags are the colour (red/blue) and the pattern (striped/dotted),
  and an object with neither carries the negative label ``none``;
* ``sizes`` (regression): one object of any shape; the value is its size in percent
  of the image side.

Output per dataset, under ``<out>/``: ``images/*.png`` and ``labels.json`` (the
task type, the labels, and each image's labels/values). The ``snapshot`` stage
turns that into a dataset snapshot.

Usage: ``python data/generate.py DATASET --out data/generated/DATASET [--params params.yaml]``
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

DATASETS: dict[str, dict[str, Any]] = {
    "shapes": {
        "task_type": "multi_class",
        "labels": [{"id": name, "name": name} for name in ("circle", "square", "triangle")],
    },
    "tags": {
        "task_type": "multi_label",
        "labels": [
            *({"id": name, "name": name} for name in ("red", "blue", "striped", "dotted")),
            {"id": "none", "name": "none", "negative": True},
        ],
    },
    "sizes": {"task_type": "regression", "labels": [{"id": "size", "name": "size"}]},
}
SHAPES = ("circle", "square", "triangle")


# ---- colours and backgrounds -----------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _background(rng: random.Random, size: int, *, max_saturation: float) -> Image.Image:
    """A flat, gradient or blotchy (upscaled random grid) background."""

    def colour() -> RGB:
        return _hsv(rng.random(), rng.uniform(0.0, max_saturation), rng.uniform(0.25, 0.95))

    kind = rng.choice(("flat", "gradient", "blotchy"))
    if kind == "flat":
        return Image.new("RGB", (size, size), colour())
    if kind == "gradient":
        a, b = colour(), colour()
        strip = Image.new("RGB", (1, size))
        for y in range(size):
            t = y / (size - 1)
            strip.putpixel((0, y), tuple(round(a[i] * (1 - t) + b[i] * t) for i in range(3)))
        image = strip.resize((size, size))
        return image.rotate(rng.choice((0, 90, 180, 270)))
    cells = rng.randrange(3, 7)
    grid = Image.new("RGB", (cells, cells))
    for x in range(cells):
        for y in range(cells):
            grid.putpixel((x, y), colour())
    return grid.resize((size, size), Image.Resampling.BICUBIC)


def _contrasting(rng: random.Random, background: Image.Image, pick: Any) -> RGB:
    """A colour from ``pick(rng)`` that stands out from the background's mean brightness."""
    mean = _luma(background.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
    best = pick(rng)
    for _ in range(20):
        if abs(_luma(best) - mean) >= 45:
            break
        best = pick(rng)
    return best


def _distractors(rng: random.Random, draw: ImageDraw.ImageDraw, size: int, count: int) -> None:
    for _ in range(count):
        points = [(rng.randrange(size), rng.randrange(size)) for _ in range(2)]
        colour = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.1, 1.0))
        draw.line(points, fill=colour, width=rng.randrange(1, 3))


# ---- shapes ------------------------------------------------------------------------------


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a shape of "radius" ``r`` (circles as 48-gons)."""
    corners = {"circle": 48, "square": 4, "triangle": 3}[kind]
    if kind == "square":
        r *= 0.9 * math.sqrt(2)  # about the circle's area, so size does not give the class away
    if kind == "triangle":
        r *= 1.25
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * k / corners),
            cy + r * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def _draw_object(
    image: Image.Image, polygon: list[tuple[float, float]], fill: RGB, pattern: str, rng: random.Random
) -> None:
    """Fill ``polygon`` with ``fill`` and, masked to it, stripes or dots."""
    size = image.width
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    layer = Image.new("RGB", image.size, fill)
    if pattern != "plain":
        ink = (255, 255, 255) if _luma(fill) < 110 else (15, 15, 15)
        if rng.random() < 0.3:
            ink = _hsv(rng.random(), rng.uniform(0.0, 0.3), 1.0 if _luma(fill) < 110 else 0.1)
        draw = ImageDraw.Draw(layer)
        if pattern == "striped":
            step = rng.randrange(7, 13)
            width = max(2, step // 2 - rng.randrange(0, 2))
            angle = rng.uniform(0, math.pi)
            dx, dy = math.cos(angle), math.sin(angle)
            for offset in range(-size, 2 * size, step):
                cx, cy = size / 2 + dy * offset, size / 2 - dx * offset
                a = (cx - dx * size * 1.5, cy - dy * size * 1.5)
                b = (cx + dx * size * 1.5, cy + dy * size * 1.5)
                draw.line([a, b], fill=ink, width=width)
        else:  # dotted
            step = rng.randrange(8, 13)
            radius = rng.uniform(1.8, step / 3.2)
            for gx in range(0, size + step, step):
                for gy in range(0, size + step, step):
                    x = gx + rng.uniform(-1.5, 1.5) + (step / 2 if (gy // step) % 2 else 0)
                    y = gy + rng.uniform(-1.5, 1.5)
                    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    image.paste(layer, (0, 0), mask)


def _finish(image: Image.Image, rng: random.Random, target_box: tuple[float, float, float, float]) -> bytes:
    """Occlusion (sometimes), blur (sometimes), pixel noise; PNG bytes."""
    size = image.width
    if rng.random() < 0.3:
        x0, y0, x1, y1 = target_box
        w, h = (x1 - x0) * rng.uniform(0.15, 0.35), (y1 - y0) * rng.uniform(0.15, 0.35)
        ox = rng.choice((x0 - w / 2, x1 - w / 2)) + rng.uniform(-w / 4, w / 4)
        oy = rng.uniform(y0, y1 - h)
        colour = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.9))
        ImageDraw.Draw(image).rectangle((ox, oy, ox + w, oy + h), fill=colour)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    # Grey Gaussian noise blended in (numpy, seeded: PIL's effect_noise is not reproducible).
    noise = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.uniform(20, 60), (size, size, 1))
    alpha = rng.uniform(0.04, 0.14)
    blended = np.asarray(image, dtype=np.float32) * (1 - alpha) + noise * alpha
    image = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _placed(rng: random.Random, size: int, r_min: float, r_max: float) -> tuple[float, float, float]:
    r = rng.uniform(r_min, r_max) * size
    margin = r * 0.8  # the object may touch or slightly cross the border
    return rng.uniform(margin, size - margin), rng.uniform(margin, size - margin), r


def _saturated(rng: random.Random) -> RGB:
    return _hsv(rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0))


# ---- the three datasets ------------------------------------------------------------------


def shape_image(kind: str, rng: random.Random, size: int) -> bytes:
    image = _background(rng, size, max_saturation=0.6)
    _distractors(rng, ImageDraw.Draw(image), size, rng.randrange(0, 4))
    cx, cy, r = _placed(rng, size, 0.14, 0.32)
    polygon = _outline(kind, cx, cy, r * rng.uniform(0.95, 1.05), rng.uniform(0, 2 * math.pi))
    _draw_object(image, polygon, _contrasting(rng, image, _saturated), "plain", rng)
    return _finish(image, rng, (cx - r, cy - r, cx + r, cy + r))


def _fill(colour: str, rng: random.Random) -> RGB:
    if colour == "red":
        return _hsv(rng.uniform(-0.025, 0.025), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    if colour == "blue":
        return _hsv(rng.uniform(0.58, 0.66), rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
    if rng.random() < 0.2:  # grey
        return _hsv(0, rng.uniform(0, 0.1), rng.uniform(0.3, 0.9))
    # yellow to green to teal, or purple: never near red or blue
    hue = rng.uniform(0.1, 0.45) if rng.random() < 0.75 else rng.uniform(0.76, 0.86)
    return _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))


def tag_image(colour: str, pattern: str, rng: random.Random, size: int) -> bytes:
    image = _background(rng, size, max_saturation=0.2)
    _distractors(rng, ImageDraw.Draw(image), size, rng.randrange(0, 3))
    cx, cy, r = _placed(rng, size, 0.24, 0.36)
    polygon = _outline(rng.choice(SHAPES), cx, cy, r, rng.uniform(0, 2 * math.pi))
    _draw_object(image, polygon, _fill(colour, rng), pattern, rng)
    return _finish(image, rng, (cx - r, cy - r, cx + r, cy + r))


def size_image(rng: random.Random, size: int) -> tuple[bytes, float]:
    """One object; the value is its width (circle diameter, about) in percent of the image side."""
    image = _background(rng, size, max_saturation=0.6)
    _distractors(rng, ImageDraw.Draw(image), size, rng.randrange(0, 4))
    cx, cy, r = _placed(rng, size, 0.06, 0.4)
    polygon = _outline(rng.choice(SHAPES), cx, cy, r, rng.uniform(0, 2 * math.pi))
    _draw_object(image, polygon, _contrasting(rng, image, _saturated), "plain", rng)
    return _finish(image, rng, (cx - r, cy - r, cx + r, cy + r)), round(200 * r / size, 1)


def generate(dataset: str, out: Path, *, seed: int, images_per_label: int, image_size: int) -> dict[str, Any]:
    """Draw ``dataset`` into ``out`` (replacing it) and return its labels.json content."""
    spec = DATASETS[dataset]
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    entries: list[dict[str, Any]] = []

    def save(name: str, data: bytes, labels: list[str], values: dict[str, float] | None = None) -> None:
        (out / "images" / f"{name}.png").write_bytes(data)
        entries.append({"file": f"images/{name}.png", "labels": labels, "values": values or {}})

    total = 3 * images_per_label  # every dataset has about 3 x images_per_label images
    for i in range(total):
        rng = random.Random(f"{seed}:{dataset}:{i}")
        if dataset == "shapes":
            kind = SHAPES[i % 3]
            save(f"{kind}-{i:04d}", shape_image(kind, rng, image_size), [kind])
        elif dataset == "tags":
            # The 9 combinations in turn: each tag is on about images_per_label images.
            colour = ("red", "blue", "other")[i % 3]
            pattern = ("striped", "dotted", "plain")[(i // 3) % 3]
            tags = [t for t in (colour, pattern) if t not in ("other", "plain")] or ["none"]
            save(f"{'-'.join(tags)}-{i:04d}", tag_image(colour, pattern, rng, image_size), tags)
        else:
            data, value = size_image(rng, image_size)
            save(f"size-{i:04d}", data, ["size"], {"size": value})
    meta = {"dataset": dataset, "task_type": spec["task_type"], "labels": spec["labels"], "images": entries}
    (out / "labels.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text())["generate"]
    meta = generate(
        args.dataset,
        args.out,
        seed=int(params["seed"]),
        images_per_label=int(params["images_per_label"]),
        image_size=int(params.get("image_size", 128)),
    )
    print(f"{args.dataset}: {len(meta['images'])} images in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
