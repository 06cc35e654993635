"""Entry points of the ``dvc repro`` stages (``dvc.yaml``): the KFP pipeline's steps, offline.

Each stage is ``python -m pipelines.dvc_stages STAGE DATASET``; parameters come from
``params.yaml`` and every path from the dataset's name (see :class:`Paths`), so the
deps/outs that ``dvc.yaml`` declares are exactly what a stage reads and writes::

    generate  (data/generate.py)   data/generated/<ds>/        images + labels.json
    snapshot                       data/snapshots/<ds>/        a blob store: images/..., datasets/<ds>/<id>/
    validate                       data/reports/<ds>.md        great-expectations + image checks
    split                          data/splits/<ds>.json       train/test image ids
    train                          data/models/<ds>/           bundle.json, head.onnx, test_inputs.npz
    evaluate                       data/metrics/<ds>.json      + data/plots/<ds>.json
    export                         data/bundles/<ds>/          bundle.json (with metrics) + weights

The work is done by the same library functions the KFP components call
(``components.lib.*``) on the same snapshot format the control plane writes
(``taskvision.dataset``), so a bundle from ``dvc repro`` can be registered with
``taskvision import-bundle data/bundles/<ds> --task ID``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from taskvision import blob_layout
from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow, read_snapshot, write_snapshot
from taskvision.storage import BlobStore, LocalBlobStore
from taskvision.task_types import TaskType

logger = logging.getLogger("pipelines.dvc_stages")

WORKSPACE = "sample"  # the blob-key "workspace" of generated images (images/<workspace>/<sha[:2]>/<sha>)
EMBEDDINGS = "embeddings/"


class StageError(Exception):
    """A stage cannot run: the message says why (printed without a traceback)."""


@dataclass(frozen=True)
class Paths:
    """Where each stage of one dataset reads and writes, under ``root`` (``data/``)."""

    root: Path
    dataset: str

    @property
    def generated(self) -> Path:
        return self.root / "generated" / self.dataset

    @property
    def store(self) -> Path:
        return self.root / "snapshots" / self.dataset

    @property
    def report(self) -> Path:
        return self.root / "reports" / f"{self.dataset}.md"

    @property
    def split(self) -> Path:
        return self.root / "splits" / f"{self.dataset}.json"

    @property
    def model(self) -> Path:
        return self.root / "models" / self.dataset

    @property
    def metrics(self) -> Path:
        return self.root / "metrics" / f"{self.dataset}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots" / f"{self.dataset}.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundles" / self.dataset


def load_params(path: Path) -> dict[str, Any]:
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise StageError(f"{path} is not a mapping of parameters.")
    return params


def _section(params: dict[str, Any], name: str) -> dict[str, Any]:
    section = params.get(name)
    if not isinstance(section, dict):
        raise StageError(f"params.yaml has no '{name}' section.")
    return section


def find_snapshot(store: BlobStore, snapshot: str | None = None) -> str:
    """The snapshot prefix to use: ``snapshot`` itself, or the only one in ``store``."""
    if snapshot:
        return snapshot.strip("/")
    found = sorted(
        key.rsplit("/", 1)[0]
        for key in store.list_keys(f"{blob_layout.DATASETS}/")
        if key.endswith("/dataset.json")
    )
    if len(found) != 1:
        raise StageError(
            f"Expected one dataset snapshot in the store, found {found or 'none'}: pass --snapshot."
        )
    return found[0]


class EmbeddingCacheStore:
    """The snapshot's blob store, with the train step's embedding cache kept outside it.

    ``embed_rows`` caches embeddings under ``embeddings/...`` in the store it is given;
    written into ``data/snapshots/<ds>`` they would change another stage's output. They
    go to ``<TASKVISION_CACHE_DIR>/dvc-embeddings`` instead (keyed by backbone and image
    hash, like the control plane's cache), so a retrain only embeds new images.
    """

    def __init__(self, base: BlobStore, cache: BlobStore) -> None:
        self.base = base
        self.cache = cache

    def _pick(self, key: str) -> BlobStore:
        return self.cache if key.startswith(EMBEDDINGS) else self.base

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self._pick(key).put(key, data, content_type=content_type)

    def get(self, key: str) -> bytes:
        return self._pick(key).get(key)

    def exists(self, key: str) -> bool:
        return self._pick(key).exists(key)

    def delete(self, key: str) -> None:
        self._pick(key).delete(key)

    def delete_prefix(self, prefix: str) -> int:
        return self._pick(prefix).delete_prefix(prefix)

    def list_keys(self, prefix: str = "") -> list[str]:
        return self._pick(prefix).list_keys(prefix)

    def uri(self, key: str) -> str:
        return self._pick(key).uri(key)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- stages ------------------------------------------------------------------------------------


def snapshot(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    """Turn the generated images into a dataset snapshot, in the control plane's format.

    Images are stored content-addressed (``images/<workspace>/<sha[:2]>/<sha>``, as the
    control plane stores uploads); the snapshot id comes from the manifest's content and
    ``created`` is fixed, so the same images always give a byte-identical snapshot.
    """
    from PIL import Image

    meta = json.loads((paths.generated / "labels.json").read_text())
    shutil.rmtree(paths.store, ignore_errors=True)
    store = LocalBlobStore(paths.store)
    rows = []
    for entry in meta["images"]:
        data = (paths.generated / entry["file"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = blob_layout.image_key(WORKSPACE, sha)
        if not store.exists(key):
            store.put(key, data, content_type="image/png")
        with Image.open(paths.generated / entry["file"]) as image:
            width, height = image.size
        rows.append(
            ManifestRow(
                image_id=Path(entry["file"]).stem,
                blob_key=key,
                sha256=sha,
                labels=list(entry["labels"]),
                values={k: float(v) for k, v in entry.get("values", {}).items()},
                width=width,
                height=height,
            )
        )
    digest = hashlib.sha256(json.dumps([asdict(r) for r in rows], sort_keys=True).encode())
    info = DatasetInfo(
        task_id=paths.dataset,
        task_type=TaskType(meta["task_type"]),
        labels=[LabelInfo(**label) for label in meta["labels"]],
        snapshot_id=f"dvc-{digest.hexdigest()[:12]}",
        created=datetime.fromtimestamp(0, UTC).isoformat(),
        count=len(rows),
    )
    prefix = blob_layout.dataset_prefix(info.task_id, info.snapshot_id)
    write_snapshot(store, prefix, info, rows)
    return f"{len(rows)} images, {len(info.labels)} labels -> {store.uri(prefix)}"


def validate(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    from components.lib.validate import validate_dataset

    store = LocalBlobStore(paths.store)
    info, rows = read_snapshot(store, find_snapshot(store, snapshot_prefix))
    minimum = int(_section(params, "validate")["min_images_per_label"])
    report = validate_dataset(info, rows, store, min_images_per_label=minimum)
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    paths.report.write_text(report.markdown())
    if not report.ok:
        raise StageError("Training data did not pass validation: " + "; ".join(report.problems) + ".")
    return f"passed {len(report.checks)} checks"


def split(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    from components.lib.split import split_dataset

    store = LocalBlobStore(paths.store)
    info, rows = read_snapshot(store, find_snapshot(store, snapshot_prefix))
    section = _section(params, "split")
    result = split_dataset(
        info, rows, test_fraction=float(section["test_fraction"]), seed=int(section.get("seed", 0))
    )
    paths.split.parent.mkdir(parents=True, exist_ok=True)
    paths.split.write_text(result.to_json())
    return f"{len(result.train)} train, {len(result.test)} test images"


def train_config(params: dict[str, Any]) -> Any:
    """The TrainConfig from params.yaml's ``train`` section."""
    from components.lib.train import TrainConfig

    section = _section(params, "train")
    if "backbone" in section:
        raise StageError(
            "train.backbone is gone: the backbones are chosen by cross-validation; set train.quality "
            "(fast, balanced or best) instead."
        )
    defaults = TrainConfig()
    try:
        return TrainConfig(
            mode=str(section.get("mode", "embed")),
            quality=str(section.get("quality", defaults.quality)),
            augment=str(section.get("augment", defaults.augment)),
            epochs=int(section.get("epochs", defaults.epochs)),
            learning_rate=float(section.get("learning_rate", defaults.learning_rate)),
            batch_size=int(section.get("batch_size", defaults.batch_size)),
            seed=int(section.get("seed", defaults.seed)),
        )
    except ValueError as exc:
        raise StageError(f"params.yaml train: {exc}") from exc


def train(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    from components.lib.split import SplitResult
    from components.lib.train import train_model
    from taskvision.backbone import cache_dir

    config = train_config(params)
    base = LocalBlobStore(paths.store)
    prefix = find_snapshot(base, snapshot_prefix)
    info, rows = read_snapshot(base, prefix)
    store = EmbeddingCacheStore(base, LocalBlobStore(cache_dir() / "dvc-embeddings"))
    result = SplitResult.from_json(paths.split.read_text())
    shutil.rmtree(paths.model, ignore_errors=True)  # the folder is this stage's alone (run by hand too)
    meta = train_model(info, rows, result, store, paths.model, config, snapshot=prefix, run_id="dvc")
    return f"{meta.training['mode']} model, {meta.training['train_images']} training images"


def _predictions(model_dir: Path) -> tuple[Any, Any, Any]:
    """The test split's image ids, targets and model outputs (for the plots)."""
    import numpy as np

    from taskvision.inference import BundleModel

    model = BundleModel.load(model_dir)
    data = np.load(model_dir / "test_inputs.npz")
    if model.meta.frozen_backbone:
        logits = model.logits_from_embeddings(data["embeddings"])
    else:
        logits = model.logits_from_arrays(data["images"])
    return data["image_ids"], data["targets"], model.outputs(logits)


def plot_rows(
    task_type: TaskType, names: list[str], metrics: dict[str, Any], model_dir: Path
) -> list[dict[str, Any]]:
    """Rows for ``dvc plots``: one per test image (confusion, scatter), or per label (tags)."""
    if task_type is TaskType.MULTI_LABEL:
        return [
            {"label": name, **{k: v for k, v in values.items() if k != "threshold"}}
            for name, values in metrics.get("per_label", {}).items()
        ]
    ids, y, outputs = _predictions(model_dir)
    if task_type is TaskType.MULTI_CLASS:
        return [
            {"image": str(i), "actual": names[int(t)], "predicted": names[int(p.argmax())]}
            for i, t, p in zip(ids, y, outputs, strict=True)
        ]
    return [
        {"image": str(i), "actual": round(float(t[0]), 3), "predicted": round(float(p[0]), 3)}
        for i, t, p in zip(ids, y, outputs, strict=True)
    ]


def evaluate(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    from components.lib.evaluate import evaluate_model
    from taskvision.bundle import BundleMeta

    meta = BundleMeta.from_json((paths.model / "bundle.json").read_text())
    metrics = evaluate_model(paths.model)
    names = [label["name"] for label in meta.labels]
    _write_json(paths.metrics, metrics)
    _write_json(paths.plots, plot_rows(meta.task_type, names, metrics, paths.model))
    headline = {TaskType.MULTI_CLASS: "accuracy", TaskType.MULTI_LABEL: "mAP", TaskType.REGRESSION: "r2"}
    key = headline[meta.task_type]
    return f"{key} {metrics.get(key, 0.0):.3f} on {metrics.get('test_images', 0)} test images"


def export(paths: Paths, params: dict[str, Any], snapshot_prefix: str | None = None) -> str:
    """The model bundle (weights + bundle.json with the metrics), as ``taskvision import-bundle`` reads it."""
    from components.lib.register import register_bundle

    metrics = json.loads(paths.metrics.read_text())
    shutil.rmtree(paths.bundle, ignore_errors=True)
    paths.bundle.parent.mkdir(parents=True, exist_ok=True)
    uri = register_bundle(paths.model, metrics, LocalBlobStore(paths.bundle.parent), paths.bundle.name)
    return f"bundle at {uri}"


Stage = Callable[[Paths, dict[str, Any], str | None], str]
STAGES: dict[str, Stage] = {
    "snapshot": snapshot,
    "validate": validate,
    "split": split,
    "train": train,
    "evaluate": evaluate,
    "export": export,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.dvc_stages", description=__doc__.split("\n")[0]
    )
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument(
        "dataset", help="dataset name (shapes, tags, sizes): picks the paths under --data-dir"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--snapshot", help="snapshot prefix in the store (datasets/<task>/<id>); default: the only one there"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # great-expectations' progress bars, in a log
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = Paths(args.data_dir, args.dataset)
    try:
        params = load_params(args.params)
        message = STAGES[args.stage](paths, params, args.snapshot)
    except StageError as exc:
        print(f"{args.stage} {args.dataset}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.stage} {args.dataset}: {message}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
