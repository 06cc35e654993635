"""KFP component: the validate step (its work is ``components.lib.validate``)."""

from typing import Any

from kfp import dsl

from components.lib.runtime import TRAINING_IMAGE


@dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)
def validate(
    storage_url: str,
    snapshot_prefix: str,
    run_prefix: str,
    min_images_per_label: int,
    report: dsl.Output[dsl.Markdown],
) -> None:
    """Validate the dataset snapshot with a great-expectations suite and image checks.

    Fails the run with a readable list of problems (also written to the run's
    failure.json for the control plane) when the data cannot be trained on.

    Args:
        storage_url: Blob store holding the snapshot (directory, file:// or s3://).
        snapshot_prefix: Key prefix of the dataset snapshot (``datasets/<task>/<snapshot>``).
        run_prefix: Key prefix where this run reports progress and failures.
        min_images_per_label: Fewest images a label needs (classification) or images with values (regression).
        report: Markdown report of every check, shown in the Kubeflow UI.
    """
    from components.lib.runtime import StepFailed, open_store, run_step
    from components.lib.validate import validate_dataset
    from taskvision.dataset import read_snapshot

    def work(progress: Any) -> None:
        store = open_store(storage_url)
        info, rows = read_snapshot(store, snapshot_prefix)
        result = validate_dataset(info, rows, store, min_images_per_label=min_images_per_label)
        with open(report.path, "w") as fh:
            fh.write(result.markdown())
        if not result.ok:
            raise StepFailed("Training data did not pass validation: " + "; ".join(result.problems) + ".")

    run_step(storage_url, run_prefix, "validate", work)
