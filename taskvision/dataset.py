"""The dataset snapshot: an immutable, self-contained description of a task's training data.

Layout in the blob store (``<prefix>`` is :func:`taskvision.blob_layout.dataset_prefix`)::

    <prefix>/dataset.json     task type, ordered labels, counts, when it was made
    <prefix>/manifest.jsonl   one line per image (ManifestRow)

Images are referenced by their content-addressed blob key and SHA-256, so a
snapshot stays valid after the user edits or relabels images later. The
control plane writes snapshots; the pipeline steps, ``dvc repro`` and tests
read them. Nothing here touches the database.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


@dataclass(frozen=True)
class LabelInfo:
    id: str
    name: str
    negative: bool = False  # the "no tag" label of a multi_label task


@dataclass(frozen=True)
class ManifestRow:
    image_id: str
    blob_key: str
    sha256: str
    labels: list[str]  # ids of this task's labels on the image
    values: dict[str, float] = field(default_factory=dict)  # regression: label id -> value
    test_image: bool = False  # the user asked for this image to be in the test split
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class DatasetInfo:
    task_id: str
    task_type: TaskType
    labels: list[LabelInfo]
    snapshot_id: str
    created: str
    count: int

    @property
    def output_labels(self) -> list[LabelInfo]:
        """Labels the model predicts: every label but the negative one (it means "none of them")."""
        return [label for label in self.labels if not label.negative]


def write_snapshot(store: BlobStore, prefix: str, info: DatasetInfo, rows: list[ManifestRow]) -> None:
    """Write the manifest first and dataset.json last: a snapshot with dataset.json is complete."""
    lines = "".join(json.dumps(asdict(row), sort_keys=True) + "\n" for row in rows)
    store.put(f"{prefix}/manifest.jsonl", lines.encode(), content_type="application/jsonl")
    meta = asdict(info)
    meta["task_type"] = str(info.task_type)
    store.put(f"{prefix}/dataset.json", json.dumps(meta, indent=2).encode(), content_type="application/json")


def read_snapshot(store: BlobStore, prefix: str) -> tuple[DatasetInfo, list[ManifestRow]]:
    meta: dict[str, Any] = json.loads(store.get(f"{prefix}/dataset.json"))
    info = DatasetInfo(
        task_id=meta["task_id"],
        task_type=TaskType(meta["task_type"]),
        labels=[LabelInfo(**label) for label in meta["labels"]],
        snapshot_id=meta["snapshot_id"],
        created=meta["created"],
        count=meta["count"],
    )
    rows = [
        ManifestRow(**json.loads(line))
        for line in store.get(f"{prefix}/manifest.jsonl").decode().splitlines()
        if line.strip()
    ]
    return info, rows


def read_manifest_records(store: BlobStore, prefix: str) -> list[dict[str, Any]]:
    """The manifest as plain dicts (what the data-validation suite checks, before any parsing)."""
    return [
        json.loads(line)
        for line in store.get(f"{prefix}/manifest.jsonl").decode().splitlines()
        if line.strip()
    ]
