"""KFP component: the train step (its work is ``components.lib.train``)."""

from typing import Any

from kfp import dsl

from components.lib.runtime import TRAINING_IMAGE


@dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)
def train(
    storage_url: str,
    snapshot_prefix: str,
    run_prefix: str,
    run_id: str,
    split_in: dsl.Input[dsl.Dataset],
    mode: str,
    quality: str,
    augment: str,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    previous_bundle: str,
    model: dsl.Output[dsl.Model],
) -> None:
    """Train a model over pretrained EfficientNet-Lite backbones, chosen by cross-validation.

    Args:
        storage_url: Blob store holding the snapshot (directory, file:// or s3://).
        snapshot_prefix: Key prefix of the dataset snapshot.
        run_prefix: Key prefix where this run reports progress and failures.
        run_id: The control plane's id of this training run.
        split_in: The split step's train/test image ids.
        mode: "embed" (CPU: model selection by cross-validation), "finetune" (end to end) or "auto"
            (finetune on GPU).
        quality: embed mode's preset: "fast" (Lite0 features, linear head), "balanced" (also a partial
            fine-tune of Lite0's last block) or "best" (Lite0/1/2 features and their concatenations, test-time
            flips, a longer partial fine-tune).
        augment: "flip" adds mirrored training images, "none" does not.
        epochs: Fine-tuning epochs.
        learning_rate: Fine-tuning learning rate (SGD with momentum 0.9, cosine schedule).
        batch_size: Fine-tuning batch size.
        seed: Seed for cross-validation folds and fine-tuning.
        previous_bundle: Blob prefix of the task's current version ("" for none): a retrain of data
            that barely changed refits its model choice instead of scoring every candidate again.
        model: The model folder: bundle.json, head.onnx + head.npz or model.onnx, test_inputs.npz.
    """
    from pathlib import Path

    from components.lib.runtime import open_store, run_step
    from components.lib.split import SplitResult
    from components.lib.train import TrainConfig, train_model
    from taskvision.dataset import read_snapshot

    def work(progress: Any) -> None:
        store = open_store(storage_url)
        info, rows = read_snapshot(store, snapshot_prefix)
        with open(split_in.path) as fh:
            split = SplitResult.from_json(fh.read())
        config = TrainConfig(
            mode=mode,
            quality=quality,
            augment=augment,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            seed=seed,
            previous_bundle=previous_bundle,
        )
        meta = train_model(
            info,
            rows,
            split,
            store,
            Path(model.path),
            config,
            snapshot=snapshot_prefix,
            run_id=run_id,
            progress=progress,
        )
        chosen = str(meta.selection.get("chosen", ""))
        model.metadata.update(
            {"task_type": str(meta.task_type), "mode": meta.training["mode"], "chosen": chosen}
        )
        # What the run used, shown with it: the mode auto became, the preset, the model selection chose.
        decided = {"mode": meta.training["mode"], "quality": quality, "chosen_model": chosen or meta.backbone}
        if meta.selection.get("reused"):  # no new model selection: the previous version's choice, refitted
            decided["refitted_choice_of_run"] = meta.selection["reused"]["from_run"]
        progress.note(**decided)

    run_step(storage_url, run_prefix, "train", work)
