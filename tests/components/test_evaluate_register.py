"""The evaluate and register steps, and what every step shares (progress and failure reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.lib.evaluate import evaluate, evaluate_model, markdown_report, write_predictions
from components.lib.register import register_bundle
from components.lib.runtime import Progress, StepFailed, run_step
from taskvision.bundle import HEAD_FILE, BundleMeta, linear_head_onnx
from taskvision.metrics import classification_metrics
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType


def head_bundle(
    folder: Path, task_type: TaskType, weight: np.ndarray, bias: np.ndarray, **fields: Any
) -> BundleMeta:
    """A frozen-backbone model folder as the train step writes it (without test inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = BundleMeta(
        task_id="task-1",
        task_type=task_type,
        labels=[{"id": f"l{i}", "name": f"label {i}"} for i in range(len(weight))],
        backbone="test-backbone",
        frozen_backbone=True,
        input_size=224,
        preprocess={},
        **fields,
    )
    (folder / HEAD_FILE).write_bytes(linear_head_onnx(weight.astype(np.float32), bias.astype(np.float32)))
    (folder / "bundle.json").write_text(meta.to_json())
    return meta


# ---- evaluate ------------------------------------------------------------------------------------


def test_evaluate_scores_the_test_inputs_through_the_bundle(tmp_path: Path) -> None:
    # Identity head: the class is the argmax of the embedding itself.
    head_bundle(tmp_path, TaskType.MULTI_CLASS, np.eye(3), np.zeros(3))
    embeddings = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0]], dtype=np.float32)
    truth = np.array([0, 1, 2, 1, 1], dtype=np.float32)
    np.savez(
        tmp_path / "test_inputs.npz", image_ids=np.array(list("abcde")), embeddings=embeddings, targets=truth
    )

    metrics = evaluate_model(tmp_path)

    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["test_images"] == 5
    assert metrics["confusion_matrix"] == {
        "labels": ["label 0", "label 1", "label 2"],
        "rows": "actual",
        "columns": "predicted",
        "actual_by_predicted": [[1, 0, 0], [1, 2, 0], [0, 0, 1]],
    }
    assert metrics["per_label"]["label 1"]["recall"] == pytest.approx(2 / 3)


def test_evaluate_multi_label_uses_the_bundle_thresholds(tmp_path: Path) -> None:
    # sigmoid(embedding) are the probabilities; a threshold of 0.9 makes 0.88 a "no".
    head_bundle(tmp_path, TaskType.MULTI_LABEL, np.eye(2), np.zeros(2), thresholds=[0.9, 0.5])
    probs = np.array([[0.95, 0.6], [0.88, 0.4], [0.1, 0.7]])
    logits = np.log(probs / (1 - probs))
    truth = np.array([[1, 1], [1, 0], [0, 1]], dtype=np.float32)
    np.savez(tmp_path / "test_inputs.npz", embeddings=logits.astype(np.float32), targets=truth)
    metrics = evaluate_model(tmp_path)
    assert metrics["per_label"]["label 0"]["recall"] == pytest.approx(0.5)
    assert metrics["per_label"]["label 1"]["f1"] == pytest.approx(1.0)
    assert metrics["per_label"]["label 0"]["threshold"] == 0.9
    assert metrics["mAP"] == pytest.approx(1.0)


def test_evaluate_regression_de_standardizes(tmp_path: Path) -> None:
    head_bundle(
        tmp_path, TaskType.REGRESSION, np.ones((1, 1)), np.zeros(1), target_mean=[10.0], target_std=[2.0]
    )
    np.savez(
        tmp_path / "test_inputs.npz",
        embeddings=np.array([[0.0], [1.0], [-1.0]], dtype=np.float32),
        targets=np.array([[10.0], [12.0], [9.0]], dtype=np.float32),
    )
    metrics = evaluate_model(tmp_path)
    assert metrics["mae"] == pytest.approx(1 / 3)  # predictions 10, 12, 8


