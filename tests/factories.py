"""Small builders for test data: generated images and API objects."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from taskvision.task_types import TaskType


def image_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A distinct image per seed: a coloured background with a few random shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(1, size[0]), y0 + rng.randrange(1, size[1])
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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


def create_task(client: TestClient, task_type: str = "multi_class", name: str = "task") -> dict[str, Any]:
    response = client.post("/recognition/v2/task", json={"name": name, "type": task_type})
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_label(client: TestClient, label_type: str = "category", name: str = "label") -> dict[str, Any]:
    response = client.post("/recognition/v2/label", json={"name": name, "type": label_type})
    assert response.status_code == 201, response.text
    return dict(response.json())


def upload(client: TestClient, data: bytes, **options: Any) -> dict[str, Any]:
    response = client.post("/recognition/v2/training-image", json={"base64": b64(data), **options})
    assert response.status_code == 201, response.text
    return dict(response.json())


def linear_bundle(folder: Path, task_type: TaskType, label_names: list[str], *, seed: int = 0) -> Path:
    """A model bundle with a random linear head over the served backbone embedding (no training).

    Good for what needs a servable version but not a meaningful one (imports, limits, decoding).
    """
    from taskvision.backbone import BACKBONE_ID, EMBEDDING_DIM
    from taskvision.bundle import BundleMeta, linear_head_onnx
    from taskvision.preprocess import DEFAULT

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.01, size=(len(label_names), EMBEDDING_DIM)).astype(np.float32)
    bias = np.zeros(len(label_names), dtype=np.float32)
    meta = BundleMeta(
        task_id="",
        task_type=task_type,
        labels=[{"id": f"label-{i}", "name": name} for i, name in enumerate(label_names)],
        backbone=BACKBONE_ID,
        frozen_backbone=True,
        input_size=DEFAULT.input_size,
        preprocess={"resize_to": DEFAULT.resize_to, "mean": list(DEFAULT.mean), "std": list(DEFAULT.std)},
        thresholds=[0.5] * len(label_names) if task_type is TaskType.MULTI_LABEL else [],
        target_mean=[0.0] * len(label_names) if task_type is TaskType.REGRESSION else [],
        target_std=[1.0] * len(label_names) if task_type is TaskType.REGRESSION else [],
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / meta.weights_file).write_bytes(linear_head_onnx(weight, bias))
    (folder / "bundle.json").write_text(meta.to_json())
    return folder
