"""The model bundle: everything serving needs to predict with one trained model version.

A bundle is a folder (local or under ``models/<task>/<run>/`` in the blob store)::

    bundle.json   task type, ordered labels, backbone, preprocessing (and the JPEG
                  decoding scale, ``draft_factor``), features,
                  thresholds, target scaling and value range, metrics, what model
                  selection tried (``selection``), dataset snapshot, training parameters
    head.onnx     frozen-backbone models: features (N, D) -> logits (N, K), one Gemm
    head.npz      the same head as plain arrays: ``weight`` (K, D) and ``bias`` (K,)
    model.onnx    fine-tuned models (whole network): image (N, 3, S, S) -> logits (N, K)

A frozen-backbone head's input is the concatenation of the vectors its
``features`` ids name (:mod:`taskvision.features`); a bundle written before that
list existed means Lite0's multi-scale embedding, and loads as such.

Logits become answers the same way for every bundle (:func:`outputs_from_logits`):
softmax for multi_class, sigmoid for multi_label, ``logit * std + mean`` for
regression. A regression answer is then clipped to ``value_range`` (the
training values' range plus a margin, see :func:`value_range`), and flagged
when its raw value fell outside (:func:`clip_values`). Serving never reads the
database, only this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from taskvision.features import LEGACY_FEATURES
from taskvision.preprocess import DRAFT_FACTOR, LEGACY_DRAFT_FACTOR
from taskvision.task_types import TaskType

FORMAT = "taskvision.bundle/v1"
HEAD_FILE = "head.onnx"
HEAD_ARRAYS_FILE = "head.npz"
MODEL_FILE = "model.onnx"
RANGE_MARGIN = 0.05  # of the training values' span, on each side


@dataclass
class BundleMeta:
    task_id: str
    task_type: TaskType
    labels: list[dict[str, str]]  # ordered model outputs: [{"id", "name"}]
    backbone: str
    frozen_backbone: bool
    input_size: int
    preprocess: dict[str, Any]
    # JPEGs are decoded down to this many times the resize (taskvision.preprocess.draft_side),
    # in training as in serving; bundles without it were made with LEGACY_DRAFT_FACTOR.
    draft_factor: int = DRAFT_FACTOR
    thresholds: list[float] = field(default_factory=list)  # multi_label: per output
    target_mean: list[float] = field(default_factory=list)  # regression: per output
    target_std: list[float] = field(default_factory=list)
    negative_label: dict[str, str] | None = None  # multi_label: answered when no tag passes
    # Frozen-backbone heads: ordered feature ids whose vectors, concatenated, are the head's input.
    features: list[str] = field(default_factory=lambda: list(LEGACY_FEATURES))
    value_range: list[list[float]] = field(default_factory=list)  # regression: per output [low, high]
    selection: dict[str, Any] = field(default_factory=dict)  # what model selection tried and chose
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_snapshot: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    created: str = ""
    format: str = FORMAT

    @property
    def weights_file(self) -> str:
        return HEAD_FILE if self.frozen_backbone else MODEL_FILE

    @property
    def files(self) -> list[str]:
        """The weight files of this bundle besides bundle.json."""
        return [HEAD_FILE, HEAD_ARRAYS_FILE] if self.frozen_backbone else [MODEL_FILE]

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
        data.setdefault("draft_factor", LEGACY_DRAFT_FACTOR)
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


def value_range(y: npt.NDArray[np.float32], *, margin: float = RANGE_MARGIN) -> list[list[float]]:
    """Per output, the training values' [min, max] widened by ``margin`` of their span on each side.

    The margin does not cross zero when every training value is on one side of it:
    a quantity that was never negative (an age, a count, a price) is not answered negative.
    """
    table = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    ranges = []
    for column in table.T:
        low, high = float(column.min()), float(column.max())
        pad = margin * (high - low)
        new_low, new_high = low - pad, high + pad
        if low >= 0:
            new_low = max(new_low, 0.0)
        if high <= 0:
            new_high = min(new_high, 0.0)
        ranges.append([new_low, new_high])
    return ranges


def clip_values(
    meta: BundleMeta, values: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Regression values clipped to the bundle's ``value_range``, and which rows were outside it.

    A bundle without a range (written before ranges existed) answers unclipped.
    """
    values = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
    if not meta.value_range:
        return values, np.zeros(len(values), dtype=bool)
    low = np.asarray([r[0] for r in meta.value_range], dtype=np.float32)
    high = np.asarray([r[1] for r in meta.value_range], dtype=np.float32)
    outside: npt.NDArray[np.bool_] = np.asarray(((values < low) | (values > high)).any(axis=1))
    return np.clip(values, low, high).astype(np.float32), outside


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
