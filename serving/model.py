"""The KServe predictor for one model bundle.

``BundlePredictor`` is a ``kserve.Model``: ``load`` reads the bundle,
``preprocess`` decodes images exactly as evaluation did (the same
:mod:`taskvision.preprocess` functions, through the same draft size as
:meth:`taskvision.inference.BundleModel.decode`), ``predict`` runs the model,
``postprocess`` names the outputs. A regression answer is clipped to the
bundle's value range (the training values' range plus a margin) and its
record says ``"out_of_range": true`` when the raw prediction fell outside it.
It speaks both KServe protocols:

* V1 ``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "..."}, ...]}``
  answers ``{"predictions": [{"best_label": ..., "labels": [...]}, ...]}``;
  ``:explain`` answers the same with each prediction's ``_explanations``;
* Open Inference (V2) ``POST /v2/models/<name>/infer`` with a BYTES input
  ``image`` (one encoded image per element) answers FP32 ``probabilities``
  (regression: ``values``) of shape [N, outputs].

The control plane calls :meth:`BundlePredictor.classify` directly (no HTTP).

A frozen-backbone bundle whose head is one linear layer is served from the
server's :class:`serving.head_bank.HeadBank` (``W`` and ``b`` as numpy arrays)
over the feature vectors its ``features`` name (any list of
:mod:`taskvision.features` ids, over one or several backbones), computed by
the process-wide :class:`serving.extractors.Extractors`, which run an image
through each backbone once however many tasks or versions are asked about it
(INT8 where its answers stay within tolerance, see :mod:`taskvision.quantize`).
A fine-tuned bundle (``model.onnx``: image -> logits, a partial fine-tune
included), or a head that is not one linear layer, keeps its own ONNX Runtime
session. Explanations: :mod:`taskvision.explain`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from serving.extractors import Extractors, Precision, input_configs
from serving.head_bank import HeadBank, LinearHead, read_linear_head
from taskvision import explain, features, imaging, quantize
from taskvision.bundle import BundleMeta, clip_values, outputs_from_logits
from taskvision.errors import ExplainUnavailableError, TaskVisionError
from taskvision.inference import BundleModel, preprocess_config
from taskvision.preprocess import (
    DEFAULT,
    PreprocessConfig,
    decode_image,
    draft_side,
    resize_and_crop,
    to_array,
)
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
DEFAULT_MAX_PIXELS = 80_000_000
# What a loaded version costs beyond its arrays (the predictor, its metadata): counted in the
# repository's memory budget. Measured: 3,000 versions of 2-20 labels took 9.5 KiB each besides
# their heads (RSS growth minus the heads' bytes).
VERSION_OVERHEAD_BYTES = 10 * 1024
# An ONNX Runtime session holds its weights about twice (the initializers and the optimised
# graph's copy) plus arenas: counted as 3x the model file.
SESSION_BYTES_PER_FILE_BYTE = 3

_shared_lock = threading.Lock()
_shared: dict[str, Extractors] = {}


def shared_extractors() -> Extractors:
    """The process-wide extractors for predictors that are not given any."""
    with _shared_lock:
        if "extractors" not in _shared:
            _shared["extractors"] = Extractors()
        return _shared["extractors"]


@dataclass(frozen=True)
class Prepared:
    """Decoded images as model inputs (one stacked batch per preprocessing) and their sizes."""

    inputs: dict[PreprocessConfig, Array]
    sizes: list[tuple[int, int]]  # (width, height) as displayed
    keys: list[bytes] | None = None  # a hash of each encoded image: its embedding-cache key


@dataclass(frozen=True)
class _Batch:
    """Preprocessed images on their way from ``preprocess`` to ``predict``."""

    prepared: Prepared
    protocol: str  # "v1" or "v2"
    request_id: str | None = None


@dataclass(frozen=True)
class _Outputs:
    values: Array
    protocol: str
    request_id: str | None = None
    explanations: list[list[dict[str, Any]]] | None = None


class BundlePredictor(Model):
    """Serves one TaskVision model bundle (a task version)."""

    def __init__(
        self,
        name: str,
        bundle_dir: Path,
        *,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        extractors: Extractors | None = None,
        bank: HeadBank | None = None,
    ) -> None:
        super().__init__(name)
        self.bundle_dir = bundle_dir
        self.max_image_pixels = max_image_pixels
        self.extractors = extractors or shared_extractors()
        self.bank = bank
        self.meta: BundleMeta | None = None
        self.features: tuple[str, ...] = ()
        self.head: LinearHead | None = None  # frozen backbone, linear head: in the bank
        self.network: BundleModel | None = None  # its own session: fine-tuned, or another kind of head
        self.memory_bytes = 0
        self._configs: tuple[PreprocessConfig, ...] = (DEFAULT,)  # the model's inputs' preprocessings
        self._min_side = draft_side(DEFAULT.resize_to)  # a JPEG is decoded at reduced scale down to this side
        self._gradcam: explain.GradCamNetwork | None = None
        self._distribution: explain.DistributionHead | None = None
        self._lock = threading.Lock()
        self._precision: tuple[int, Precision] = (-1, Precision.FP32)

    # ---- lifecycle -----------------------------------------------------------

    def load(self) -> bool:
        meta = BundleMeta.from_json((self.bundle_dir / "bundle.json").read_text())
        if meta.frozen_backbone:
            self.features = tuple(meta.features)
            for feature_id in self.features:
                features.feature_spec(feature_id)  # an unknown feature fails at load, not per request
            self._configs = input_configs(self.features)
            self._min_side = features.draft_side(self.features, meta.draft_factor)
            self.head = read_linear_head(self.bundle_dir, meta, self.features)
        else:
            config = preprocess_config(meta)
            self._configs, self._min_side = (config,), draft_side(config.resize_to, meta.draft_factor)
        if self.head is None:
            self.network = BundleModel.load(self.bundle_dir)
            weights = (self.bundle_dir / meta.weights_file).stat().st_size
            self.memory_bytes = VERSION_OVERHEAD_BYTES + SESSION_BYTES_PER_FILE_BYTE * weights
        else:
            self.memory_bytes = VERSION_OVERHEAD_BYTES + self.head.nbytes
            if self.bank is not None:
                self.bank.add(self.name, self.head)
        self.meta = meta
        self.ready = True
        logger.debug("loaded %s from %s", self.name, self.bundle_dir)
        return self.ready

    def stop(self) -> None:
        """Called by the repository when the version is unloaded: its head leaves the bank."""
        if self.bank is not None and self.head is not None:
            self.bank.remove(self.name, self.head)

    @property
    def bundle_meta(self) -> BundleMeta:
        if self.meta is None:
            raise RuntimeError(f"Model {self.name} is not loaded.")
        return self.meta

    # ---- decoding ------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[dict[PreprocessConfig, Array], tuple[int, int]]:
        """One image's model inputs (per preprocessing) and its (width, height); TaskVisionError on bad input.

        The image is decoded once (a JPEG at reduced scale, never below the bundle's
        ``draft_factor`` times the largest resize), as
        :meth:`taskvision.inference.BundleModel.decode` does for evaluation.
        """
        image, size = decode_image(data, max_pixels=self.max_image_pixels, min_side=self._min_side)
        inputs = {config: to_array(resize_and_crop(image, config), config) for config in self._configs}
        return inputs, size

    def prepare(self, images: Sequence[bytes]) -> tuple[Prepared | None, list[TaskVisionError | None]]:
        """Decode every image; the good ones as one batch, and each image's error (None when good)."""
        errors: list[TaskVisionError | None] = []
        decoded: list[tuple[dict[PreprocessConfig, Array], tuple[int, int]]] = []
        keys = []
        for data in images:
            try:
                decoded.append(self.decode(data))
                errors.append(None)
                # The same bytes always decode to the same model input at the same draft side:
                # hashing them (a few tens of KB) costs a twentieth of hashing the input array.
                digest = hashlib.blake2b(data, digest_size=16, person=b"encoded").digest()
                keys.append(digest + self._min_side.to_bytes(4, "big"))
            except TaskVisionError as exc:
                errors.append(exc)
        if not decoded:
            return None, errors
        inputs = {config: np.stack([d[0][config] for d in decoded]) for config in self._configs}
        return Prepared(inputs=inputs, sizes=[d[1] for d in decoded], keys=keys), errors

    # ---- running the model ------------------------------------------------------------

    def precision(self) -> Precision:
        """INT8 when every feature's INT8 backbone is in use and this head's answers stay within tolerance."""
        generation = self.extractors.int8_generation
        if self._precision[0] == generation:
            return self._precision[1]
        precision = Precision.FP32
        if self.head is not None and self.meta is not None:
            checks = self.extractors.int8_checks(self.features)
            if checks is not None:
                logits = self.head.logits(checks)  # FP32's check images, then the same through INT8
                half = len(logits) // 2
                verdict = quantize.answers_within_tolerance(self.meta, logits[:half], logits[half:])
                if verdict.ok:
                    precision = Precision.INT8
                else:
                    logger.info(
                        "%s stays FP32: INT8 answers out of tolerance (%s)", self.name, verdict.reason
                    )
        self._precision = (generation, precision)
        return precision

    def outputs_for(self, prepared: Prepared) -> Array:
        """Probabilities (classification) or values (regression) for decoded images."""
        meta = self.bundle_meta
        if self.head is not None:
            embeddings = self.extractors.embed(
                self.features, prepared.inputs, self.precision(), keys=prepared.keys
            )
            return outputs_from_logits(meta, self.head.logits(embeddings))
        assert self.network is not None
        if meta.frozen_backbone:
            embeddings = self.extractors.embed(self.features, prepared.inputs, keys=prepared.keys)
            return self.network.outputs(self.network.logits_from_embeddings(embeddings))
        return self.network.outputs(self.network.logits_from_arrays(prepared.inputs[self._configs[0]]))

    def outputs_for_arrays(self, arrays: Array) -> Array:
        """Probabilities or raw values for images (N, 3, S, S) of a model with one preprocessing."""
        if len(self._configs) != 1:
            raise ValueError(f"{self.name} takes images in {len(self._configs)} preprocessings.")
        return self.outputs_for(Prepared(inputs={self._configs[0]: arrays}, sizes=[]))

    def describe(self, row: npt.NDArray[np.float32]) -> dict[str, Any]:
        """One image's answer: ``best_label`` and ``labels`` sorted by probability (or the value).

        Regression values are clipped to the bundle's value range; ``out_of_range: true``
        says that the model's raw value was outside it (e.g. a photo unlike the training ones).
        """
        meta = self.bundle_meta
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

    # ---- explanations ----------------------------------------------------------------------

    def explained(self, prepared: Prepared) -> tuple[Array, list[list[dict[str, Any]]]]:
        """Outputs (FP32) and, per image, the heat maps of its best label (or each tag above threshold)."""
        meta = self.bundle_meta
        outputs, grids = self._outputs_and_grids(prepared)
        index = {lb["id"]: i for i, lb in enumerate(meta.labels)}
        # The maps cover the crop the model saw; a head over several backbones: the largest of theirs.
        config = explain.explanation_grid(self.features).config if meta.frozen_backbone else self._configs[0]
        explanations = []
        for image, row in enumerate(outputs):
            best = self.describe(row)["best_label"]
            chosen = [lb for lb in (best if isinstance(best, list) else [best]) if lb["id"] in index]
            width, height = prepared.sizes[image] if prepared.sizes else (config.input_size,) * 2
            explanations.append(
                [
                    explain.explanation(grids[image, index[lb["id"]]], lb, width, height, config)
                    for lb in chosen
                ]
            )
        return outputs, explanations

    def _outputs_and_grids(self, prepared: Prepared) -> tuple[Array, Array]:
        """Outputs (N, K) and every output's map over the image (N, K, H, W)."""
        meta = self.bundle_meta
        task_type = str(meta.task_type)
        if self.head is not None:
            rows = explain.explained_rows(task_type, self.head.weight)
            head_input, grids = explain.linear_head_cam(prepared.inputs, self.features, rows)
            return outputs_from_logits(meta, self.head.logits(head_input)), grids
        if not meta.frozen_backbone:
            network = self._gradcam_network()
            logits, feature_map = network.run(prepared.inputs[self._configs[0]])
            rows = explain.explained_rows(task_type, network.weight)
            return outputs_from_logits(meta, logits), explain.grad_cam(feature_map, rows)
        # A frozen backbone's head that is not one linear layer: regression's distribution head,
        # explained by integrated gradients (explain.DistributionHead); its own session answers.
        assert self.network is not None
        head = self._distribution_head()
        maps = explain.head_maps(prepared.inputs, self.features)
        grids = explain.head_cam(maps, self.features, head.attribution_rows(maps.inputs))
        values = self.network.logits_from_embeddings(maps.inputs)
        return outputs_from_logits(meta, values), grids

    def _gradcam_network(self) -> explain.GradCamNetwork:
        with self._lock:
            if self._gradcam is None:
                meta = self.bundle_meta
                self._gradcam = explain.GradCamNetwork((self.bundle_dir / meta.weights_file).read_bytes())
            return self._gradcam

    def _distribution_head(self) -> explain.DistributionHead:
        with self._lock:
            if self._distribution is None:
                assert self.network is not None
                model = (self.bundle_dir / self.bundle_meta.weights_file).read_bytes()
                self._distribution = explain.DistributionHead.from_onnx(
                    model, self.network.logits_from_embeddings
                )
            return self._distribution

    # ---- direct use (the control plane) -----------------------------------------

    def classify(
        self, images: Sequence[bytes], *, explain: bool = False
    ) -> list[dict[str, Any] | TaskVisionError]:
        """Each image's answer (``_width``, ``_height``, ``best_label``, ``labels`` and, when asked,
        ``_explanations``), or the error that image alone failed with."""
        prepared, errors = self.prepare(images)
        results: list[dict[str, Any] | TaskVisionError] = []
        if prepared is None:
            return [error for error in errors if error is not None]
        if explain:
            outputs, explanations = self.explained(prepared)
        else:
            outputs, explanations = self.outputs_for(prepared), None
        good = iter(range(len(prepared.sizes)))
        for error in errors:
            if error is not None:
                results.append(error)
                continue
            k = next(good)
            width, height = prepared.sizes[k]
            answer: dict[str, Any] = {"_width": width, "_height": height, **self.describe(outputs[k])}
            if explanations is not None:
                answer["_explanations"] = explanations[k]
            results.append(answer)
        return results

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Answer for each encoded image (raises on the first bad one)."""
        answers = self.classify(images)
        for answer in answers:
            if isinstance(answer, TaskVisionError):
                raise answer
        return [{k: v for k, v in a.items() if not k.startswith("_")} for a in answers]  # type: ignore[union-attr]

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
        # Decoding and inference run in worker threads: the event loop keeps serving other
        # requests (and repository loads) meanwhile, and ONNX Runtime runs them side by side.
        prepared, errors = await asyncio.to_thread(self.prepare, images)
        for error in errors:
            if error is not None:
                raise InvalidInput(str(error))
        assert prepared is not None
        return _Batch(prepared=prepared, protocol=protocol, request_id=request_id)

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> Any:
        batch: _Batch = payload
        values = await asyncio.to_thread(self.outputs_for, batch.prepared)
        return _Outputs(values, batch.protocol, batch.request_id)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        batch: _Batch = payload
        try:
            values, explanations = await asyncio.to_thread(self.explained, batch.prepared)
        except ExplainUnavailableError as exc:
            raise InvalidInput(str(exc)) from exc
        return _Outputs(values, batch.protocol, batch.request_id, explanations)

    async def postprocess(
        self, result: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> dict[str, Any] | InferResponse:
        outputs: _Outputs = result
        if outputs.protocol == "v1":
            predictions = [self.describe(row) for row in outputs.values]
            if outputs.explanations is not None:
                for prediction, explained in zip(predictions, outputs.explanations, strict=True):
                    prediction["_explanations"] = explained
            return {"predictions": predictions}
        meta = self.bundle_meta
        values = outputs.values
        name = "probabilities"
        if meta.task_type is TaskType.REGRESSION:
            name, values = "values", clip_values(meta, values)[0]
        tensor = InferOutput(name=name, shape=list(values.shape), datatype="FP32")
        tensor.set_data_from_numpy(values.astype(np.float32), binary_data=False)
        return InferResponse(
            response_id=outputs.request_id or "",
            model_name=self.name,
            infer_outputs=[tensor],
            parameters={"labels": ",".join(lb["name"] for lb in meta.labels)},
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
