"""The train step's library: targets, the linear head, cross-validation, options, and the embed-mode step."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.lib import train as train_lib
from components.lib.evaluate import evaluate_model
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, cross_validate, fit_linear, targets, train_model
from taskvision import backbone
from taskvision.dataset import LabelInfo, ManifestRow
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType
from tests.support.snapshots import RowMaker, info


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """The heads here are tiny: one thread is faster, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RED, STRIPES = LabelInfo("t-red", "red"), LabelInfo("t-stripes", "stripes")
NONE = LabelInfo("t-none", "none", negative=True)


def blobs(k: int, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in ``d`` dimensions around ``k`` well separated centres, and their classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(scale=4.0, size=(k, d))
    x = centres[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.float32)


# ---- targets ---------------------------------------------------------------------------------


def test_multi_class_targets_are_class_indices_in_label_order() -> None:
    task = info(TaskType.MULTI_CLASS, [LabelInfo("b", "tulip"), LabelInfo("a", "rose")])
    maker = RowMaker()
    for label in ("a", "b", "b", "a"):
        maker.add([label])
    y = targets(task, maker.rows)
    assert y.tolist() == [1, 0, 0, 1]


def test_multi_label_targets_are_multi_hot_and_the_negative_label_is_an_all_zero_row() -> None:
    task = info(TaskType.MULTI_LABEL, [RED, NONE, STRIPES])
    maker = RowMaker()
    maker.add(["t-red"])
    maker.add(["t-none"])
    maker.add(["t-red", "t-stripes"])
    maker.add(["t-stripes"])
    y = targets(task, maker.rows)
    assert y.shape == (4, 2)  # red, stripes: the negative label has no column
    assert y.tolist() == [[1, 0], [0, 0], [1, 1], [0, 1]]


def test_regression_targets_are_the_values() -> None:
    task = info(TaskType.REGRESSION, [LabelInfo("v-size", "size")])
    maker = RowMaker()
    for value in (1.5, -2.0, 40.25):
        maker.add(["v-size"], values={"v-size": value})
    y = targets(task, maker.rows)
    assert y.shape == (3, 1)
    assert y[:, 0].tolist() == [1.5, -2.0, 40.25]


# ---- the linear head ---------------------------------------------------------------------------


def test_fit_linear_separates_separable_classes() -> None:
    x, y = blobs(k=3, n=60, d=16)
    x = x * 10 + 3  # raw (unstandardized) embeddings: standardization is folded into W and b
    w, b = fit_linear(x, y, TaskType.MULTI_CLASS, 1e-3, n_outputs=int(y.max()) + 1)
    assert w.shape == (3, 16) and b.shape == (3,)
    assert ((x @ w.T + b).argmax(axis=1) == y).all()
    # New points from the same classes are classified correctly too.
    x_new, y_new = blobs(k=3, n=30, d=16)
    assert ((x_new * 10 + 3) @ w.T + b).argmax(axis=1).tolist() == y_new.tolist()


def test_fit_linear_separates_separable_tags() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.5).astype(np.float32)
    x = (y @ rng.normal(scale=4.0, size=(3, 16)) + rng.normal(size=(80, 16))).astype(np.float32)
    w, b = fit_linear(x, y, TaskType.MULTI_LABEL, 1e-3, n_outputs=3)
    assert w.shape == (3, 16)
    assert ((x @ w.T + b > 0) == y.astype(bool)).all()