def test_evaluate_scores_regression_answers_as_served_clipped_to_the_value_range(tmp_path: Path) -> None:
    head_bundle(
        tmp_path,
        TaskType.REGRESSION,
        np.ones((1, 1)),
        np.zeros(1),
        target_mean=[10.0],
        target_std=[2.0],
        value_range=[[0.0, 14.0]],
    )
    np.savez(
        tmp_path / "test_inputs.npz",
        embeddings=np.array([[0.0], [4.0], [-9.0]], dtype=np.float32),  # raw answers 10, 18, -8
        targets=np.array([[10.0], [14.0], [1.0]], dtype=np.float32),
    )
    metrics = evaluate_model(tmp_path)
    assert metrics["mae"] == pytest.approx(1 / 3)  # answers 10, 14, 0
    assert metrics["out_of_range"] == 2


def test_evaluate_without_test_images(tmp_path: Path) -> None:
    head_bundle(tmp_path, TaskType.MULTI_CLASS, np.eye(2), np.zeros(2))
    np.savez(
        tmp_path / "test_inputs.npz",
        embeddings=np.zeros((0, 2), dtype=np.float32),
        targets=np.zeros((0,), dtype=np.float32),
    )
    assert evaluate_model(tmp_path) == {"test_images": 0}


def test_markdown_report_shows_headline_and_per_label_metrics() -> None:
    metrics = classification_metrics(
        np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), ["rose", "tulip"]
    )
    text = markdown_report(TaskType.MULTI_CLASS, metrics)
    assert text.startswith("# Evaluation (multi_class, 3 test images)")
    assert "| accuracy | 0.6667 |" in text
    assert "| rose | 0.500 | 1.000 | 0.667 | 1 |" in text  # precision, recall, f1, support
    assert "| tulip | 1.000 | 0.500 | 0.667 | 2 |" in text
    assert "| ece |" in text and "| macro_f1 |" in text and "Model selection" not in text
    assert "Rows: the actual label; columns: the predicted label." in text
    assert "| tulip | 1 | 1 |" in text  # actual tulip: once predicted rose, once tulip


def test_markdown_report_shows_what_model_selection_tried_and_chose() -> None:
    metrics = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["rose", "tulip"])
    selection = {
        "quality": "best",
        "chosen": "lite1-ms1 + lite2-ms1",
        "kind": "linear",
        "metric": "accuracy",
        "folds": 3,
        "scored_rows": 480,
        "seconds": 41.5,
        "candidates": [
            {
                "name": "lite1-ms1 + lite2-ms1",
                "kind": "linear",
                "cv_score": 0.7563,
                "head": "logistic(l2=0.1)",
                "serving_cost": 3.5,
                "seconds": 3.3,
            },
            {
                "name": "partial_finetune(lite0, blocks 6-6)",
                "kind": "partial_finetune",
                "cv_score": 0.7042,
                "serving_cost": 1.0,
                "seconds": 120.0,
                "plan": {},
            },
        ],
        "skipped": ["lite0-ms1 + lite1-ms1 + lite2-ms1"],
    }
    text = markdown_report(TaskType.MULTI_CLASS, metrics, selection=selection)
    assert "chose **lite1-ms1 + lite2-ms1** by 3-fold cross-validation on the training split" in text
    assert "| lite1-ms1 + lite2-ms1 (chosen) | linear | 0.7563 | logistic(l2=0.1) | 3.5 | 3.3 |" in text
    assert "| partial_finetune(lite0, blocks 6-6) | partial_finetune | 0.7042 | - | 1.0 | 120.0 |" in text
    assert "Not tried (time budget): lite0-ms1 + lite1-ms1 + lite2-ms1." in text


# ---- per-image predictions -----------------------------------------------------------------------


