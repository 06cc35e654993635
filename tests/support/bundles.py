"""Model bundles written directly (no training): for what needs versions, not meaningful ones.

* :func:`linear_bundle`: a random linear head over the served backbone embedding;
* :func:`write_head_bundle`: a linear head with given (or random) weights, for
  serving tests that need many versions;
* :func:`write_network_bundle`: a full network (image -> logits) without
  fine-tuning one: :func:`network_onnx` is a real ONNX graph of the shape
  fine-tuned bundles have (convolution, ReLU, global average pooling, flatten,
  one linear classifier), small enough to build in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from taskvision.backbone import BACKBONE_ID, EMBEDDING_DIM
from taskvision.bundle import HEAD_ARRAYS_FILE, HEAD_FILE, MODEL_FILE, BundleMeta, linear_head_onnx
from taskvision.task_types import TaskType

Array = npt.NDArray[np.float32]


def linear_bundle(folder: Path, task_type: TaskType, label_names: list[str], *, seed: int = 0) -> Path:
    """A model bundle with a random linear head over the served backbone embedding (no training).

    Good for what needs a servable version but not a meaningful one (imports, limits, decoding).
    """
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


def meta_for(
    task_type: TaskType,
    n_labels: int,
    *,
    frozen: bool,
    task_id: str = "task",
    features: list[str] | None = None,
) -> BundleMeta:
    """bundle.json of a Lite0 bundle; ``features``: a frozen head's (default: Lite0's multi-scale)."""
    labels = [{"id": f"label-{i}", "name": f"label {i}"} for i in range(n_labels)]
    meta = BundleMeta(
        task_id=task_id,
        task_type=task_type,
        labels=labels,
        backbone=BACKBONE_ID,
        frozen_backbone=frozen,
        input_size=224,
        preprocess={"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
        thresholds=[0.5] * n_labels if task_type is TaskType.MULTI_LABEL else [],
        target_mean=[10.0] * n_labels if task_type is TaskType.REGRESSION else [],
        target_std=[5.0] * n_labels if task_type is TaskType.REGRESSION else [],
    )
    if features is not None:
        meta.features = list(features)
    return meta


def random_head(n_labels: int, seed: int, *, dim: int = EMBEDDING_DIM) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n_labels, dim)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(n_labels) * 0.1).astype(np.float32)
    return weight, bias


def write_head_bundle(
    directory: Path,
    *,
    n_labels: int = 3,
    seed: int = 0,
    task_type: TaskType = TaskType.MULTI_CLASS,
    weight: Array | None = None,
    bias: Array | None = None,
    features: list[str] | None = None,
    npz: bool = False,
) -> BundleMeta:
    """A frozen-backbone bundle whose head.onnx is ``weight``, ``bias`` (random when not given).

    ``features``: what the head takes (default: Lite0's multi-scale embedding); ``npz``: also
    ``head.npz``, as today's train step writes it.
    """
    if weight is None or bias is None:
        from taskvision.features import LEGACY_FEATURES, feature_dim

        weight, bias = random_head(n_labels, seed, dim=feature_dim(features or LEGACY_FEATURES))
    meta = meta_for(task_type, len(weight), frozen=True, features=features)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HEAD_FILE).write_bytes(linear_head_onnx(weight, bias))
    if npz:
        np.savez(directory / HEAD_ARRAYS_FILE, weight=weight, bias=bias)
    (directory / "bundle.json").write_text(meta.to_json())
    return meta


def network_onnx(n_labels: int, seed: int, *, channels: int = 8) -> tuple[bytes, dict[str, Array]]:
    """image (N, 3, 224, 224) -> Conv 16x16/16 -> ReLU -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    params = {
        "conv_w": (rng.standard_normal((channels, 3, 16, 16)) * 0.05).astype(np.float32),
        "conv_b": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        "fc_w": rng.standard_normal((n_labels, channels)).astype(np.float32),
        "fc_b": (rng.standard_normal(n_labels) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv_w", "conv_b"], ["conv"], kernel_shape=[16, 16], strides=[16, 16]
        ),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_network",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_labels])],
        initializer=[numpy_helper.from_array(value, name) for name, value in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), params


def write_network_bundle(
    directory: Path, *, n_labels: int = 3, seed: int = 0, task_type: TaskType = TaskType.MULTI_CLASS
) -> BundleMeta:
    """A full-network (fine-tuned-like) bundle: model.onnx takes images."""
    meta = meta_for(task_type, n_labels, frozen=False)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_FILE).write_bytes(network_onnx(n_labels, seed)[0])
    (directory / "bundle.json").write_text(meta.to_json())
    return meta
