"""The feature extractors a server runs: feature id -> preprocessing and a shared backbone embedder.

A frozen-backbone bundle names the feature vectors its head takes
(``features`` in bundle.json, in order; a bundle without it takes
EfficientNet-Lite0's multi-scale embedding). :func:`feature_source` is the
one place that resolves a feature id. :class:`Extractors` keeps one embedder
per feature id and precision for the whole process, so an image is run
through each backbone once however many tasks ask about it, optionally
batching concurrent requests (:mod:`serving.batching`) and, for the backbones
whose INT8 version was accepted (:mod:`taskvision.quantize`), in INT8.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from serving.batching import BatchingEmbedder, Embeds
from taskvision import backbone
from taskvision.backbone import Embedder, onnx_session
from taskvision.preprocess import DEFAULT, PreprocessConfig
from taskvision.quantize import Int8Backbone

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
DEFAULT_FEATURES: tuple[str, ...] = (backbone.EMBEDDING_ID,)
EMBEDDING_CACHE = 256  # per embedder: the same image asked about for several tasks in a short while


class Precision(StrEnum):
    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class FeatureSource:
    """How to compute one feature vector: the image preprocessing and the backbone's FP32 ONNX export."""

    feature_id: str
    dim: int
    preprocess: PreprocessConfig
    onnx_path: Callable[[], Path]
    shared_embedder: Callable[[], Embedder]


def feature_source(feature_id: str) -> FeatureSource:
    """The feature extractor named ``feature_id`` (a bundle's ``features`` entry).

    Only EfficientNet-Lite0's multi-scale embedding exists today; the feature
    registry of the training side replaces this function when it adds others.
    """
    if feature_id == backbone.EMBEDDING_ID:
        return FeatureSource(
            feature_id=feature_id,
            dim=backbone.EMBEDDING_DIM,
            preprocess=DEFAULT,
            onnx_path=backbone.backbone_onnx_path,
            shared_embedder=backbone.shared_embedder,
        )
    raise ValueError(f"Unknown feature extractor {feature_id!r}; known: {backbone.EMBEDDING_ID!r}.")


def bundle_features(meta: Any) -> tuple[str, ...]:
    """The feature ids a bundle's head takes, in order (the default for bundles that do not say)."""
    return tuple(getattr(meta, "features", None) or DEFAULT_FEATURES)


class Extractors:
    """One embedder per (feature id, precision) for the whole server (thread-safe)."""

    def __init__(self, *, batch_window_ms: float = 0.0, max_batch: int = 16) -> None:
        self.batch_window_ms = batch_window_ms
        self.max_batch = max_batch
        self._embedders: dict[tuple[str, Precision], Embeds] = {}
        self._int8: dict[str, Int8Backbone] = {}  # accepted ones, by feature id
        self.int8_generation = 0  # changes whenever the INT8 backbones in use change
        self._lock = threading.Lock()

    # ---- INT8 ------------------------------------------------------------------------

    def use_int8(self, int8: Int8Backbone) -> None:
        """Serve ``int8`` (an accepted quantized backbone) for its feature id."""
        with self._lock:
            self._int8[int8.feature_id] = int8
            self._embedders.pop((int8.feature_id, Precision.INT8), None)
            self.int8_generation += 1
        logger.info("INT8 backbone in use for %s (%s)", int8.feature_id, int8.path)

    def int8(self, feature_id: str) -> Int8Backbone | None:
        """The accepted INT8 backbone of ``feature_id``, if any."""
        return self._int8.get(feature_id)

    # ---- embedding -------------------------------------------------------------------

    def embedder(self, feature_id: str, precision: Precision = Precision.FP32) -> Embeds:
        key = (feature_id, precision)
        with self._lock:
            found = self._embedders.get(key)
            if found is None:
                found = self._embedders[key] = self._make(feature_id, precision)
            return found

    def _make(self, feature_id: str, precision: Precision) -> Embeds:
        source = feature_source(feature_id)
        inner: Embeds
        if precision is Precision.FP32:
            inner = source.shared_embedder()
        else:
            int8 = self._int8.get(feature_id)
            if int8 is None:
                raise RuntimeError(f"No INT8 backbone is in use for {feature_id}.")
            inner = Embedder(
                session=onnx_session(int8.path, spinning=False),
                config=source.preprocess,
                cache_size=EMBEDDING_CACHE,
                concurrent_session=onnx_session(int8.path, threads=1, spinning=False),
            )
        if self.batch_window_ms > 0:
            return BatchingEmbedder(inner, window_ms=self.batch_window_ms, max_batch=self.max_batch)
        return inner

    def embed(
        self,
        features: tuple[str, ...],
        inputs: Mapping[PreprocessConfig, Array],
        precision: Precision = Precision.FP32,
        *,
        keys: Sequence[bytes] | None = None,
    ) -> Array:
        """The concatenated feature vectors (N, D) of preprocessed images (``inputs`` per preprocessing).

        ``keys`` name the images' content for the embedding caches (a hash of the encoded image).
        """
        parts = [
            self.embedder(feature_id, precision).embed_arrays(
                inputs[feature_source(feature_id).preprocess], keys=keys
            )
            for feature_id in features
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
