"""KFP component: the split step (its work is ``components.lib.split``)."""

from typing import Any

from kfp import dsl

from components.lib.runtime import TRAINING_IMAGE


@dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)
def split(
    storage_url: str,
    snapshot_prefix: str,
    run_prefix: str,
    test_fraction: float,
    seed: int,
    split_out: dsl.Output[dsl.Dataset],
) -> None:
    """Split the snapshot 80/20, stratified per label; user test flags win; duplicates stay together.

    Args:
        storage_url: Blob store holding the snapshot (directory, file:// or s3://).
        snapshot_prefix: Key prefix of the dataset snapshot (``datasets/<task>/<snapshot>``).
        run_prefix: Key prefix where this run reports progress and failures.
        test_fraction: Share of each label's images kept for testing (0.2 = 20 %).
        seed: Seed of the deterministic split order.
        split_out: JSON file ``{"train": [image ids], "test": [image ids]}``.
    """
    from components.lib.runtime import open_store, run_step
    from components.lib.split import split_dataset
    from taskvision.dataset import read_snapshot

    def work(progress: Any) -> None:
        info, rows = read_snapshot(open_store(storage_url), snapshot_prefix)
        result = split_dataset(info, rows, test_fraction=test_fraction, seed=seed)
        with open(split_out.path, "w") as fh:
            fh.write(result.to_json())
        split_out.metadata.update({"train": len(result.train), "test": len(result.test)})
        progress.note(train_images=len(result.train), test_images=len(result.test))

    run_step(storage_url, run_prefix, "split", work)
