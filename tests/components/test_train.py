"""The train step's library: targets, linear heads, cross-validation, options, selection, the embed step."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.lib import embeddings, heads, selection
from components.lib.evaluate import evaluate_model
from components.lib.register import register_bundle
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, targets, train_model
from taskvision import backbone, features
from taskvision.bundle import BundleMeta
from taskvision.dataset import LabelInfo, ManifestRow, write_snapshot
from taskvision.inference import BundleModel
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


# ---- linear heads ------------------------------------------------------------------------------

LOGISTIC = heads.HeadSetting(heads.LOGISTIC, 1e-3)


def test_logistic_head_separates_separable_classes() -> None:
    x, y = blobs(k=3, n=60, d=16)
    x = x * 10 + 3  # raw (unstandardized) features: standardization is folded into W and b
    w, b = heads.fit_head(x, y, TaskType.MULTI_CLASS, LOGISTIC, n_outputs=int(y.max()) + 1)
    assert w.shape == (3, 16) and b.shape == (3,)
    assert ((x @ w.T + b).argmax(axis=1) == y).all()
    # New points from the same classes are classified correctly too.
    x_new, y_new = blobs(k=3, n=30, d=16)
    assert ((x_new * 10 + 3) @ w.T + b).argmax(axis=1).tolist() == y_new.tolist()


def test_logistic_head_separates_separable_tags() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.5).astype(np.float32)
    x = (y @ rng.normal(scale=4.0, size=(3, 16)) + rng.normal(size=(80, 16))).astype(np.float32)
    w, _b = heads.fit_head(x, y, TaskType.MULTI_LABEL, LOGISTIC, n_outputs=3)
    assert w.shape == (3, 16)
    assert ((x @ w.T + _b > 0) == y.astype(bool)).all()


@pytest.mark.parametrize("kind", [heads.RIDGE, heads.HUBER])
def test_regression_heads_recover_a_linear_target(kind: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 16)).astype(np.float32) * 5 + 2
    value = x @ rng.normal(size=16) + 3.0
    y = ((value - value.mean()) / value.std()).astype(np.float32)[:, None]
    w, b = heads.fit_head(x, y, TaskType.REGRESSION, heads.HeadSetting(kind, 1e-4), n_outputs=1)
    predicted = x @ w.T + b
    r2 = 1 - float(((predicted - y) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    assert r2 > 0.95


def test_ridge_in_the_dual_equals_ridge_in_the_primal() -> None:
    """More features than rows takes the n x n route; it must give the same head."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 50)).astype(np.float32)
    y = rng.normal(size=(30, 2)).astype(np.float32)
    dual = heads.fit_head(x, y, TaskType.REGRESSION, heads.HeadSetting(heads.RIDGE, 0.5), n_outputs=2)
    xs = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    primal = np.linalg.solve(xs.T @ xs + 0.5 * 30 * np.eye(50), xs.T @ (y - y.mean(axis=0))).T
    np.testing.assert_allclose(dual[0] * (x.std(axis=0) + 1e-6), primal, atol=1e-4)


def test_the_huber_head_is_less_pulled_by_wrong_targets_than_ridge() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    clean = (x @ rng.normal(size=8)).astype(np.float32)[:, None]
    y = clean.copy()
    y[:20] += 15.0  # a tenth of the targets far off (mislabelled images)
    errors = {}
    for kind in (heads.RIDGE, heads.HUBER):
        w, b = heads.fit_head(x, y, TaskType.REGRESSION, heads.HeadSetting(kind, 1e-3), n_outputs=1)
        errors[kind] = float(np.abs(x[20:] @ w.T + b - clean[20:]).mean())
    assert errors[heads.HUBER] < 0.5 * errors[heads.RIDGE]


