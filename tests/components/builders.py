"""Small builders for pipeline-step tests: snapshots, rows and generated images in a local blob store."""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


def png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A distinct little PNG per seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(size[0]), rng.randrange(size[1])
    draw.rectangle(
        (x, y, x + size[0] // 3, y + size[1] // 3), fill=tuple(rng.randrange(256) for _ in range(3))
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def put_blob(store: BlobStore, data: bytes) -> tuple[str, str]:
    """Store ``data`` content-addressed, as the API does; returns (blob key, sha256)."""
    digest = hashlib.sha256(data).hexdigest()
    key = f"images/ws/{digest[:2]}/{digest}"
    store.put(key, data)
    return key, digest


def info(task_type: TaskType, labels: list[LabelInfo], count: int = 0) -> DatasetInfo:
    return DatasetInfo(
        task_id="task-1",
        task_type=task_type,
        labels=labels,
        snapshot_id="snap-1",
        created="2024-01-01T00:00:00+00:00",
        count=count,
    )


@dataclass
class RowMaker:
    """Makes manifest rows; with a store, each row gets its own generated image stored in it."""

    store: BlobStore | None = None
    size: tuple[int, int] = (32, 32)
    _n: int = 0
    rows: list[ManifestRow] = field(default_factory=list)

    def add(
        self,
        labels: list[str],
        *,
        values: dict[str, float] | None = None,
        test_image: bool = False,
        data: bytes | None = None,
        digest: str | None = None,
        **extra: Any,
    ) -> ManifestRow:
        self._n += 1
        image_id = f"img-{self._n:04d}"
        if self.store is not None:
            key, digest = put_blob(self.store, data if data is not None else png(self._n, self.size))
        else:
            digest = digest or sha(image_id)
            key = f"images/ws/{digest[:2]}/{digest}"
        row = ManifestRow(
            image_id=image_id,
            blob_key=key,
            sha256=digest,
            labels=labels,
            values=values or {},
            test_image=test_image,
            **extra,
        )
        self.rows.append(row)
        return row

    def many(self, count: int, labels: list[str], **kwargs: Any) -> list[ManifestRow]:
        return [self.add(list(labels), **kwargs) for _ in range(count)]


class FakeArtifact:
    """What a KFP component body sees of an Input/Output artifact: ``.path`` and ``.metadata``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.metadata: dict[str, Any] = {}
