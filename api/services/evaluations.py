"""A model version's evaluation you can act on: per-image predictions and the report.

The evaluate step writes, and the register step stores beside the bundle
(``models/<task>/<run>/``):

* ``predictions.jsonl``: one line per image the version was judged on: the test
  split's images (``split: "test"``, answered by the trained model) and the
  training images' out-of-fold predictions from model selection (``split:
  "train"``: each answered by a model that did not see it), with the true and
  predicted labels (or values), every score, the confidence and whether it was
  right (``components/lib/evaluate.py`` defines each field);
* ``report.md``: the Markdown evaluation report (metrics, per label, the
  confusion matrix, the model selection).

This module reads them for the API: filters and sorts predictions and finds the
training images the model disagrees with most (likely label errors, for the
review queue). Versions from before per-image predictions have none; their
report is rebuilt from the stored metrics.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from api.db.models import Model
from components.lib.evaluate import markdown_report
from components.lib.register import PREDICTIONS_FILE, REPORT_FILE
from taskvision.bundle import BundleMeta
from taskvision.errors import NotFoundError
from taskvision.metrics import current_names
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

Split = Literal["test", "train", "all"]
Order = Literal["-confidence", "confidence"]

_CACHE_SIZE = 8  # versions whose predictions stay parsed (the files never change once registered)
_cache: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class PredictionFilter:
    split: Split = "test"
    wrong: bool | None = None
    true_label: str | None = None  # a label id or name
    predicted_label: str | None = None
    order: Order = "-confidence"


def read_predictions(blobs: BlobStore, model: Model) -> list[dict[str, Any]]:
    """Every per-image prediction of the version's evaluation ([] for a version from before them)."""
    if not model.bundle_uri:
        return []
    key = f"{model.bundle_uri}/{PREDICTIONS_FILE}"
    where = blobs.uri(key)  # the store's own address: two stores never share an entry
    with _cache_lock:
        if where in _cache:
            _cache.move_to_end(where)
            return _cache[where]
    try:
        text = blobs.get(key).decode()
    except NotFoundError:
        return []
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    with _cache_lock:
        _cache[where] = records
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return records


def forget(blobs: BlobStore, model: Model) -> None:
    """Drop a deleted version's parsed predictions."""
    if not model.bundle_uri:
        return
    with _cache_lock:
        _cache.pop(blobs.uri(f"{model.bundle_uri}/{PREDICTIONS_FILE}"), None)


def _mentions(labels: list[dict[str, Any]], wanted: str) -> bool:
    return any(wanted in (str(label.get("id")), str(label.get("name"))) for label in labels)


def _strength(record: dict[str, Any]) -> float:
    """How strongly the model stood by its answer: its confidence, or for regression its error."""
    if record.get("confidence") is not None:
        return float(record["confidence"])
    return float(record.get("error") or 0.0)


def select(predictions: list[dict[str, Any]], wanted: PredictionFilter) -> list[dict[str, Any]]:
    """The predictions that pass the filter, the most confident first (so confident mistakes lead);
    ``order="confidence"`` puts the least confident first. Regression sorts by the error instead."""
    chosen = [
        p
        for p in predictions
        if (wanted.split == "all" or p.get("split") == wanted.split)
        and (wanted.wrong is None or p.get("correct") is (not wanted.wrong))
        and (wanted.true_label is None or _mentions(p.get("true_labels") or [], wanted.true_label))
        and (
            wanted.predicted_label is None
            or _mentions(p.get("predicted_labels") or [], wanted.predicted_label)
        )
    ]
    sign = -1.0 if wanted.order == "-confidence" else 1.0
    return sorted(chosen, key=lambda p: (sign * _strength(p), str(p.get("image_id"))))


def disagreements(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labelled images the model gets wrong, the most confidently wrong first (likely label errors)."""
    return select(predictions, PredictionFilter(split="all", wrong=True))


def bundle_meta(blobs: BlobStore, model: Model) -> BundleMeta | None:
    if not model.bundle_uri:
        return None
    try:
        return BundleMeta.from_json(blobs.get(f"{model.bundle_uri}/bundle.json").decode())
    except NotFoundError:
        return None


def report(blobs: BlobStore, model: Model) -> dict[str, Any]:
    """The version's evaluation report: Markdown, every metric (today's names), the model selection."""
    task_type = TaskType(model.task.type)
    metrics = current_names(task_type.value, model.metrics or {})
    meta = bundle_meta(blobs, model)
    selection = meta.selection if meta is not None else None
    try:
        if not model.bundle_uri:
            raise NotFoundError("no bundle")
        markdown = blobs.get(f"{model.bundle_uri}/{REPORT_FILE}").decode()
    except NotFoundError:  # a version from before stored reports, or an imported bundle
        markdown = markdown_report(task_type, metrics, selection=selection)
    return {
        "model": model.id,
        "task": model.task_id,
        "version": model.version,
        "task_type": task_type.value,
        "markdown": markdown,
        "metrics": metrics,
        "selection": selection or {},
        "training": meta.training if meta is not None else {},
    }