# ---- cross-validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", list(TaskType))
def test_cross_validation_gives_out_of_fold_outputs_for_every_setting(task_type: TaskType) -> None:
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
    grid = heads.default_grid(task_type)
    cv = heads.cross_validate(x, y, task_type, grid, heads.folds(60, 3, 0), n_outputs=width)
    assert cv.settings == grid and len(cv.oof) == len(grid)
    assert all(oof.shape == (60, width) for oof in cv.oof)
    assert max(heads.score(task_type, y, oof) for oof in cv.oof) > (
        0.9 if task_type is not TaskType.REGRESSION else -0.3
    )
    # A fixed penalty leaves one setting (per head kind).
    fixed = heads.default_grid(task_type, fixed_penalty=0.05)
    assert {s.penalty for s in fixed} == {0.05}


def test_cross_validated_scores_are_out_of_fold() -> None:
    # Random labels in many dimensions: the head memorises them, but cannot predict unseen rows.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 100)).astype(np.float32)
    y = (rng.random(60) < 0.5).astype(np.float32)
    w, b = heads.fit_head(x, y, TaskType.MULTI_CLASS, LOGISTIC, n_outputs=2)
    assert ((x @ w.T + b).argmax(axis=1) == y).mean() == 1.0
    cv = heads.cross_validate(x, y, TaskType.MULTI_CLASS, [LOGISTIC], heads.folds(60, 3, 0), n_outputs=2)
    assert (cv.oof[0].argmax(axis=1) == y).mean() < 0.8


def test_mirrored_copies_train_with_their_image_and_are_scored_out_of_fold() -> None:
    x, y = blobs(k=2, n=30, d=8, seed=5)
    cv = heads.cross_validate(
        x,
        y,
        TaskType.MULTI_CLASS,
        [LOGISTIC],
        heads.folds(30, 3, 0),
        n_outputs=2,
        x_mirror=x.copy(),
        augment_with_mirror=True,
    )
    # The mirrored copy of a held-out image was held out with it: identical input, identical output.
    assert cv.oof_mirror is not None
    np.testing.assert_array_equal(cv.oof[0], cv.oof_mirror[0])


def test_cross_validation_survives_a_fold_without_the_last_class() -> None:
    x, y = blobs(k=3, n=30, d=8, seed=6)
    y[y == 2] = 1
    first_fold = heads.folds(30, 3, 0)[0]
    y[first_fold[:2]] = 2  # a rare last class, all of it in one fold
    cv = heads.cross_validate(x, y, TaskType.MULTI_CLASS, [LOGISTIC], heads.folds(30, 3, 0), n_outputs=3)
    assert cv.oof[0].shape == (30, 3)


# ---- options ------------------------------------------------------------------------------------