def test_every_test_image_and_every_out_of_fold_training_image_gets_its_answer(tmp_path: Path) -> None:
    head_bundle(tmp_path, TaskType.MULTI_CLASS, np.eye(3), np.zeros(3))
    embeddings = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], dtype=np.float32)
    np.savez(
        tmp_path / "test_inputs.npz",
        image_ids=np.array(["t1", "t2", "t3", "t4"]),
        embeddings=embeddings,
        targets=np.array([0, 1, 2, 1], dtype=np.float32),  # t4 is a label 1 answered as label 0
    )
    # Out-of-fold raw outputs of two training images (the head does not see these).
    np.savez(
        tmp_path / "train_oof.npz",
        image_ids=np.array(["r1", "r2"]),
        logits=np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32),
        targets=np.array([1, 0], dtype=np.float32),
    )

    result = evaluate(tmp_path)

    by_id = {p["image_id"]: p for p in result.predictions}
    assert [p["split"] for p in result.predictions] == ["test"] * 4 + ["train"] * 2
    assert by_id["t1"]["correct"] is True and by_id["t4"]["correct"] is False
    assert by_id["t4"]["true_labels"] == [{"id": "l1", "name": "label 1"}]
    assert by_id["t4"]["predicted_labels"][0]["id"] == "l0"
    assert by_id["t4"]["confidence"] == pytest.approx(np.exp(5) / (np.exp(5) + 2), abs=1e-4)
    assert [s["id"] for s in by_id["t4"]["scores"]] == ["l0", "l1", "l2"]
    assert sum(s["prob"] for s in by_id["t4"]["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert by_id["r1"]["correct"] is True and by_id["r2"]["correct"] is False
    assert by_id["r2"]["predicted_labels"][0]["name"] == "label 2"
    # The metrics are the test split's alone.
    assert result.metrics["test_images"] == 4 and result.metrics["accuracy"] == pytest.approx(0.75)
    write_predictions(tmp_path / "p.jsonl", result.predictions)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.predictions


def test_tagging_predictions_name_the_negative_label_for_no_tag(tmp_path: Path) -> None:
    head_bundle(
        tmp_path,
        TaskType.MULTI_LABEL,
        np.eye(2),
        np.zeros(2),
        thresholds=[0.5, 0.5],
        negative_label={"id": "neg", "name": "nothing"},
    )
    probs = np.array([[0.9, 0.2], [0.1, 0.3], [0.6, 0.8]])
    np.savez(
        tmp_path / "test_inputs.npz",
        image_ids=np.array(["a", "b", "c"]),
        embeddings=np.log(probs / (1 - probs)).astype(np.float32),
        targets=np.array([[1, 0], [0, 0], [1, 0]], dtype=np.float32),
    )
    by_id = {p["image_id"]: p for p in evaluate(tmp_path).predictions}
    assert by_id["a"]["correct"] is True and by_id["a"]["confidence"] == pytest.approx(0.8)
    assert by_id["b"]["true_labels"] == [{"id": "neg", "name": "nothing"}]
    assert by_id["b"]["predicted_labels"] == [{"id": "neg", "name": "nothing"}]
    assert by_id["c"]["correct"] is False  # 'label 1' answered but not present
    assert [label["id"] for label in by_id["c"]["predicted_labels"]] == ["l0", "l1"]
    # The least sure decision sets the confidence: label 0 at 0.6.
    assert by_id["c"]["confidence"] == pytest.approx(0.6)


def test_regression_predictions_carry_the_error_and_flag_outliers(tmp_path: Path) -> None:
    head_bundle(
        tmp_path, TaskType.REGRESSION, np.ones((1, 1)), np.zeros(1), target_mean=[10.0], target_std=[2.0]
    )
    np.savez(
        tmp_path / "test_inputs.npz",
        image_ids=np.array(["a", "b", "c", "d"]),
        embeddings=np.array([[0.0], [0.5], [0.0], [3.0]], dtype=np.float32),  # answers 10, 11, 10, 16
        targets=np.array([[10.0], [10.0], [11.0], [10.0]], dtype=np.float32),  # errors 0, 1, 1, 6
    )
    result = evaluate(tmp_path)
    assert result.metrics["mae"] == pytest.approx(2.0)
    by_id = {p["image_id"]: p for p in result.predictions}
    assert by_id["d"]["error"] == pytest.approx(6.0) and by_id["d"]["correct"] is False  # > 2 x MAE
    assert by_id["b"]["correct"] is True and by_id["b"]["confidence"] is None
    assert by_id["d"]["predicted_labels"] == [{"id": "l0", "name": "label 0", "value": 16.0}]
    assert by_id["d"]["true_labels"] == [{"id": "l0", "name": "label 0", "value": 10.0}]


# ---- register ------------------------------------------------------------------------------------


def test_register_stores_the_predictions_and_the_report_beside_the_bundle(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    head_bundle(model_dir, TaskType.MULTI_CLASS, np.eye(2), np.zeros(2))
    (tmp_path / "predictions").write_text('{"image_id": "a"}\n')
    (tmp_path / "report").write_text("# Evaluation\n")
    store = LocalBlobStore(tmp_path / "blobs")

    register_bundle(
        model_dir,
        {"test_images": 1},
        store,
        "models/t/r",
        predictions=tmp_path / "predictions",
        report=tmp_path / "report",
    )

    assert store.get("models/t/r/predictions.jsonl") == b'{"image_id": "a"}\n'
    assert store.get("models/t/r/report.md") == b"# Evaluation\n"


def test_register_writes_weights_and_bundle_json_with_metrics(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    head_bundle(model_dir, TaskType.MULTI_CLASS, np.eye(2), np.zeros(2))
    np.savez(model_dir / "head.npz", weight=np.eye(2), bias=np.zeros(2))
    store = LocalBlobStore(tmp_path / "blobs")

    uri = register_bundle(model_dir, {"accuracy": 0.75, "test_images": 4}, store, "models/task-1/run-1")

    assert uri == (tmp_path / "blobs" / "models/task-1/run-1/bundle.json").resolve().as_uri()
    assert store.list_keys("models/task-1/run-1") == [
        "models/task-1/run-1/bundle.json",
        "models/task-1/run-1/head.npz",
        "models/task-1/run-1/head.onnx",
    ]
    assert store.get("models/task-1/run-1/head.onnx") == (model_dir / "head.onnx").read_bytes()
    registered = BundleMeta.from_json(store.get("models/task-1/run-1/bundle.json"))
    assert registered.metrics == {"accuracy": 0.75, "test_images": 4}
    assert registered.labels == [{"id": "l0", "name": "label 0"}, {"id": "l1", "name": "label 1"}]


# ---- runtime -------------------------------------------------------------------------------------


def test_run_step_reports_progress_and_returns_the_result(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    seen: list[dict[str, Any]] = []

    def work(progress: Progress) -> str:
        seen.append(json.loads(store.get("runs/r1/progress.json")))
        return "done!"

    assert run_step(str(tmp_path / "blobs"), "runs/r1", "train", work) == "done!"
    assert (seen[0]["step"], seen[0]["progress"], seen[0]["message"]) == ("train", 0.0, "train started")
    final = json.loads(store.get("runs/r1/progress.json"))
    assert (final["step"], final["progress"], final["message"]) == ("train", 1.0, "train done")
    assert not store.exists("runs/r1/failure.json")


def test_run_step_records_a_step_failure_verbatim_and_re_raises(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    message = "label 'rose' has 12 images; at least 20 are needed"

    def work(progress: Progress) -> None:
        raise StepFailed(message)

    with pytest.raises(StepFailed, match=message):
        run_step(f"file://{tmp_path / 'blobs'}", "runs/r1", "validate", work)
    failure = json.loads(store.get("runs/r1/failure.json"))
    assert (failure["step"], failure["message"]) == ("validate", message)


def test_run_step_names_the_step_and_error_of_an_unexpected_failure(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")

    def work(progress: Progress) -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_step(str(tmp_path / "blobs"), "runs/r1", "train", work)
    failure = json.loads(store.get("runs/r1/failure.json"))
    assert failure["message"] == "The train step failed: RuntimeError: out of memory"


def test_progress_is_clamped_and_written_at_most_once_a_second(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    progress = Progress(store, "runs/r1", "train")

    def current() -> tuple[float, str]:
        body = json.loads(store.get("runs/r1/progress.json"))
        return body["progress"], body["message"]

    progress(0.25, "a quarter", force=True)
    progress(0.5, "half")  # within a second of the last write: skipped
    assert current() == (0.25, "a quarter")
    progress(0.5, "half", force=True)
    assert current() == (0.5, "half")
    progress(1.7, "finished")  # completion is always written, and clamped to 1
    assert current() == (1.0, "finished")
    progress(-1.0, "rewound", force=True)
    assert current() == (0.0, "rewound")
