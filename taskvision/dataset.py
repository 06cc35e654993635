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
import math
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


@dataclass
class Trainability:
    """Whether a snapshot's labels can be trained on, from the labels alone (no image is read).

    The one set of rules behind both the train request's immediate answer (the API's fail-fast
    check) and the pipeline's validate step, which adds the checks that need the image bytes.
    """

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # images per label name
    image_ids: list[str] = field(default_factory=list)  # images at fault (e.g. two categories)

    @property
    def ok(self) -> bool:
        return not self.problems


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _images_have(n: int) -> str:
    return f"{n} image has" if n == 1 else f"{n} images have"


def trainability(info: DatasetInfo, rows: list[ManifestRow], *, min_images_per_label: int) -> Trainability:
    """Every reason the labels of ``rows`` cannot train a model of ``info``'s type, in words."""
    report = Trainability()
    classification = info.task_type is not TaskType.REGRESSION
    if not rows:
        report.problems.append("The task has no labelled training images.")
    if classification and len(info.labels) < 2:
        report.problems.append(f"The task has {len(info.labels)} label(s); at least 2 are needed to train.")
    if not classification and not info.output_labels:
        report.problems.append("A regression task needs a value label.")
    per_label: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for row in rows:
        for lid in row.labels:
            per_label[lid] = per_label.get(lid, 0) + 1
            if not row.test_image:
                trainable[lid] = trainable.get(lid, 0) + 1
    if rows and info.task_type is TaskType.MULTI_CLASS:
        several = [row.image_id for row in rows if len(row.labels) > 1]
        if several:
            report.problems.append(
                f"{_images_have(len(several))} more than one category of this task; "
                "a categorization image needs exactly one."
            )
            report.image_ids.extend(several)
    if rows and info.task_type is TaskType.REGRESSION:
        for label in info.output_labels:
            missing = [row.image_id for row in rows if not _finite(row.values.get(label.id))]
            if missing:
                report.problems.append(f"{_images_have(len(missing))} no finite value for '{label.name}'.")
                report.image_ids.extend(missing)
    for label in info.labels:
        count = per_label.get(label.id, 0)
        report.counts[label.name] = count
        if label.negative or not rows:
            continue
        if count and not trainable.get(label.id):
            report.problems.append(
                f"label '{label.name}' has no training images: all {count} are marked as test images"
            )
        elif count < min_images_per_label:
            what = _images(count) if classification else f"{_images(count)} with a value"
            report.problems.append(
                f"label '{label.name}' has {what}; at least {min_images_per_label} are needed"
            )
    return report