def test_train_config_rejects_unknown_options_clearly() -> None:
    with pytest.raises(ValueError) as caught:
        TrainConfig(mode="gpu")
    assert str(caught.value) == "Invalid training mode 'gpu'. Only auto, embed, finetune are supported."
    with pytest.raises(ValueError) as caught:
        TrainConfig(augment="rotate")
    assert str(caught.value) == "Invalid augmentation 'rotate'. Only none, flip are supported."
    with pytest.raises(ValueError) as caught:
        TrainConfig(quality="ultra")
    assert str(caught.value) == "Invalid quality 'ultra'. Only fast, balanced, best are supported."
    for bad in ({"epochs": 0}, {"learning_rate": 0.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
            TrainConfig(**bad)
    assert TrainConfig(mode="embed").resolved_mode() == "embed"
    assert TrainConfig().quality == "balanced"


# ---- the embed-mode step, on cached embeddings (no backbone run) ---------------------------------


def cache_embeddings(
    store: LocalBlobStore,
    rows: list[ManifestRow],
    vectors: np.ndarray,
    backbone_id: str = backbone.BACKBONE_ID,
    mirrored: np.ndarray | None = None,
) -> None:
    """Put embeddings where the train step looks for them, for the centre crop and the mirrored one
    (``mirrored``'s vectors, or the same ones)."""
    views = {False: vectors, True: vectors if mirrored is None else mirrored}
    for view, table in views.items():
        for row, vector in zip(rows, table, strict=True):
            buf = io.BytesIO()
            np.save(buf, vector.astype(np.float32))
            store.put(embeddings.cache_key((backbone_id, view), row.sha256), buf.getvalue())


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """No backbone may run: every embedding must come from the cache."""

    def refuse(backbone_id: str) -> Any:
        raise AssertionError(f"the backbone {backbone_id} ran although every embedding was cached")

    monkeypatch.setattr(embeddings, "training_embedder", refuse)


def embedding_dataset(
    task_type: TaskType, n: int = 60, backbone_id: str = backbone.BACKBONE_ID
) -> tuple[Any, list[ManifestRow], np.ndarray]:
    """A task whose cached embeddings are learnable (separable classes/tags, a linear value)."""
    rng = np.random.default_rng(7)
    d = backbone.BACKBONES[backbone_id].embedding_dim
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
        latent = rng.normal(size=(n, 3))  # what the features are made of (like real embeddings: low rank)
        x = latent @ rng.normal(size=(3, d)) + 0.1 * rng.normal(size=(n, d))
        values = latent @ np.asarray([3.0, -2.0, 1.0]) * 3 + 50
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
        TrainConfig(mode="embed", quality="fast"),
        snapshot="datasets/task-1/snap-1",
        run_id="run-1",
        progress=lambda fraction, message: reports.append((fraction, message)),
    )

    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.json",
        "head.npz",
        "head.onnx",
        "test_inputs.npz",
        "train_oof.npz",
    ]
    written = json.loads((out / "bundle.json").read_text())
    assert written["labels"] == [{"id": lb.id, "name": lb.name} for lb in task.output_labels]
    assert written["frozen_backbone"] is True and written["task_type"] == str(task_type)
    assert written["features"] == [backbone.EMBEDDING_ID]
    assert (written["dataset_snapshot"], written["run_id"]) == ("datasets/task-1/snap-1", "run-1")
    assert written["training"]["train_images"] == len(split.train)
    assert written["training"]["test_images"] == len(split.test)
    assert written["selection"]["quality"] == "fast" and written["selection"]["chosen"] == "lite0-ms1"
    assert [c["name"] for c in written["selection"]["candidates"]] == ["lite0-ms1"]
    assert np.load(out / "test_inputs.npz")["image_ids"].tolist() == split.test
    # Every training image answered out of fold (never a test image), for the per-image evaluation.
    oof = np.load(out / "train_oof.npz")
    assert sorted(oof["image_ids"].tolist()) == sorted(split.train)
    assert len(oof["logits"]) == len(split.train) == len(oof["targets"])
    assert reports and all(0.0 <= f <= 1.0 for f, _ in reports)
    # head.npz holds the very head head.onnx computes.
    arrays = np.load(out / "head.npz")
    model = BundleModel.load(out)
    np.testing.assert_allclose(
        model.logits_from_embeddings(x[:5]), x[:5] @ arrays["weight"].T + arrays["bias"], rtol=1e-4, atol=1e-3
    )

    metrics = evaluate_model(out)
    assert metrics["test_images"] == len(split.test)
    if task_type is TaskType.MULTI_CLASS:
        assert metrics["accuracy"] == 1.0 and 0.0 <= metrics["ece"] < 0.5
        assert meta.thresholds == [] and meta.negative_label is None
    elif task_type is TaskType.MULTI_LABEL:
        assert written["negative_label"] == {"id": "t-none", "name": "none"}
        assert len(written["thresholds"]) == 2
        assert all(0.0 < t < 1.0 for t in written["thresholds"])
        assert metrics["mAP"] == 1.0 and metrics["macro_f1"] > 0.9 and 0.0 <= metrics["ece"] < 0.5
    else:
        train_values = [r.values["v-size"] for r in rows if r.image_id in set(split.train)]
        assert written["target_mean"] == pytest.approx([np.mean(train_values)], rel=1e-4)
        low, high = written["value_range"][0]
        span = max(train_values) - min(train_values)
        assert (low, high) == pytest.approx(
            (min(train_values) - 0.05 * span, max(train_values) + 0.05 * span)
        )
        assert written["training"]["head"].startswith(("ridge", "huber"))
        assert metrics["r2"] > 0.9 and metrics["out_of_range"] == 0


