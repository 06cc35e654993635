"""The KServe predictor for one model bundle.

``BundlePredictor`` is a ``kserve.Model``: ``load`` reads the bundle,
``preprocess`` decodes images exactly as evaluation did
(:meth:`taskvision.inference.BundleModel.decode` and ``prepare``), ``predict``
runs the bundle (:class:`taskvision.inference.BundleModel`), ``postprocess``
names the outputs. A regression answer is clipped to the bundle's value range
(the training values' range plus a margin) and its record says
``"out_of_range": true`` when the raw prediction fell outside it.
It speaks both KServe protocols:

* V1 ``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "..."}, ...]}``
  answers ``{"predictions": [{"best_label": ..., "labels": [...]}, ...]}``;
* Open Inference (V2) ``POST /v2/models/<name>/infer`` with a BYTES input
  ``image`` (one encoded image per element) answers FP32 ``probabilities``
  (regression: ``values``) of shape [N, outputs].

The control plane calls :meth:`BundlePredictor.predict_images` directly (no HTTP).
Heads over shared frozen backbones take their features from
:mod:`taskvision.features`, which runs one process-wide
:class:`taskvision.backbone.Embedder` per backbone with a content-keyed cache,
so an image goes through a backbone once however many tasks or versions are
asked about it.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from taskvision import features, imaging
from taskvision.backbone import Embedder, shared_embedder
from taskvision.bundle import clip_values
from taskvision.errors import TaskVisionError
from taskvision.inference import BundleModel
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 80_000_000


@dataclass(frozen=True)
class _Batch:
    """Preprocessed images on their way from ``preprocess`` to ``predict``."""

    arrays: npt.NDArray[np.float32]
    protocol: str  # "v1" or "v2"
    request_id: str | None = None


@dataclass(frozen=True)
class _Outputs:
    values: npt.NDArray[np.float32]
    protocol: str
    request_id: str | None = None


class BundlePredictor(Model):
    """Serves one TaskVision model bundle (a task version)."""

    def __init__(
        self,
        name: str,
        bundle_dir: Path,
        *,
        embedder: Embedder | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(name)
        self.bundle_dir = bundle_dir
        self.max_image_pixels = max_image_pixels
        self._embedder = embedder  # used for its own backbone; the shared ones for the others
        self.model: BundleModel | None = None

    # ---- lifecycle -----------------------------------------------------------

    def embedder(self, backbone_id: str) -> Embedder:
        """A backbone's embedder: the one this predictor was given, for its backbone; else the shared one."""
        if self._embedder is not None and self._embedder.spec.id == backbone_id:
            return self._embedder
        return shared_embedder(backbone_id)

    def load(self) -> bool:
        self.model = BundleModel.load(self.bundle_dir)
        if self.model.meta.frozen_backbone:
            for backbone_id in features.backbones_needed(self.model.meta.features):
                self.embedder(backbone_id)  # its ONNX Runtime session is ready before the first request
        self.ready = True
        logger.info("loaded %s from %s", self.name, self.bundle_dir)
        return self.ready

    @property
    def bundle(self) -> BundleModel:
        if self.model is None:
            raise RuntimeError(f"Model {self.name} is not loaded.")
        return self.model

    # ---- direct use (the control plane) -----------------------------------------

    def decode(self, data: bytes) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
        """One image's model input (a flat array) and its (width, height); TaskVisionError on bad input."""
        image, size = self.bundle.decode(data, max_pixels=self.max_image_pixels)
        return self.bundle.prepare(image), size

    def outputs_for_arrays(self, arrays: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities (classification) or raw values (regression) for stacked :meth:`decode` inputs."""
        model = self.bundle
        return model.outputs(model.logits_from_prepared(arrays, embedder=self.embedder))

    def describe(self, row: npt.NDArray[np.float32]) -> dict[str, Any]:
        """One image's answer: ``best_label`` and ``labels`` sorted by probability (or the value).

        Regression values are clipped to the bundle's value range; ``out_of_range: true``
        says that the model's raw value was outside it (e.g. a photo unlike the training ones).
        """
        meta = self.bundle.meta
        labels = meta.labels
        if meta.task_type is TaskType.REGRESSION:
            clipped, outside = clip_values(meta, np.asarray(row)[None, :])
            values = [
                {"id": lb["id"], "name": lb["name"], "value": float(v)}
                for lb, v in zip(labels, clipped[0], strict=True)
            ]
            answer: dict[str, Any] = {"best_label": values[0], "labels": values}
            if outside[0]:
                answer["out_of_range"] = True
            return answer
        ranked: list[dict[str, Any]] = sorted(
            (
                {"id": lb["id"], "name": lb["name"], "prob": round(float(p), 5)}
                for lb, p in zip(labels, row, strict=True)
            ),
            key=lambda item: -float(item["prob"]),
        )
        if meta.task_type is TaskType.MULTI_CLASS:
            return {"best_label": ranked[0], "labels": ranked}
        thresholds: dict[str, float] = dict(
            zip((lb["id"] for lb in labels), meta.thresholds or [0.5] * len(labels), strict=True)
        )
        above = [item for item in ranked if float(item["prob"]) >= thresholds[str(item["id"])]]
        if above:
            best: dict[str, Any] | list[dict[str, Any]] = above
        elif meta.negative_label:
            best = [{**meta.negative_label, "prob": round(float(1.0 - max(row, default=0.0)), 5)}]
        else:
            best = []
        return {"best_label": best, "labels": ranked}

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Answer for each encoded image (raises on the first bad one)."""
        arrays = np.stack([self.decode(data)[0] for data in images])
        outputs = self.outputs_for_arrays(arrays)
        return [self.describe(row) for row in outputs]

    # ---- KServe hooks -------------------------------------------------------------

    async def preprocess(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> Any:
        if isinstance(payload, InferRequest):
            images = _v2_images(payload)
            protocol, request_id = "v2", payload.id
        else:
            images = _v1_images(payload)
            protocol, request_id = "v1", None
        try:
            arrays = np.stack([self.decode(data)[0] for data in images])
        except TaskVisionError as exc:
            raise InvalidInput(str(exc)) from exc
        return _Batch(arrays=arrays, protocol=protocol, request_id=request_id)

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> Any:
        batch: _Batch = payload
        return _Outputs(self.outputs_for_arrays(batch.arrays), batch.protocol, batch.request_id)

    async def postprocess(
        self, result: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> dict[str, Any] | InferResponse:
        outputs: _Outputs = result
        if outputs.protocol == "v1":
            return {"predictions": [self.describe(row) for row in outputs.values]}
        values = outputs.values
        name = "probabilities"
        if self.bundle.meta.task_type is TaskType.REGRESSION:
            name, values = "values", clip_values(self.bundle.meta, values)[0]
        tensor = InferOutput(name=name, shape=list(values.shape), datatype="FP32")
        tensor.set_data_from_numpy(values.astype(np.float32), binary_data=False)
        return InferResponse(
            response_id=outputs.request_id or "",
            model_name=self.name,
            infer_outputs=[tensor],
            parameters={"labels": ",".join(lb["name"] for lb in self.bundle.meta.labels)},
        )


def _b64(text: str) -> bytes:
    try:
        return imaging.decode_base64(text)
    except TaskVisionError as exc:
        raise InvalidInput(str(exc)) from exc


def _v1_images(payload: dict[str, Any]) -> list[bytes]:
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('Expected {"instances": [{"b64": "<base64 image>"}, ...]}')
    images = []
    for instance in instances:
        if isinstance(instance, dict) and isinstance(instance.get("b64"), str):
            images.append(_b64(instance["b64"]))
        elif isinstance(instance, str):
            images.append(_b64(instance))
        else:
            raise InvalidInput('Each instance must be {"b64": "<base64 image>"} or a base64 string.')
    return images


def _v2_images(request: InferRequest) -> list[bytes]:
    tensor = request.get_input_by_name("image") or (request.inputs[0] if request.inputs else None)
    if tensor is None or tensor.datatype != "BYTES":
        raise InvalidInput('Expected a BYTES input named "image" holding encoded images.')
    images = []
    for item in tensor.data:
        raw = item if isinstance(item, bytes) else str(item).encode()
        # JSON carries bytes as text: accept base64 text as well as raw bytes.
        try:
            images.append(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            images.append(raw)
    return images
