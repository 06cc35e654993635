"""Train step: a model over the pretrained EfficientNet-Lite0 backbone.

Two modes:
* ``embed`` (CPU default): embed every image once with the frozen backbone
  (ONNX Runtime, cached per image hash in the blob store, so retraining only
  embeds new images), then fit a linear head on the embeddings. Its weight
  decay is picked by k-fold cross-validation on the training split, which also
  yields the out-of-fold scores that set multi_label thresholds. Seconds, not
  minutes.
* ``finetune`` (default when a GPU is present): train the whole network end
  to end with SGD, augmentation and a cosine schedule.

Losses by task type: softmax cross-entropy (multi_class), sigmoid BCE with the
negative label meaning "no tag" (multi_label), squared error on standardized
targets (regression).

The output is a model folder: ``bundle.json`` (without metrics yet),
``head.onnx`` or ``model.onnx``, and ``test_inputs.npz`` (the test split's
embeddings or preprocessed images, and its targets) for the evaluate step.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from components.lib.split import SplitResult
from taskvision import backbone, blob_layout
from taskvision.bundle import HEAD_FILE, BundleMeta, linear_head_onnx
from taskvision.dataset import DatasetInfo, ManifestRow
from taskvision.metrics import average_precision, best_f1_thresholds
from taskvision.preprocess import DEFAULT, resize_and_crop, to_array
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
MODES = ("auto", "embed", "finetune")
AUGMENTATIONS = ("none", "flip")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. ``weight_decay=None`` lets cross-validation choose it (embed mode)."""

    mode: str = "auto"
    augment: str = "flip"
    weight_decay: float | None = None
    epochs: int = 25  # finetune mode
    learning_rate: float = 0.001  # finetune mode (SGD, momentum 0.9)
    batch_size: int = 32
    cv_folds: int = 3
    seed: int = 0
    cache_embeddings: bool = True
    max_image_pixels: int = 80_000_000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Invalid training mode {self.mode!r}. Only {', '.join(MODES)} are supported.")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"Invalid augmentation {self.augment!r}. Only {', '.join(AUGMENTATIONS)} are supported."
            )
        if self.epochs < 1 or self.learning_rate <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1 and learning_rate > 0.")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        import torch

        return "finetune" if torch.cuda.is_available() else "embed"


# ---- targets -------------------------------------------------------------------


def targets(info: DatasetInfo, rows: list[ManifestRow]) -> Array:
    """Class indices (multi_class), multi-hot rows (multi_label) or values (regression)."""
    outputs = [label.id for label in info.output_labels]
    index = {lid: i for i, lid in enumerate(outputs)}
    if info.task_type is TaskType.MULTI_CLASS:
        return np.asarray([index[row.labels[0]] for row in rows], dtype=np.float32)
    if info.task_type is TaskType.MULTI_LABEL:
        y = np.zeros((len(rows), len(outputs)), dtype=np.float32)
        for i, row in enumerate(rows):
            for lid in row.labels:
                if lid in index:  # the negative label has no column: all zeros means "no tag"
                    y[i, index[lid]] = 1.0
        return y
    return np.asarray([[row.values[lid] for lid in outputs] for row in rows], dtype=np.float32)


# ---- embedding -------------------------------------------------------------------


def _decode(store: BlobStore, row: ManifestRow, config: TrainConfig, *, flip: bool) -> Array:
    from PIL import ImageOps

    from taskvision import imaging

    image = imaging.load_rgb(
        store.get(row.blob_key), max_pixels=config.max_image_pixels, draft_size=(DEFAULT.resize_to * 2,) * 2
    )
    image = resize_and_crop(image)
    if flip:
        image = ImageOps.mirror(image)
    return to_array(image)


_EMBEDDER: backbone.Embedder | None = None


