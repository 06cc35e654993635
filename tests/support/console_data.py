"""Data for the console's tests: a version with real metrics without a training, and a task of 5,000 images.

* :func:`evaluated_bundle`: a servable linear bundle (``tests.support.bundles``) whose ``metrics``
  are computed by ``taskvision.metrics`` on a made-up test split (a noisy, mostly right model), so
  the evaluation pages have every figure to draw;
* :func:`add_images_directly`: thousands of image rows with their labels, written straight through
  the ORM (what 5,000 HTTP uploads would leave in the database, minus the wait); every row points
  at one real stored thumbnail, so the grid's images load too;
* :func:`store_predictions`: per-image predictions for a version, made by the evaluate step's own
  ``image_predictions`` and stored where the register step keeps them; :func:`evaluate_directly`
  the same for every labelled image of a task (a made-up, mostly right model);
* :func:`classify_answers_directly`: what classify with ``store_images`` leaves for the review queue.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from api.db.models import ImageLabel, ImagePrediction, Model, Task, TrainingImage
from api.services import review
from components.lib.evaluate import image_predictions, write_predictions
from components.lib.register import PREDICTIONS_FILE
from taskvision import blob_layout
from taskvision.bundle import BundleMeta
from taskvision.metrics import (
    best_f1_thresholds,
    classification_metrics,
    regression_metrics,
    tagging_metrics,
)
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType
from tests.support.bundles import linear_bundle
from tests.support.images import image_bytes


def evaluated_bundle(
    folder: Path,
    task_type: TaskType,
    names: list[str],
    *,
    seed: int = 0,
    test_images: int = 40,
    skill: float = 2.5,
) -> Path:
    """A linear bundle for ``names`` with the metrics of a made-up model on its test split.

    ``skill`` is how far the right answer stands out from the noise (2.5: mostly right).
    """
    rng = np.random.default_rng(seed)
    n = len(names)
    if task_type is TaskType.MULTI_CLASS:
        truth = rng.integers(0, n, size=test_images)
        logits = rng.normal(0, 1, size=(test_images, n))
        logits[np.arange(test_images), truth] += skill
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        metrics = classification_metrics(truth, probs, names)
    elif task_type is TaskType.MULTI_LABEL:
        truth = rng.integers(0, 2, size=(test_images, n))
        scores = np.clip(truth * 0.6 + rng.normal(0.2, 0.2, size=(test_images, n)), 0, 1)
        metrics = tagging_metrics(truth, scores, names, best_f1_thresholds(truth, scores))
    else:
        truth_values = rng.uniform(5, 45, size=(test_images, n))
        metrics = regression_metrics(
            truth_values, truth_values + rng.normal(0, 3, size=truth_values.shape), names
        )
    linear_bundle(folder, task_type, names, seed=seed)
    meta = json.loads((folder / "bundle.json").read_text())
    meta["metrics"] = metrics
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


def add_images_directly(
    session: Session,
    blobs: BlobStore,
    task: Task,
    count: int,
    *,
    label_ids: list[str],
    values: bool = False,
    test_share: float = 0.2,
    seed: int = 0,
) -> None:
    """``count`` image rows in ``task``'s workspace, labelled in turn with ``label_ids`` (none if empty)."""
    rng = random.Random(seed)
    picture = image_bytes(seed, size=(96, 96), fmt="JPEG")
    shared = hashlib.sha256(picture).hexdigest()
    key = blob_layout.thumb_key(task.workspace_id, shared)
    blobs.put(key, picture, content_type="image/jpeg")
    blobs.put(blob_layout.image_key(task.workspace_id, shared), picture, content_type="image/jpeg")
    for start in range(0, count, 1000):
        for i in range(start, min(count, start + 1000)):
            digest = hashlib.sha256(f"{task.id}-{seed}-{i}".encode()).hexdigest()
            image = TrainingImage(
                workspace_id=task.workspace_id,
                sha256=digest,
                blob_key=blob_layout.image_key(task.workspace_id, shared),
                thumb_key=key,
                content_type="image/jpeg",
                size_bytes=len(picture),
                width=96,
                height=96,
                meta_data={"file_name": f"generated-{i:05d}.jpg"},
                test_image=rng.random() < test_share,
            )
            if label_ids:
                value = float(rng.uniform(5, 45)) if values else None
                image.label_links.append(ImageLabel(label_id=label_ids[i % len(label_ids)], value=value))
            session.add(image)
        session.commit()