def test_fit_linear_recovers_a_linear_regression_target() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 16)).astype(np.float32) * 5 + 2
    value = x @ rng.normal(size=16) + 3.0
    y = ((value - value.mean()) / value.std()).astype(np.float32)[:, None]
    w, b = fit_linear(x, y, TaskType.REGRESSION, 1e-4, n_outputs=1)
    predicted = x @ w.T + b
    r2 = 1 - float(((predicted - y) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    assert r2 > 0.95


# ---- cross-validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", list(TaskType))
def test_cross_validate_picks_a_grid_value_and_returns_out_of_fold_predictions(task_type: TaskType) -> None:
    rng = np.random.default_rng(3)
    x, classes = blobs(k=3, n=60, d=12, seed=3)
    if task_type is TaskType.MULTI_CLASS:
        y, width = classes, 3
    elif task_type is TaskType.MULTI_LABEL:
        y, width = (rng.random((60, 4)) < 0.5).astype(np.float32), 4
        x = (y @ rng.normal(scale=4.0, size=(4, 12)) + rng.normal(size=(60, 12))).astype(np.float32)
    else:
        y, width = (x @ rng.normal(size=12)).astype(np.float32)[:, None], 1
        y = (y - y.mean()) / y.std()
    weight_decay, oof = cross_validate(x, y, task_type, TrainConfig(mode="embed"), n_outputs=width)
    assert weight_decay in ((0.1, 0.3, 1.0, 3.0) if task_type is TaskType.REGRESSION else (1e-2, 1e-1, 1.0))
    assert oof.shape == (60, width)
    # A fixed weight decay skips the search.
    fixed, _ = cross_validate(x, y, task_type, TrainConfig(mode="embed", weight_decay=0.05), n_outputs=width)
    assert fixed == 0.05


def test_cross_validated_scores_are_out_of_fold() -> None:
    # Random labels in many dimensions: the head memorises them, but cannot predict unseen rows.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 100)).astype(np.float32)
    y = (rng.random(60) < 0.5).astype(np.float32)
    w, b = fit_linear(x, y, TaskType.MULTI_CLASS, 1e-3, n_outputs=int(y.max()) + 1)
    assert ((x @ w.T + b).argmax(axis=1) == y).mean() == 1.0
    _, oof = cross_validate(x, y, TaskType.MULTI_CLASS, TrainConfig(mode="embed"), n_outputs=2)
    assert (oof.argmax(axis=1) == y).mean() < 0.8


def test_cross_validation_keeps_an_image_and_its_mirrored_copy_in_one_fold() -> None:
    x, y = blobs(k=2, n=30, d=8, seed=5)
    groups = np.arange(30)
    x2, y2, g2 = np.concatenate([x, x]), np.concatenate([y, y]), np.concatenate([groups, groups])
    _, oof = cross_validate(x2, y2, TaskType.MULTI_CLASS, TrainConfig(mode="embed"), n_outputs=2, groups=g2)
    # Same input, same fold, same model: identical predictions for both copies.
    np.testing.assert_array_equal(oof[:30], oof[30:])


def test_cross_validate_survives_a_fold_without_the_last_class() -> None:
    x, y = blobs(k=3, n=30, d=8, seed=6)
    y[y == 2] = 1
    first_fold = train_lib._folds(30, 3, 0)[0]
    y[first_fold[:2]] = 2  # a rare last class, all of it in one fold
    _, oof = cross_validate(x, y, TaskType.MULTI_CLASS, TrainConfig(mode="embed"), n_outputs=3)
    assert oof.shape == (30, 3)


# ---- options ------------------------------------------------------------------------------------


def test_train_config_rejects_unknown_options_clearly() -> None:
    with pytest.raises(ValueError) as caught:
        TrainConfig(mode="gpu")
    assert str(caught.value) == "Invalid training mode 'gpu'. Only auto, embed, finetune are supported."
    with pytest.raises(ValueError) as caught:
        TrainConfig(augment="rotate")
    assert str(caught.value) == "Invalid augmentation 'rotate'. Only none, flip are supported."
    for bad in ({"epochs": 0}, {"learning_rate": 0.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
            TrainConfig(**bad)
    assert TrainConfig(mode="embed").resolved_mode() == "embed"


# ---- the embed-mode step, on cached embeddings (no backbone run) ---------------------------------


def cache_embeddings(store: LocalBlobStore, rows: list[ManifestRow], vectors: np.ndarray) -> None:
    """Put embeddings where embed_rows looks for them, for both the centre crop and the mirrored one."""
    for row, vector in zip(rows, vectors, strict=True):
        buf = io.BytesIO()
        np.save(buf, vector.astype(np.float32))
        for variant in ("center", "flip"):
            store.put(
                f"embeddings/{backbone.EMBEDDING_ID}/{variant}/{row.sha256[:2]}/{row.sha256}.npy",
                buf.getvalue(),
            )


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbone must not run; small embeddings keep the head fits fast (the head is size-agnostic)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the backbone ran although every embedding was cached")

    monkeypatch.setattr(backbone, "embed_many", refuse)
    monkeypatch.setattr(backbone, "EMBEDDING_DIM", 32)


def embedding_dataset(task_type: TaskType, n: int = 60) -> tuple[Any, list[ManifestRow], np.ndarray]:
    """A task whose cached embeddings are learnable (separable classes/tags, a linear value)."""
    rng = np.random.default_rng(7)
    d = backbone.EMBEDDING_DIM
    maker = RowMaker()
    if task_type is TaskType.MULTI_CLASS:
        labels = [LabelInfo("l-rose", "rose"), LabelInfo("l-tulip", "tulip"), LabelInfo("l-iris", "iris")]
        y = np.arange(n) % 3
        x = rng.normal(scale=6.0, size=(3, d))[y] + rng.normal(size=(n, d))
        for k in y:
            maker.add([labels[k].id])
    elif task_type is TaskType.MULTI_LABEL:
        labels = [RED, NONE, STRIPES]
        y = (rng.random((n, 2)) < 0.5).astype(int)
        x = y @ rng.normal(scale=6.0, size=(2, d)) + rng.normal(size=(n, d))
        for tags in y:
            maker.add([lid for lid, on in zip(("t-red", "t-stripes"), tags, strict=True) if on] or ["t-none"])
    else:
        labels = [LabelInfo("v-size", "size")]
        x = rng.normal(size=(n, d))
        values = x @ rng.normal(size=d) * 3 + 50
        for value in values:
            maker.add(["v-size"], values={"v-size": float(value)})
    return info(task_type, labels, count=n), maker.rows, x.astype(np.float32)


@pytest.mark.parametrize("task_type", list(TaskType))
def test_embed_mode_trains_a_head_that_evaluates_well(
    task_type: TaskType, tmp_path: Path, no_backbone: None
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, x = embedding_dataset(task_type)
    cache_embeddings(store, rows, x)
    split = split_dataset(task, rows, seed=0)
    reports: list[tuple[float, str]] = []
    out = tmp_path / "model"

    meta = train_model(
        task,
        rows,
        split,
        store,
        out,
        TrainConfig(mode="embed", weight_decay=1e-3 if task_type is TaskType.REGRESSION else None),
        snapshot="datasets/task-1/snap-1",
        run_id="run-1",
        progress=lambda fraction, message: reports.append((fraction, message)),
    )

    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "head.onnx", "test_inputs.npz"]
    written = json.loads((out / "bundle.json").read_text())
    assert written["labels"] == [{"id": lb.id, "name": lb.name} for lb in task.output_labels]
    assert written["frozen_backbone"] is True and written["task_type"] == str(task_type)
    assert (written["dataset_snapshot"], written["run_id"]) == ("datasets/task-1/snap-1", "run-1")
    assert written["training"]["train_images"] == len(split.train)
    assert written["training"]["test_images"] == len(split.test)
    assert np.load(out / "test_inputs.npz")["image_ids"].tolist() == split.test
    assert reports and all(0.0 <= f <= 1.0 for f, _ in reports)

    metrics = evaluate_model(out)
    assert metrics["test_images"] == len(split.test)
    if task_type is TaskType.MULTI_CLASS:
        assert metrics["accuracy"] == 1.0
        assert meta.thresholds == [] and meta.negative_label is None
    elif task_type is TaskType.MULTI_LABEL:
        assert written["negative_label"] == {"id": "t-none", "name": "none"}
        assert len(written["thresholds"]) == 2
        assert all(0.0 < t < 1.0 for t in written["thresholds"])
        assert metrics["mAP"] == 1.0 and metrics["f1"] > 0.9
    else:
        train_values = [r.values["v-size"] for r in rows if r.image_id in set(split.train)]
        assert written["target_mean"] == pytest.approx([np.mean(train_values)], rel=1e-4)
        assert metrics["r2"] > 0.95


def test_the_head_has_one_output_per_label_even_if_a_label_has_no_training_image(
    tmp_path: Path, no_backbone: None
) -> None:
    from taskvision.inference import BundleModel

    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, x = embedding_dataset(TaskType.MULTI_CLASS)
    rows = [
        ManifestRow(
            **{**vars(row), "test_image": row.labels == ["l-iris"]}
        )  # the user keeps every iris for testing
        for row in rows
    ]
    cache_embeddings(store, rows, x)
    train_model(task, rows, split_dataset(task, rows), store, tmp_path / "model", TrainConfig(mode="embed"))
    model = BundleModel.load(tmp_path / "model")
    assert model.logits_from_embeddings(x[:2]).shape == (2, 3)
