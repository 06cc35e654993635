"""Dataset snapshots for pipeline-step tests: manifest rows with generated images in a blob store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from taskvision import blob_layout
from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType
from tests.support.images import image_bytes, shape_image


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def put_blob(store: BlobStore, data: bytes) -> tuple[str, str]:
    """Store ``data`` content-addressed, as the API does; returns (blob key, sha256)."""
    digest = hashlib.sha256(data).hexdigest()
    key = blob_layout.image_key("ws", digest)
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
            key, digest = put_blob(
                self.store, data if data is not None else image_bytes(self._n, size=self.size)
            )
        else:
            digest = digest or sha(image_id)
            key = blob_layout.image_key("ws", digest)
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


def shapes_in_store(store: BlobStore, per_label: int) -> tuple[DatasetInfo, list[ManifestRow]]:
    """A multi_class snapshot of ``per_label`` circles (L0) and squares (L1), their bytes put in ``store``.

    For tests that run the pipeline's library steps directly, without the API.
    """
    rows = []
    for kind, label in (("circle", "L0"), ("square", "L1")):
        for i in range(per_label):
            data = shape_image(kind, i)
            sha = hashlib.sha256(data).hexdigest()
            key = blob_layout.image_key("ws", sha)
            store.put(key, data)
            rows.append(ManifestRow(image_id=f"{kind}{i}", blob_key=key, sha256=sha, labels=[label]))
    info = DatasetInfo(
        "t", TaskType.MULTI_CLASS, [LabelInfo("L0", "circle"), LabelInfo("L1", "square")], "s", "", len(rows)
    )
    return info, rows
