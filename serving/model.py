"""The KServe predictor for one model bundle.

``BundlePredictor`` is a ``kserve.Model``: ``load`` reads the bundle,
``preprocess`` decodes images exactly as evaluation did
(:func:`taskvision.preprocess.preprocess_bytes`), ``predict`` runs the bundle
(:class:`taskvision.inference.BundleModel`), ``postprocess`` names the outputs.
It speaks both KServe protocols:

* V1 ``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "..."}, ...]}``
  answers ``{"predictions": [{"best_label": ..., "labels": [...]}, ...]}``;
* Open Inference (V2) ``POST /v2/models/<name>/infer`` with a BYTES input
  ``image`` (one encoded image per element) answers FP32 ``probabilities``
  (regression: ``values``) of shape [N, outputs].

The control plane calls :meth:`BundlePredictor.predict_images` directly (no HTTP).
Heads over the shared frozen backbone take embeddings from one process-wide
:class:`taskvision.backbone.Embedder` with a content-keyed cache, so an image
is embedded once however many tasks or versions are asked about it.
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

from taskvision import imaging
from taskvision.backbone import Embedder, shared_embedder
from taskvision.errors import TaskVisionError
from taskvision.inference import BundleModel
from taskvision.preprocess import preprocess_bytes
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
        self._embedder = embedder
        self.model: BundleModel | None = None

    # ---- lifecycle -----------------------------------------------------------

    def load(self) -> bool:
        self.model = BundleModel.load(self.bundle_dir)
        if self.model.meta.frozen_backbone and self._embedder is None:
            self._embedder = shared_embedder()
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
        """One image's model input and its (width, height); raises TaskVisionError on bad input."""
        return preprocess_bytes(data, max_pixels=self.max_image_pixels)

    def outputs_for_arrays(self, arrays: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities (classification) or values (regression) for preprocessed images."""
        model = self.bundle
        if model.meta.frozen_backbone:
            assert self._embedder is not None
            return model.outputs(model.logits_from_embeddings(self._embedder.embed_arrays(arrays)))
        return model.outputs(model.logits_from_arrays(arrays))

    def describe(self, row: npt.NDArray[np.float32]) -> dict[str, Any]:
        """One image's answer: ``best_label`` and ``labels`` sorted by probability (or the value)."""
        meta = self.bundle.meta
        labels = meta.labels
        if meta.task_type is TaskType.REGRESSION:
            values = [
                {"id": lb["id"], "name": lb["name"], "value": float(v)}
                for lb, v in zip(labels, row, strict=True)
            ]
            return {"best_label": values[0], "labels": values}
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
        name = "values" if self.bundle.meta.task_type is TaskType.REGRESSION else "probabilities"
        tensor = InferOutput(name=name, shape=list(outputs.values.shape), datatype="FP32")
        tensor.set_data_from_numpy(outputs.values.astype(np.float32), binary_data=False)
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
