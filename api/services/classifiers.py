"""Classify's two backends behind one interface, chosen at start-up (``TASKVISION_SERVING_BACKEND``).

* :class:`EmbeddedClassifier` (embedded mode): the control plane hosts the
  KServe predictors itself. Versions load lazily into a
  :class:`serving.repository.BundleRepository` (one load per version however
  many requests ask, none blocking the others) and stay loaded within
  ``TASKVISION_SERVING_MEMORY_MB`` (least recently used first out).
  Frozen-backbone heads share one head bank and one embedder per backbone
  (INT8 with ``TASKVISION_SERVING_INT8`` for the backbones of
  ``TASKVISION_SERVING_INT8_BACKBONES``, each calibrated on the stored
  training images in the background). A model is named ``<task id>.v<version>``, so a
  production switch takes effect on the next request. Bundles in a local blob
  directory are read in place; from S3 they are copied once to a local cache.
* :class:`InferenceServiceClassifier` (cluster mode): the task's KServe
  InferenceService, over the V1 protocol (``:predict``, or ``:explain`` for
  explanations), for its production version (the serving reconciler keeps it
  there); any other version asked for by number is answered in-process by an
  embedded classifier.

The classify route keeps only request validation and the Ximilar response
shape; it hands a backend the decoded images' bytes and gets per image either
the answer fields or the error of that image.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from api.services.inference_services import KubernetesUnavailable
from api.services.serving_reconciler import ServingReconciler
from serving.extractors import Extractors
from serving.int8 import DEFAULT_BACKBONES, start_int8
from serving.model import BundlePredictor
from serving.repository import BundleRepository
from taskvision import imaging
from taskvision.bundle import BundleMeta
from taskvision.errors import InvalidImageError, ServiceUnavailableError, TaskVisionError
from taskvision.storage import BlobStore, LocalBlobStore

logger = logging.getLogger(__name__)

# Per image: the answer's fields (best_label, labels, _width, _height; _explanations when asked)
# or why that image failed.
Answer = dict[str, Any] | TaskVisionError


@dataclass(frozen=True)
class ClassifyTarget:
    """The task version a request is answered with (plain values: no DB session is held)."""

    task_id: str
    task_name: str
    version: int
    production_version: int
    bundle_uri: str


class Classifier(Protocol):
    def classify(
        self, target: ClassifyTarget, images: Mapping[int, bytes], *, explain: bool = False
    ) -> dict[int, Answer]:
        """Answer each image (keyed by its record's index); with ``explain``, with heat maps."""
        ...

    def unload_task(self, task_id: str) -> None:
        """Forget every loaded version of a deleted task."""
        ...

    def unload_version(self, task_id: str, version: int) -> None:
        """Forget one version (it is being deleted)."""
        ...


def model_name(task_id: str, version: int) -> str:
    return f"{task_id}.v{version}"


class EmbeddedClassifier:
    """The version's KServe predictor, hosted by this process."""

    def __init__(
        self,
        blobs: BlobStore,
        cache_dir: Path,
        *,
        memory_mb: float,
        max_image_pixels: int,
        int8: bool = False,
        int8_backbones: Sequence[str] = DEFAULT_BACKBONES,
        batch_window_ms: float = 0.0,
    ) -> None:
        self.blobs = blobs
        self.cache_dir = cache_dir
        self._prefixes: dict[str, str] = {}
        self._lock = threading.Lock()
        self.extractors = Extractors(batch_window_ms=batch_window_ms)
        self.repository = BundleRepository(
            cache_dir,
            locate=self._locate,
            memory_mb=memory_mb,
            max_image_pixels=max_image_pixels,
            extractors=self.extractors,
        )
        if int8:
            start_int8(
                self.extractors,
                blobs,
                cache_dir / "int8",
                backbone_ids=int8_backbones,
                max_pixels=max_image_pixels,
            )

    def predictor(self, task_id: str, version: int, bundle_prefix: str) -> BundlePredictor:
        """The loaded predictor of a task version (loading it on first use)."""
        name = model_name(task_id, version)
        with self._lock:
            self._prefixes[name] = bundle_prefix
        try:
            return self.repository.get_or_load(name)
        except Exception as exc:
            logger.exception("cannot load %s", name)
            raise ServiceUnavailableError(
                f"Version {version} of task {task_id} cannot be loaded right now; retry later."
            ) from exc

    def classify(
        self, target: ClassifyTarget, images: Mapping[int, bytes], *, explain: bool = False
    ) -> dict[int, Answer]:
        predictor = self.predictor(target.task_id, target.version, target.bundle_uri)
        answers = predictor.classify(list(images.values()), explain=explain) if images else []
        return dict(zip(images, answers, strict=True))

    def unload_task(self, task_id: str) -> None:
        for name in list(self.repository.get_models()):
            if name.startswith(f"{task_id}.v"):
                self.repository.unload(name)

    def unload_version(self, task_id: str, version: int) -> None:
        name = model_name(task_id, version)
        if name in self.repository.get_models():
            self.repository.unload(name)

    def _locate(self, name: str) -> Path:
        prefix = self._prefixes[name]
        if isinstance(self.blobs, LocalBlobStore):
            return self.blobs.root / prefix
        local = self.cache_dir / prefix
        if not (local / "bundle.json").is_file():
            meta = BundleMeta.from_json(self.blobs.get(f"{prefix}/bundle.json"))
            local.mkdir(parents=True, exist_ok=True)
            for name in meta.files:
                # The weights file always; head.npz (W and b as plain arrays) when the bundle has one
                # (bundles imported from elsewhere may not): the head bank reads it without onnx.
                if name == meta.weights_file or self.blobs.exists(f"{prefix}/{name}"):
                    (local / name).write_bytes(self.blobs.get(f"{prefix}/{name}"))
            (local / "bundle.json").write_text(meta.to_json())  # last: marks the copy complete
        return local


class InferenceServiceClassifier:
    """The task's InferenceService for its production version; other versions in-process."""

    def __init__(
        self,
        reconciler: ServingReconciler,
        fallback: EmbeddedClassifier,
        *,
        max_image_pixels: int,
        timeout_s: float,
    ) -> None:
        self.reconciler = reconciler
        self.fallback = fallback
        self.max_image_pixels = max_image_pixels
        self.timeout_s = timeout_s

    def classify(
        self, target: ClassifyTarget, images: Mapping[int, bytes], *, explain: bool = False
    ) -> dict[int, Answer]:
        if target.version != target.production_version:
            return self.fallback.classify(target, images, explain=explain)
        try:
            endpoint = self.reconciler.endpoint(target.task_id)
        except KubernetesUnavailable as exc:
            raise ServiceUnavailableError(
                f"Serving of task '{target.task_name}' is unavailable: {exc}"
            ) from exc
        if not endpoint.ready:
            raise ServiceUnavailableError(
                f"The model of task '{target.task_name}' is starting (deploying, or scaled to zero); "
                "retry in a few seconds."
            )
        answers: dict[int, Answer] = {}
        encoded: dict[int, str] = {}
        for i, data in images.items():
            try:
                width, height = imaging.upright_size(data, max_pixels=self.max_image_pixels)
                answers[i] = {"_width": width, "_height": height}
                encoded[i] = base64.b64encode(data).decode()
            except TaskVisionError as exc:
                answers[i] = exc
        good = sorted(encoded)
        if not good:
            return answers
        verb = "explain" if explain else "predict"
        url = f"{str(endpoint.url).rstrip('/')}/v1/models/{endpoint.model_name}:{verb}"
        try:
            response = httpx.post(
                url, json={"instances": [{"b64": encoded[i]} for i in good]}, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"The model of task '{target.task_name}' did not answer: {exc}"
            ) from exc
        if response.status_code == 400:  # the predictor refused an image (e.g. corrupt pixel data)
            reason = str(response.json().get("error", "invalid image"))
            return {**answers, **{i: InvalidImageError(reason) for i in good}}
        if response.status_code != 200:
            raise ServiceUnavailableError(
                f"The model of task '{target.task_name}' answered HTTP {response.status_code}."
            )
        for i, prediction in zip(good, response.json()["predictions"], strict=True):
            answer = answers[i]
            assert isinstance(answer, dict)
            answer.update(prediction)
        return answers

    def unload_task(self, task_id: str) -> None:
        self.fallback.unload_task(task_id)
        self.reconciler.delete(task_id)

    def unload_version(self, task_id: str, version: int) -> None:
        self.fallback.unload_version(task_id, version)
