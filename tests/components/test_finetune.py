"""The train step's finetune mode (the GPU default) end to end on a tiny dataset, on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.lib.evaluate import evaluate_model
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, train_model
from taskvision.bundle import BundleMeta
from taskvision.inference import BundleModel
from taskvision.preprocess import preprocess_bytes
from taskvision.storage import LocalBlobStore
from tests.support.images import shape_image
from tests.support.snapshots import shapes_in_store


@pytest.mark.slow
def test_finetune_exports_a_full_network_that_evaluates(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    info, rows = shapes_in_store(store, per_label=10)
    split = split_dataset(info, rows)
    out = tmp_path / "model"
    config = TrainConfig(mode="finetune", epochs=1, batch_size=8, learning_rate=0.01)
    meta = train_model(info, rows, split, store, out, config)

    assert meta.frozen_backbone is False and meta.training["mode"] == "finetune"
    assert (out / "model.onnx").exists() and not (out / "head.onnx").exists()
    assert BundleMeta.from_json((out / "bundle.json").read_text()).weights_file == "model.onnx"
    metrics = evaluate_model(out)
    assert metrics["test_images"] == len(split.test) and 0.0 <= metrics["accuracy"] <= 1.0
    # The exported network answers images directly, with probabilities that sum to one.
    model = BundleModel.load(out)
    array, _ = preprocess_bytes(shape_image("circle", 99), max_pixels=10**7)
    probs = model.outputs(model.logits_from_arrays(array[None]))
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0, atol=1e-5)
