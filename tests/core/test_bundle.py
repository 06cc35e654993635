"""The model bundle: the ONNX head, logits -> answers, bundle.json, and loading a bundle to predict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from taskvision.bundle import FORMAT, HEAD_FILE, MODEL_FILE, BundleMeta, linear_head_onnx, outputs_from_logits
from taskvision.inference import BundleModel
from taskvision.task_types import TaskType


def meta(task_type: TaskType = TaskType.MULTI_CLASS, **fields: object) -> BundleMeta:
    values: dict[str, object] = {
        "task_id": "task-1",
        "task_type": task_type,
        "labels": [
            {"id": "l-rose", "name": "rose"},
            {"id": "l-tulip", "name": "tulip"},
            {"id": "l-iris", "name": "iris"},
        ],
        "backbone": "tf_efficientnet_lite0.in1k",
        "frozen_backbone": True,
        "input_size": 224,
        "preprocess": {"resize_to": 256, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    values.update(fields)
    return BundleMeta(**values)  # type: ignore[arg-type]


def random_head(k: int = 3, d: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(k, d)).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    x = rng.normal(size=(6, d)).astype(np.float32)
    return weight, bias, x


def test_linear_head_onnx_computes_x_w_transposed_plus_b() -> None:
    weight, bias, x = random_head()
    session = ort.InferenceSession(linear_head_onnx(weight, bias), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    assert logits.shape == (6, 3)
    assert np.abs(logits - (x @ weight.T + bias)).max() < 1e-5
    # Any batch size, including one image.
    (single,) = session.run(None, {session.get_inputs()[0].name: x[:1]})
    assert np.abs(single - (x[:1] @ weight.T + bias)).max() < 1e-5


def test_softmax_rows_sum_to_one_and_keep_the_ranking() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    probs = outputs_from_logits(meta(TaskType.MULTI_CLASS), logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert probs.argmax(axis=1).tolist() == [2, 0, 0]
    np.testing.assert_allclose(probs[2], [1 / 3] * 3, atol=1e-6)


def test_sigmoid_outputs_are_independent_probabilities() -> None:
    logits = np.array([[0.0, 3.0, -3.0], [20.0, -20.0, 1.0]], dtype=np.float32)
    probs = outputs_from_logits(meta(TaskType.MULTI_LABEL), logits)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert probs[0, 0] == pytest.approx(0.5)
    assert probs[0, 1] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-6)
    assert probs[0, 2] == pytest.approx(1 - probs[0, 1], abs=1e-6)
    assert probs[1, 0] > 0.99 and probs[1, 1] < 0.01
    assert ((probs[0] > 0) & (probs[0] < 1)).all()  # strictly inside for moderate logits


def test_regression_outputs_are_de_standardized() -> None:
    regression = meta(
        TaskType.REGRESSION, labels=[{"id": "v", "name": "size"}], target_mean=[40.0], target_std=[5.0]
    )
    values = outputs_from_logits(regression, np.array([[0.0], [1.0], [-2.0]], dtype=np.float32))
    np.testing.assert_allclose(values, [[40.0], [45.0], [30.0]])


def test_bundle_meta_json_round_trip() -> None:
    original = meta(
        TaskType.MULTI_LABEL,
        thresholds=[0.3, 0.5, 0.7],
        negative_label={"id": "l-none", "name": "nothing"},
        metrics={"mAP": 0.9, "per_label": {"rose": {"f1": 0.8}}},
        dataset_snapshot="datasets/task-1/snap-1",
        training={"mode": "embed", "weight_decay": 0.01},
        run_id="run-1",
        created="2024-01-01T00:00:00+00:00",
    )
    text = original.to_json()
    data = json.loads(text)
    assert data["format"] == FORMAT and data["task_type"] == "multi_label"
    loaded = BundleMeta.from_json(text)
    assert loaded == original
    assert loaded.task_type is TaskType.MULTI_LABEL
    assert BundleMeta.from_json(text.encode()) == original


@pytest.mark.parametrize("fmt", ["taskvision.bundle/v0", None])
def test_a_bundle_of_another_format_is_refused(fmt: str | None) -> None:
    data = json.loads(meta().to_json())
    if fmt is None:
        del data["format"]
    else:
        data["format"] = fmt
    with pytest.raises(ValueError, match=re.escape(f"Not a {FORMAT} bundle")):
        BundleMeta.from_json(json.dumps(data))


def test_weights_file_depends_on_the_backbone_being_frozen() -> None:
    assert meta(frozen_backbone=True).weights_file == HEAD_FILE == "head.onnx"
    assert meta(frozen_backbone=False).weights_file == MODEL_FILE == "model.onnx"


def write_bundle(folder: Path, bundle: BundleMeta, weight: np.ndarray, bias: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / bundle.weights_file).write_bytes(linear_head_onnx(weight, bias))
    (folder / "bundle.json").write_text(bundle.to_json())
    return folder


@pytest.mark.parametrize("task_type", [TaskType.MULTI_CLASS, TaskType.MULTI_LABEL])
def test_a_loaded_bundle_predicts_like_numpy(tmp_path: Path, task_type: TaskType) -> None:
    weight, bias, x = random_head(seed=1)
    model = BundleModel.load(write_bundle(tmp_path, meta(task_type), weight, bias))
    assert model.meta.task_type is task_type
    logits = model.logits_from_embeddings(x.astype(np.float64))  # any float input is accepted
    np.testing.assert_allclose(logits, x @ weight.T + bias, atol=1e-5)
    expected = x @ weight.T + bias
    if task_type is TaskType.MULTI_CLASS:
        expected = np.exp(expected - expected.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    else:
        expected = 1 / (1 + np.exp(-expected))
    np.testing.assert_allclose(model.outputs(logits), expected, atol=1e-5)


def test_a_fine_tuned_bundle_does_not_take_embeddings(tmp_path: Path) -> None:
    weight, bias, x = random_head(seed=2)
    model = BundleModel.load(write_bundle(tmp_path, meta(frozen_backbone=False), weight, bias))
    assert (tmp_path / MODEL_FILE).exists()
    with pytest.raises(ValueError, match="takes images, not backbone embeddings"):
        model.logits_from_embeddings(x)


def test_loading_a_folder_with_a_foreign_bundle_json_fails(tmp_path: Path) -> None:
    weight, bias, _ = random_head()
    write_bundle(tmp_path, meta(), weight, bias)
    data = json.loads((tmp_path / "bundle.json").read_text())
    data["format"] = "something/else"
    (tmp_path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape("Not a taskvision.bundle/v1 bundle")):
        BundleModel.load(tmp_path)
