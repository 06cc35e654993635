"""The model bundle: everything serving needs to predict with one trained model version.

A bundle is a folder (local or under ``models/<task>/<run>/`` in the blob store)::

    bundle.json   task type, ordered labels, backbone, preprocessing, thresholds,
                  target scaling, metrics, dataset snapshot, training parameters
    head.onnx     frozen-backbone models: embedding (N, 1280) -> logits (N, K)
    model.onnx    fine-tuned models: image (N, 3, 224, 224) -> logits (N, K)

Logits become answers the same way for every bundle (:func:`outputs_from_logits`):
softmax for multi_class, sigmoid for multi_label, ``logit * std + mean`` for
regression. Serving never reads the database, only this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from taskvision.task_types import TaskType

FORMAT = "taskvision.bundle/v1"
HEAD_FILE = "head.onnx"
MODEL_FILE = "model.onnx"


@dataclass
class BundleMeta:
    task_id: str
    task_type: TaskType
    labels: list[dict[str, str]]  # ordered model outputs: [{"id", "name"}]
    backbone: str
    frozen_backbone: bool
    input_size: int
    preprocess: dict[str, Any]
    thresholds: list[float] = field(default_factory=list)  # multi_label: per output
    target_mean: list[float] = field(default_factory=list)  # regression: per output
    target_std: list[float] = field(default_factory=list)
    negative_label: dict[str, str] | None = None  # multi_label: answered when no tag passes
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_snapshot: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    created: str = ""
    format: str = FORMAT

    @property
    def weights_file(self) -> str:
        return HEAD_FILE if self.frozen_backbone else MODEL_FILE

    def to_json(self) -> str:
        data = asdict(self)
        data["task_type"] = str(self.task_type)
        return json.dumps(data, indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> BundleMeta:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a {FORMAT} bundle (format={data.get('format')!r}).")
        data["task_type"] = TaskType(data["task_type"])
        return BundleMeta(**data)


def _softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def outputs_from_logits(meta: BundleMeta, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Probabilities (classification) or values (regression) from the model's raw outputs."""
    logits = logits.astype(np.float32)
    if meta.task_type is TaskType.MULTI_CLASS:
        return _softmax(logits)
    if meta.task_type is TaskType.MULTI_LABEL:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    mean = np.asarray(meta.target_mean, dtype=np.float32)
    std = np.asarray(meta.target_std, dtype=np.float32)
    return (logits * std + mean).astype(np.float32)


def linear_head_onnx(weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]) -> bytes:
    """A tiny ONNX graph ``logits = x @ weight.T + bias`` (no torch needed to build or run it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, d = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "weight", "bias"], ["output"], transB=1)],
        "taskvision_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", k])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="taskvision")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
