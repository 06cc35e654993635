"""Model bundles written directly (no training): a linear head with given weights, or a tiny network.

For serving tests that need many versions, or a full network (image -> logits)
without fine-tuning one: :func:`network_onnx` is a real ONNX graph of the
shape fine-tuned bundles have (convolution, ReLU, global average pooling,
flatten, one linear classifier), small enough to build in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from taskvision.backbone import BACKBONE_ID, EMBEDDING_DIM
from taskvision.bundle import HEAD_FILE, MODEL_FILE, BundleMeta, linear_head_onnx
from taskvision.task_types import TaskType

Array = npt.NDArray[np.float32]


def meta_for(task_type: TaskType, n_labels: int, *, frozen: bool, task_id: str = "task") -> BundleMeta:
    labels = [{"id": f"label-{i}", "name": f"label {i}"} for i in range(n_labels)]
    return BundleMeta(
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


def random_head(n_labels: int, seed: int) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n_labels, EMBEDDING_DIM)) * 0.05).astype(np.float32)
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
) -> BundleMeta:
    """A frozen-backbone bundle whose head.onnx is ``weight``, ``bias`` (random when not given)."""
    if weight is None or bias is None:
        weight, bias = random_head(n_labels, seed)
    meta = meta_for(task_type, len(weight), frozen=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HEAD_FILE).write_bytes(linear_head_onnx(weight, bias))
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
