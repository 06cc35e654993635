"""A servable model bundle without a training: for what needs a version, not a meaningful one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from taskvision.task_types import TaskType


def linear_bundle(folder: Path, task_type: TaskType, label_names: list[str], *, seed: int = 0) -> Path:
    """A model bundle with a random linear head over the served backbone embedding (no training).

    Good for what needs a servable version but not a meaningful one (imports, limits, decoding).
    """
    from taskvision.backbone import BACKBONE_ID, EMBEDDING_DIM
    from taskvision.bundle import BundleMeta, linear_head_onnx
    from taskvision.preprocess import DEFAULT

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.01, size=(len(label_names), EMBEDDING_DIM)).astype(np.float32)
    bias = np.zeros(len(label_names), dtype=np.float32)
    meta = BundleMeta(
        task_id="",
        task_type=task_type,
        labels=[{"id": f"label-{i}", "name": name} for i, name in enumerate(label_names)],
        backbone=BACKBONE_ID,
        frozen_backbone=True,
        input_size=DEFAULT.input_size,
        preprocess={"resize_to": DEFAULT.resize_to, "mean": list(DEFAULT.mean), "std": list(DEFAULT.std)},
        thresholds=[0.5] * len(label_names) if task_type is TaskType.MULTI_LABEL else [],
        target_mean=[0.0] * len(label_names) if task_type is TaskType.REGRESSION else [],
        target_std=[1.0] * len(label_names) if task_type is TaskType.REGRESSION else [],
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / meta.weights_file).write_bytes(linear_head_onnx(weight, bias))
    (folder / "bundle.json").write_text(meta.to_json())
    return folder