def _embedder() -> backbone.Embedder:
    """One backbone session per training process (no cache: each image is embedded once anyway)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = backbone.Embedder()
    return _EMBEDDER


def embed_rows(
    store: BlobStore,
    rows: list[ManifestRow],
    config: TrainConfig,
    *,
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Array:
    """Backbone embeddings of ``rows``, reusing cached ones (keyed by image hash and variant)."""
    variant = "flip" if flip else "center"
    result = np.zeros((len(rows), backbone.EMBEDDING_DIM), dtype=np.float32)
    missing: list[int] = []
    for i, row in enumerate(rows):
        key = blob_layout.embedding_key(backbone.EMBEDDING_ID, variant, row.sha256)
        if config.cache_embeddings and store.exists(key):
            result[i] = np.load(io.BytesIO(store.get(key)))
        else:
            missing.append(i)
    if missing:
        computed = backbone.embed_many(
            lambda k: _decode(store, rows[missing[k]], config, flip=flip),
            len(missing),
            _embedder(),
            batch_size=8,
            progress=progress,
        )
        for i, vector in zip(missing, computed, strict=True):
            result[i] = vector
            if config.cache_embeddings:
                buf = io.BytesIO()
                np.save(buf, vector)
                store.put(
                    blob_layout.embedding_key(backbone.EMBEDDING_ID, variant, rows[i].sha256), buf.getvalue()
                )
    logger.info(
        "embedded %d images (%d from cache), variant %s", len(rows), len(rows) - len(missing), variant
    )
    return result


# ---- the linear head ---------------------------------------------------------------


def _standardize(x: Array) -> tuple[Array, Array]:
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    return mean, std


def fit_linear(
    x: Array, y: Array, task_type: TaskType, weight_decay: float, *, n_outputs: int, max_iter: int = 100
) -> tuple[Array, Array]:
    """Fit ``logits = x @ W.T + b`` on raw embeddings (standardization is folded into W and b).

    ``n_outputs`` is the number of model outputs (the task's labels), which the targets of a
    fold may not show. Regression ``y`` (n, outputs) must already be standardized;
    classification uses LBFGS in torch.
    """
    mean, std = _standardize(x)
    xs = (x - mean) / std
    if task_type is TaskType.REGRESSION:
        # Ridge regression in closed form: exact and instant.
        n, d = xs.shape
        a = xs.T @ xs + weight_decay * n * np.eye(d, dtype=np.float32)
        w = np.linalg.solve(a, xs.T @ (y - y.mean(axis=0))).T.astype(np.float32)
        b = y.mean(axis=0).astype(np.float32)
    else:
        import torch

        torch.manual_seed(0)
        xt = torch.from_numpy(xs)
        linear = torch.nn.Linear(xs.shape[1], n_outputs)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        if task_type is TaskType.MULTI_CLASS:
            yt = torch.from_numpy(y.astype(np.int64))
            loss_fn: Callable[[Any, Any], Any] = torch.nn.functional.cross_entropy
        else:
            yt = torch.from_numpy(y)
            loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
        optimizer = torch.optim.LBFGS(
            linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Any:
            optimizer.zero_grad()
            loss = loss_fn(linear(xt), yt) + 0.5 * weight_decay * (linear.weight**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        w = linear.weight.detach().numpy().astype(np.float32)
        b = linear.bias.detach().numpy().astype(np.float32)
    # Fold the standardization in: (x - m) / s @ W.T + b == x @ (W / s).T + (b - (W / s) @ m)
    w_raw = (w / std[None, :]).astype(np.float32)
    return w_raw, (b - w_raw @ mean).astype(np.float32)


def _predict(x: Array, w: Array, b: Array) -> Array:
    return (x @ w.T + b).astype(np.float32)


def _score(task_type: TaskType, y: Array, logits: Array) -> float:
    """Higher is better: accuracy, mean AP, or negative MAE (on standardized targets)."""
    if task_type is TaskType.MULTI_CLASS:
        return float((logits.argmax(axis=1) == y).mean())
    if task_type is TaskType.MULTI_LABEL:
        return float(
            np.mean([average_precision(y[:, j].astype(np.int64), logits[:, j]) for j in range(y.shape[1])])
        )
    return -float(np.abs(logits - y).mean())


def _folds(n: int, k: int, seed: int) -> list[npt.NDArray[np.int64]]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def cross_validate(
    x: Array,
    y: Array,
    task_type: TaskType,
    config: TrainConfig,
    *,
    n_outputs: int,
    groups: npt.NDArray[np.int64] | None = None,
) -> tuple[float, Array]:
    """Pick the weight decay by k-fold CV; return it and the out-of-fold logits at that value.

    ``groups`` keeps rows of one image together (an image and its mirrored copy).
    """
    if config.weight_decay is not None:
        grid = [config.weight_decay]
    elif task_type is TaskType.REGRESSION:
        grid = [0.1, 0.3, 1.0, 3.0]  # closed-form ridge: each value costs one solve per fold
    else:
        grid = [1e-2, 1e-1, 1.0]
    n_groups = int(groups.max()) + 1 if groups is not None else len(x)
    folds = _folds(n_groups, max(2, min(config.cv_folds, n_groups)), config.seed)
    best: tuple[float, float, Array] | None = None
    for wd in grid:
        oof = np.zeros((len(x), n_outputs), dtype=np.float32)
        for fold in folds:
            in_fold = np.isin(groups, fold) if groups is not None else np.isin(np.arange(len(x)), fold)
            w, b = fit_linear(x[~in_fold], y[~in_fold], task_type, wd, n_outputs=n_outputs)
            oof[in_fold] = _predict(x[in_fold], w, b)
        score = _score(task_type, y, oof)
        logger.info("weight decay %g: cross-validated score %.4f", wd, score)
        if best is None or score > best[0]:
            best = (score, wd, oof)
    assert best is not None
    return best[1], best[2]


# ---- the step ------------------------------------------------------------------------


def train_model(
    info: DatasetInfo,
    rows: list[ManifestRow],
    split: SplitResult,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    *,
    snapshot: str = "",
    run_id: str = "",
    progress: Callable[[float, str], None] | None = None,
) -> BundleMeta:
    """Train on the split's training side and write the model folder to ``out_dir``."""
    report = progress or (lambda fraction, message: None)
    by_id = {row.image_id: row for row in rows}
    train_rows = [by_id[i] for i in split.train]
    test_rows = [by_id[i] for i in split.test]
    y_train, y_test = targets(info, train_rows), targets(info, test_rows)
    outputs = info.output_labels
    mode = config.resolved_mode()
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = BundleMeta(
        task_id=info.task_id,
        task_type=info.task_type,
        labels=[{"id": label.id, "name": label.name} for label in outputs],
        backbone=backbone.BACKBONE_ID,
        frozen_backbone=mode == "embed",
        input_size=DEFAULT.input_size,
        preprocess={
            "resize_to": DEFAULT.resize_to,
            "crop_pct": DEFAULT.crop_pct,
            "mean": list(DEFAULT.mean),
            "std": list(DEFAULT.std),
            "interpolation": DEFAULT.interpolation,
        },
        negative_label=next(({"id": lb.id, "name": lb.name} for lb in info.labels if lb.negative), None),
        dataset_snapshot=snapshot,
        training={
            **asdict(config),
            "mode": mode,
            "train_images": len(train_rows),
            "test_images": len(test_rows),
        },
        run_id=run_id,
        created=datetime.now(UTC).isoformat(),
    )
    if info.task_type is TaskType.REGRESSION:
        meta.target_mean = y_train.mean(axis=0).tolist()
        meta.target_std = (y_train.std(axis=0) + 1e-6).tolist()

    if mode == "embed":
        _train_head(info, train_rows, test_rows, y_train, y_test, store, out_dir, config, meta, report)
    else:
        from components.lib.finetune import finetune

        finetune(info, train_rows, test_rows, y_train, y_test, store, out_dir, config, meta, report)
    (out_dir / "bundle.json").write_text(meta.to_json())
    return meta


def _train_head(
    info: DatasetInfo,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_train: Array,
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    report: Callable[[float, str], None],
) -> None:
    total = len(train_rows) * (2 if config.augment == "flip" else 1) + len(test_rows)
    done = 0

    def tick(offset: int) -> Callable[[int], None]:
        return lambda n: report(
            0.9 * (offset + n) / max(total, 1), f"embedding images ({offset + n}/{total})"
        )

    x_train = embed_rows(store, train_rows, config, progress=tick(done))
    done += len(train_rows)
    groups = np.arange(len(train_rows))
    if config.augment == "flip":
        x_flip = embed_rows(store, train_rows, config, flip=True, progress=tick(done))
        done += len(train_rows)
        x_train = np.concatenate([x_train, x_flip])
        y_train = np.concatenate([y_train, y_train])
        groups = np.concatenate([groups, groups])
    x_test = embed_rows(store, test_rows, config, progress=tick(done))
    report(0.9, "fitting the head")

    task_type = info.task_type
    y_fit = y_train
    if task_type is TaskType.REGRESSION:
        y_fit = ((y_train - np.asarray(meta.target_mean)) / np.asarray(meta.target_std)).astype(np.float32)
    n_outputs = len(meta.labels)
    weight_decay, oof = cross_validate(x_train, y_fit, task_type, config, n_outputs=n_outputs, groups=groups)
    w, b = fit_linear(x_train, y_fit, task_type, weight_decay, n_outputs=n_outputs)
    if task_type is TaskType.MULTI_LABEL:
        # Thresholds from out-of-fold scores on the training split: never from the test split.
        probs = 1.0 / (1.0 + np.exp(-oof))
        meta.thresholds = best_f1_thresholds(y_train.astype(np.int64), probs)
    meta.training["weight_decay"] = weight_decay
    (out_dir / HEAD_FILE).write_bytes(linear_head_onnx(w, b))
    np.savez(
        out_dir / "test_inputs.npz",
        image_ids=np.asarray([row.image_id for row in test_rows]),
        embeddings=x_test,
        targets=y_test,
    )
