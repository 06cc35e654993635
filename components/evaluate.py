"""KFP component: the evaluate step (its work is ``components.lib.evaluate``)."""

from typing import Any

from kfp import dsl

from components.lib.runtime import TRAINING_IMAGE


@dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)
def evaluate(
    storage_url: str,
    run_prefix: str,
    model: dsl.Input[dsl.Model],
    evaluation: dsl.Output[dsl.Dataset],
    predictions: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    confusion: dsl.Output[dsl.ClassificationMetrics],
    report: dsl.Output[dsl.Markdown],
) -> None:
    """Evaluate the trained model on the test split.

    Args:
        storage_url: Blob store (for progress and failure reports).
        run_prefix: Key prefix where this run reports progress and failures.
        model: The train step's model folder.
        evaluation: metrics.json with every metric (read by the register step).
        predictions: One JSON line per test image (and per training image, out of fold):
            true and predicted labels or values, scores, right or wrong.
        metrics: Headline scalar metrics for the Kubeflow UI.
        confusion: The confusion matrix (multi_class), drawn by the Kubeflow UI.
        report: The Markdown evaluation report (also stored with the bundle).
    """
    import json
    from pathlib import Path

    from components.lib.evaluate import evaluate as evaluate_folder
    from components.lib.evaluate import markdown_report, write_predictions
    from components.lib.runtime import run_step
    from taskvision.bundle import BundleMeta

    def work(progress: Any) -> None:
        model_dir = Path(model.path)
        meta = BundleMeta.from_json((model_dir / "bundle.json").read_text())
        result = evaluate_folder(model_dir)
        values = result.metrics
        write_predictions(Path(predictions.path), result.predictions)
        with open(evaluation.path, "w") as fh:
            json.dump(values, fh, indent=2)
        for key, value in values.items():
            if isinstance(value, (int, float)):
                metrics.log_metric(key, float(value))
        matrix = values.get("confusion_matrix")
        if matrix:
            confusion.log_confusion_matrix(matrix["labels"], matrix["actual_by_predicted"])
        with open(report.path, "w") as fh:
            fh.write(markdown_report(meta.task_type, values, selection=meta.selection))

    run_step(storage_url, run_prefix, "evaluate", work)