def store_predictions(
    blobs: BlobStore,
    bundle_uri: str,
    image_ids: list[str],
    targets: np.ndarray,
    outputs: np.ndarray,
    *,
    split: str = "test",
    tolerance: float = 0.0,
    append: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The version's per-image predictions for these answers (``append``: records kept before them)."""
    meta = BundleMeta.from_json(blobs.get(f"{bundle_uri}/bundle.json").decode())
    records = (append or []) + image_predictions(
        meta, split, image_ids, targets, outputs, tolerance=tolerance
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PREDICTIONS_FILE
        write_predictions(path, records)
        blobs.put(f"{bundle_uri}/{PREDICTIONS_FILE}", path.read_bytes())
    return records


def version_of(session: Session, task_id: str, number: int) -> Model:
    return session.query(Model).filter_by(task_id=task_id, version=number).one()


def evaluate_directly(
    session: Session, blobs: BlobStore, task: Task, model: Model, *, seed: int = 0, skill: float = 2.0
) -> list[dict[str, Any]]:
    """Per-image predictions of a made-up model for every labelled image of ``task``'s workspace: the
    test images as the test split, the others as training images answered out of fold.

    Categorization: noisy logits with ``skill`` added to the true label's; regression: the value plus
    noise of about 3.
    """
    rng = np.random.default_rng(seed)
    meta = BundleMeta.from_json(blobs.get(f"{model.bundle_uri}/bundle.json").decode())
    order = [label["id"] for label in meta.labels]
    records: list[dict[str, Any]] = []
    for split, is_test in (("test", True), ("train", False)):
        rows = [
            (image.id, link)
            for image in session.query(TrainingImage).filter_by(
                workspace_id=task.workspace_id, test_image=is_test
            )
            for link in image.label_links[:1]
            if link.label_id in order
        ]
        if not rows:
            continue
        ids = [image_id for image_id, _ in rows]
        if meta.task_type is TaskType.REGRESSION:
            targets = np.array([[float(link.value or 0.0)] for _, link in rows], dtype=np.float32)
            outputs = targets + rng.normal(0, 3, size=targets.shape).astype(np.float32)
            tolerance = 2.0 * 3.0 * 0.8  # about twice the MAE of that noise
        else:
            targets = np.array([order.index(link.label_id) for _, link in rows])
            logits = rng.normal(0, 1, size=(len(rows), len(order)))
            logits[np.arange(len(rows)), targets] += skill
            outputs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
            tolerance = 0.0
        records += image_predictions(meta, split, ids, targets, outputs, tolerance=tolerance)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PREDICTIONS_FILE
        write_predictions(path, records)
        blobs.put(f"{model.bundle_uri}/{PREDICTIONS_FILE}", path.read_bytes())
    return records


def classify_answers_directly(
    session: Session, task: Task, version: int, image_ids: list[str], *, seed: int = 0
) -> None:
    """What classify with ``store_images`` leaves for the review queue: the model's answer per image."""
    rng = random.Random(seed)
    names = [(label.id, label.name) for label in task.labels if label.negative_for_task != task.id]
    for image_id in image_ids:
        probs = [rng.random() for _ in names]
        total = sum(probs)
        labels = sorted(
            (
                {"id": lid, "name": name, "prob": round(p / total, 5)}
                for (lid, name), p in zip(names, probs, strict=True)
            ),
            key=lambda label: -float(label["prob"]),
        )
        answer = {"best_label": labels[0], "labels": labels}
        session.add(
            ImagePrediction(
                image_id=image_id,
                task_id=task.id,
                version=version,
                answer=answer,
                uncertainty=review.uncertainty(TaskType(task.type), answer),
            )
        )
    session.commit()