def test_the_same_photos_train_the_same_model_whatever_their_ids_and_upload_order(
    tmp_path: Path, no_backbone: None
) -> None:
    """Image ids are random UUIDs and uploads run in parallel: the train step's folds (and so the
    penalty chosen, the cross-validated scores and the head) must come from the photos alone."""
    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, x = embedding_dataset(TaskType.REGRESSION, n=90)
    x = x + np.random.default_rng(3).normal(scale=3.0, size=x.shape).astype(np.float32)  # folds matter
    cache_embeddings(store, rows, x)
    shuffled = [rows[i] for i in np.random.default_rng(5).permutation(len(rows))]
    renamed = [replace(row, image_id=f"id-{k:04d}") for k, row in enumerate(shuffled)]

    def scores_and_head(rows: list[ManifestRow], out: Path) -> tuple[dict[str, float], np.ndarray]:
        split = split_dataset(task, rows, seed=0)
        meta = train_model(task, rows, split, store, out, TrainConfig(mode="embed", quality="fast"))
        head = np.load(out / "head.npz")
        return {c["name"]: c["cv_score"] for c in meta.selection["candidates"]}, head["weight"]

    first_scores, first_head = scores_and_head(rows, tmp_path / "first")
    again_scores, again_head = scores_and_head(renamed, tmp_path / "again")
    assert again_scores == pytest.approx(first_scores, rel=1e-6)
    np.testing.assert_allclose(again_head, first_head, rtol=1e-4, atol=1e-6)


