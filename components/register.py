"""KFP component: the register step (its work is ``components.lib.register``)."""

from typing import Any

from kfp import dsl

from components.lib.runtime import TRAINING_IMAGE


@dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)
def register(
    storage_url: str,
    run_prefix: str,
    bundle_prefix: str,
    model: dsl.Input[dsl.Model],
    evaluation: dsl.Input[dsl.Dataset],
    predictions: dsl.Input[dsl.Dataset],
    report: dsl.Input[dsl.Markdown],
) -> str:
    """Write the model bundle to the blob store; returns the URI of its bundle.json.

    Args:
        storage_url: Blob store to write to (directory, file:// or s3://).
        run_prefix: Key prefix where this run reports progress and failures.
        bundle_prefix: Where the bundle goes (``models/<task>/<run>``).
        model: The train step's model folder.
        evaluation: The evaluate step's metrics.json.
        predictions: The evaluate step's per-image predictions (stored as predictions.jsonl).
        report: The evaluate step's Markdown report (stored as report.md).
    """
    import json
    from pathlib import Path

    from components.lib.register import register_bundle
    from components.lib.runtime import open_store, run_step

    def work(progress: Any) -> str:
        with open(evaluation.path) as fh:
            metrics = json.load(fh)
        return register_bundle(
            Path(model.path),
            metrics,
            open_store(storage_url),
            bundle_prefix,
            predictions=Path(predictions.path),
            report=Path(report.path),
        )

    return str(run_step(storage_url, run_prefix, "register", work))