def test_the_head_has_one_output_per_label_even_if_a_label_has_no_training_image(
    tmp_path: Path, no_backbone: None
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, x = embedding_dataset(TaskType.MULTI_CLASS)
    rows = [
        ManifestRow(
            **{**vars(row), "test_image": row.labels == ["l-iris"]}
        )  # the user keeps every iris for testing
        for row in rows
    ]
    cache_embeddings(store, rows, x)
    train_model(
        task,
        rows,
        split_dataset(task, rows),
        store,
        tmp_path / "model",
        TrainConfig(mode="embed", quality="fast"),
    )
    model = BundleModel.load(tmp_path / "model")
    assert model.logits_from_embeddings(x[:2]).shape == (2, 3)


# ---- model selection ------------------------------------------------------------------------------

LITE2 = "tf_efficientnet_lite2.in1k"


@pytest.fixture
def lite0_or_lite2(monkeypatch: pytest.MonkeyPatch) -> selection.QualityPreset:
    """A preset of two linear candidates (Lite0's or Lite2's features, test-time flips), no fine-tune."""
    preset = selection.QualityPreset(
        "best",
        linear=((features.feature_id(backbone.BACKBONE_ID),), (features.feature_id(LITE2),)),
        test_time_flip=True,
        finetune=None,
        finetune_folds=0,
    )
    monkeypatch.setitem(selection.PRESETS, "best", preset)
    return preset


def test_model_selection_never_looks_at_the_test_split(
    tmp_path: Path, no_backbone: None, lite0_or_lite2: selection.QualityPreset
) -> None:
    """Lite2's features name the class perfectly, but only on the test images: on the training
    images they are noise. Lite0's are informative (not perfect) everywhere. A selection that
    peeked at the test split would pick Lite2 (and score 100 % on the test split); an honest
    one picks Lite0."""
    store = LocalBlobStore(tmp_path / "blobs")
    rng = np.random.default_rng(11)
    task, rows, _ = embedding_dataset(TaskType.MULTI_CLASS, n=90)
    split = split_dataset(task, rows, seed=0)
    label_ids = [lb.id for lb in task.output_labels]
    y = np.asarray([label_ids.index(row.labels[0]) for row in rows])
    d0, d2 = (backbone.BACKBONES[b].embedding_dim for b in (backbone.BACKBONE_ID, LITE2))
    lite0 = rng.normal(size=(len(rows), d0))
    lite0[:, :30] += np.repeat(1.2 * np.eye(3)[y], 10, axis=1)  # a weak signal in 30 of its numbers
    lite2 = rng.normal(size=(len(rows), d2))
    test = np.isin([row.image_id for row in rows], split.test)
    lite2[test] = rng.normal(scale=30.0, size=(3, d2))[y[test]]  # the planted, test-only signal
    cache_embeddings(store, rows, lite0)
    cache_embeddings(store, rows, lite2, LITE2)

    meta = train_model(
        task, rows, split, store, tmp_path / "model", TrainConfig(mode="embed", quality="best")
    )

    scores = {c["name"]: c["cv_score"] for c in meta.selection["candidates"]}
    assert set(scores) == {"lite0-ms1", "lite0-ms1+hflip", "lite2-ms1", "lite2-ms1+hflip"}
    assert scores["lite2-ms1"] < 0.6  # noise on the training split: about chance (1/3)
    assert meta.selection["chosen"].startswith("lite0-ms1")
    assert meta.features[0].startswith(backbone.EMBEDDING_ID)
    assert evaluate_model(tmp_path / "model")["accuracy"] < 1.0


def test_selection_reports_every_candidate_and_the_bundle_names_the_winners_features(
    tmp_path: Path, no_backbone: None, lite0_or_lite2: selection.QualityPreset
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    rng = np.random.default_rng(12)
    task, rows, lite0 = embedding_dataset(TaskType.MULTI_CLASS, n=90)
    label_ids = [lb.id for lb in task.output_labels]
    y = np.asarray([label_ids.index(row.labels[0]) for row in rows])
    d2 = backbone.BACKBONES[LITE2].embedding_dim
    lite2 = rng.normal(scale=8.0, size=(3, d2))[y] + rng.normal(size=(len(rows), d2))  # Lite2 wins everywhere
    cache_embeddings(store, rows, np.zeros_like(lite0))  # Lite0 knows nothing
    cache_embeddings(store, rows, lite2, LITE2)
    split = split_dataset(task, rows, seed=0)

    meta = train_model(
        task, rows, split, store, tmp_path / "model", TrainConfig(mode="embed", quality="best")
    )

    assert meta.selection["chosen"] in ("lite2-ms1", "lite2-ms1+hflip")  # a tie goes to the cheaper one
    assert meta.selection["chosen"] == "lite2-ms1"
    assert meta.features == [features.feature_id(LITE2)]
    assert meta.selection["metric"] == "accuracy" and meta.selection["folds"] == 3
    ranked = [c["cv_score"] for c in meta.selection["candidates"]]
    assert ranked == sorted(ranked, reverse=True)
    assert BundleMeta.from_json((tmp_path / "model" / "bundle.json").read_text()).features == meta.features
    assert evaluate_model(tmp_path / "model")["accuracy"] == 1.0


def test_a_retrain_of_barely_changed_data_refits_the_previous_choice(
    tmp_path: Path, no_backbone: None, lite0_or_lite2: selection.QualityPreset
) -> None:
    """Lite2 wins the first (full) selection; a retrain with 5 % new images refits Lite2 alone; one
    with more than 10 % of the images relabelled since that selection chooses among all again."""
    store = LocalBlobStore(tmp_path / "blobs")
    rng = np.random.default_rng(13)
    task, rows, lite0 = embedding_dataset(TaskType.MULTI_CLASS, n=105)
    label_ids = [lb.id for lb in task.output_labels]
    y = np.asarray([label_ids.index(row.labels[0]) for row in rows])
    d2 = backbone.BACKBONES[LITE2].embedding_dim
    cache_embeddings(store, rows, np.zeros_like(lite0))
    cache_embeddings(
        store, rows, rng.normal(scale=8.0, size=(3, d2))[y] + rng.normal(size=(len(rows), d2)), LITE2
    )

    def training(name: str, these: list[ManifestRow], previous: str = "") -> BundleMeta:
        write_snapshot(store, f"datasets/t/{name}", task, these)
        model_dir = tmp_path / name
        meta = train_model(
            task,
            these,
            split_dataset(task, these, seed=0),
            store,
            model_dir,
            TrainConfig(mode="embed", quality="best", previous_bundle=previous),
            snapshot=f"datasets/t/{name}",
            run_id=name,
        )
        register_bundle(model_dir, {}, store, f"models/t/{name}")
        return meta

    first = training("r1", rows[:100])
    assert len(first.selection["candidates"]) == 4 and "reused" not in first.selection
    assert first.selection["chosen"] == "lite2-ms1"

    second = training("r2", rows[:105], previous="models/t/r1")  # 5 new images
    assert second.selection["reused"] == {
        "from_run": "r1",
        "chosen": "lite2-ms1",
        "selected_on": "datasets/t/r1",
        "changed_images": 5,
        "images": 105,
    }
    assert [c["name"] for c in second.selection["candidates"]] == ["lite2-ms1"]
    assert second.features == [features.feature_id(LITE2)]
    assert evaluate_model(tmp_path / "r2")["accuracy"] == 1.0

    # 8 more relabelled: 13 of 105 changed since r1's full selection (changes add up over reuses).
    relabelled = [
        ManifestRow(**{**vars(row), "labels": [label_ids[(label_ids.index(row.labels[0]) + 1) % 3]]})
        if i < 8
        else row
        for i, row in enumerate(rows[:105])
    ]
    third = training("r3", relabelled, previous="models/t/r2")
    assert "reused" not in third.selection and len(third.selection["candidates"]) == 4
    # Another preset, or no previous version: a full selection as well.
    assert (
        selection.reusable_choice(store, "models/t/r1", task, rows[:100], quality="fast", augment="flip")
        is None
    )
    assert selection.reusable_choice(store, "", task, rows[:100], quality="best", augment="flip") is None
    assert (
        selection.reusable_choice(store, "models/t/gone", task, rows[:100], quality="best", augment="flip")
        is None
    )


def _candidate(name: str, kind: str, right: np.ndarray, cost: float) -> selection.CandidateScore:
    """A 2-class candidate whose out-of-fold answers are right on the rows where ``right`` is True."""
    oof = np.where(right[:, None], [[0.0, 1.0]], [[1.0, 0.0]]).astype(np.float32)  # every target is class 1
    return selection.CandidateScore(
        name=name,
        kind=kind,
        cv_score=float(right.mean()),
        serving_cost=cost,
        seconds=0.0,
        oof=oof,
        oof_rows=np.arange(len(right)),
    )


def test_the_averaged_candidate_gives_way_only_to_a_clearly_better_one() -> None:
    y = np.ones(200, dtype=np.float32)
    averaged = np.arange(200) >= 60  # right on 70 %
    close = averaged.copy()
    close[:30], close[60:84] = True, False  # 30 rows better, 24 worse: +3 points, within the noise
    clear = averaged.copy()
    clear[:60], clear[60:70] = True, False  # 60 rows better, 10 worse: +25 points
    ensemble = _candidate("ft + linear", selection.ENSEMBLE, averaged, 1.15)
    for other, expected in ((close, "ft + linear"), (clear, "linear")):
        candidates = [_candidate("linear", selection.LINEAR, other, 1.0), ensemble]
        assert selection.choose(candidates).name == "linear"  # by score alone
        assert selection.choose(candidates, task_type=TaskType.MULTI_CLASS, y=y).name == expected


def test_the_better_of_two_averaged_candidates_is_the_one_kept() -> None:
    """Regression offers the fine-tune averaged with the linear head and with the distribution head:
    the better-scored of the two holds the place that only a clearly better candidate takes."""
    y = np.ones(200, dtype=np.float32)
    with_linear = np.arange(200) >= 80  # right on 60 %
    with_distribution = np.arange(200) >= 60  # 70 %
    close = with_distribution.copy()
    close[:30], close[60:84] = True, False  # +3 points over the better average: within the noise
    candidates = [
        _candidate("ft + linear", selection.ENSEMBLE, with_linear, 1.15),
        _candidate("ft + distribution", selection.ENSEMBLE_DISTRIBUTION, with_distribution, 1.17),
        _candidate("linear", selection.LINEAR, close, 1.0),
    ]
    assert selection.choose(candidates).name == "linear"  # by score alone
    assert selection.choose(candidates, task_type=TaskType.MULTI_CLASS, y=y).name == "ft + distribution"
